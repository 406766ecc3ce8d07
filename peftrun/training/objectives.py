"""What is learned: an objective takes the adapted model and a batch and returns the loss and the metrics to
log; it also evaluates. The loop knows nothing else about learning.

    Supervised      the task's own loss, as the model computes it from `labels`: token cross-entropy for
                    causal and seq2seq LMs (the causal one in chunks, peftrun.lm_loss), cross-entropy over
                    classes for sequence and token classification

A method's own training term (AdaLoRA's orthogonality regulariser) is added to every objective's loss here,
once. Adding a way of learning = one Objective subclass (with its data format and evaluation) and one line
in OBJECTIVES; nothing in the loop, the engines or the checkpoints changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from peftrun.data import model_inputs
from peftrun.evaluate import EvalResult, evaluate


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)  # extra numbers to log beside the loss


class Objective:
    """The contract: `objective(model, batch) -> StepResult` for a training step, `evaluate(...)` for the
    held-out split. `model` is the prepared (possibly wrapped) model; `peft_model` the adapted model in it."""

    name = "?"

    def __init__(self, recipe, peft_model, tokenizer, label_names: list[str] | None):
        self.recipe = recipe
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.label_names = label_names

    def __call__(self, model, batch: dict[str, Any]) -> StepResult:
        result = self.loss(model, batch)
        extra = self.peft_model.method.extra_loss
        if extra is not None:
            result.loss = result.loss + extra(self.peft_model, self.peft_model.active_adapter)
        return result

    def loss(self, model, batch: dict[str, Any]) -> StepResult:
        raise NotImplementedError

    def evaluate(self, model, loader, accelerator) -> EvalResult:
        raise NotImplementedError


class Supervised(Objective):
    """The task's loss from its labels (what transformers computes from `labels`)."""

    name = "supervised"

    def loss(self, model, batch):
        return StepResult(model(**model_inputs(batch)).loss)

    def evaluate(self, model, loader, accelerator):
        return evaluate(
            model, loader, task_type=self.recipe.model.task_type, tokenizer=self.tokenizer,
            label_names=self.label_names, data_cfg=self.recipe.data, accelerator=accelerator,
        )


OBJECTIVES: dict[str, type[Objective]] = {
    Supervised.name: Supervised,
}


def make_objective(recipe, peft_model, tokenizer, label_names: list[str] | None) -> Objective:
    name = getattr(recipe.training, "objective", Supervised.name)
    return OBJECTIVES[name](recipe, peft_model, tokenizer, label_names)
