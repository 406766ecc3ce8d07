"""What is learned. The loop knows nothing else about learning: an objective turns the data into batches,
takes the adapted model and a batch and returns the loss and the metrics to log, and evaluates.

    supervised  the task's own loss from its labels (token cross-entropy, class cross-entropy)
    reward      a ranker: -log sigmoid(r(chosen) - r(rejected) - margin) on a one-output classifier
    dpo         direct preference optimisation against the same base with the adapter off (sigmoid, IPO)
    orpo        odds-ratio preference optimisation: chosen NLL minus lambda * log sigmoid(log odds ratio)
    grpo        group-relative policy optimisation on prompts, rewarded by rules and saved classifiers
    diffusion   DreamBooth on a TEXT_TO_IMAGE pipeline: denoising loss with prior preservation

A method's own training term (AdaLoRA's orthogonality regulariser) is added to every objective's loss here,
once. Adding a way of learning = one module with an Objective subclass (its data, loss and evaluation) and one
line in OBJECTIVES; nothing in the loop, the engines or the checkpoints changes.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from peftrun.evaluate import EvalResult, report_lines


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)  # numbers to log beside the loss
    weight: int = 1  # rows (or pairs) the metrics average over, for evaluation


@dataclass
class Data:
    """What an objective makes of the splits: rows for the data loaders and how to batch them."""

    train: Any
    eval: Any
    collate: Any
    eval_collate: Any
    notes: list[str] = field(default_factory=list)  # lines to print at the start (rows dropped...)


class Objective(ABC):
    """The contract. Before the model exists: `label_names(splits)` and `num_labels(label_names)` (the head);
    then `data(tokenizer, splits, label_names)`. After it is prepared, `bind(peft_model)`, then per batch
    `objective(model, batch) -> StepResult` and per evaluation `evaluate(model, loader, accelerator)`.
    `model` is the prepared (possibly wrapped) model; `peft_model` the adapted model inside it."""

    name = "?"

    def __init__(self, recipe):
        self.recipe = recipe
        self.peft_model = None
        self.tokenizer = None
        self.label_names: list[str] | None = None

    # -- before the model ----------------------------------------------------------------------
    def find_label_names(self, splits) -> list[str] | None:
        return None

    def num_labels(self, label_names: list[str] | None) -> int | None:
        return len(label_names) if label_names else None

    @abstractmethod
    def data(self, tokenizer, splits, label_names) -> Data:
        """The objective's rows for the train and eval loaders, and how to batch them."""

    def bind(self, peft_model, tokenizer, label_names) -> None:
        self.peft_model, self.tokenizer, self.label_names = peft_model, tokenizer, label_names

    # -- training ------------------------------------------------------------------------------
    def __call__(self, model, batch: dict[str, Any]) -> StepResult:
        result = self.loss(model, batch)
        extra = self.peft_model.method.extra_loss
        if extra is not None:
            result.loss = result.loss + extra(self.peft_model, self.peft_model.active_adapter)
        return result

    @abstractmethod
    def loss(self, model, batch: dict[str, Any]) -> StepResult:
        """The step's loss (with gradient) and the numbers to log beside it."""

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, model, loader, accelerator) -> EvalResult:
        """The held-out mean of the loss and of every metric the step reports (weighted by rows), over all
        processes, as eval_loss and eval_<metric>."""
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        total = 0
        with torch.no_grad():
            for batch in loader:
                step = self.loss(model, batch)
                for key, value in {"loss": float(step.loss), **step.metrics}.items():
                    sums[key] = sums.get(key, 0.0) + value * step.weight
                total += step.weight
        keys = sorted(sums)
        vector = torch.tensor([sums[k] for k in keys] + [float(total)], dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            vector = accelerator.reduce(vector.to(accelerator.device), reduction="sum").cpu()
        count = max(float(vector[-1]), 1.0)
        if was_training:
            model.train()
        return EvalResult({f"eval_{k}": float(v) / count for k, v in zip(keys, vector[:-1])})

    def report(self, result: EvalResult) -> list[str]:
        """Lines printed after an evaluation (the seed's accuracy/F1 lines by default)."""
        return report_lines(result)


# objective name -> module holding its class as OBJECTIVE; imported on first use
OBJECTIVES: dict[str, str] = {
    "supervised": "peftrun.training.objectives.supervised",
    "reward": "peftrun.training.objectives.reward",
    "dpo": "peftrun.training.objectives.dpo",
    "orpo": "peftrun.training.objectives.orpo",
    "grpo": "peftrun.training.objectives.grpo",
    "diffusion": "peftrun.training.objectives.diffusion",
}


def make_objective(recipe) -> Objective:
    return importlib.import_module(OBJECTIVES[recipe.training.objective]).OBJECTIVE(recipe)
