"""The task's own loss, as the model computes it from `labels`: token cross-entropy for causal and seq2seq LMs
(the causal one in chunks, peftrun.lm_loss), class cross-entropy for sequence and token classification.
Evaluated per task: accuracy and F1, entity F1, perplexity, generated-label accuracy (peftrun.evaluate)."""

from __future__ import annotations

from peftrun.data import Collator, label_names_for, model_inputs
from peftrun.datamix import tokenize_pieces
from peftrun.evaluate import evaluate
from peftrun.tasks import has_label_names
from peftrun.training.objectives import Data, Objective, StepResult


class Supervised(Objective):
    name = "supervised"

    def find_label_names(self, splits):
        task = self.recipe.model.task_type
        return label_names_for(splits, self.recipe.data) if has_label_names(task) else None

    def data(self, tokenizer, splits, label_names):
        task, cfg = self.recipe.model.task_type, self.recipe.data
        # each dataset of data.datasets with its own data section (peftrun/datamix.py); else the one dataset
        train = tokenize_pieces(splits, "train", cfg, tokenizer, task, label_names, for_eval=False)
        eval_ = tokenize_pieces(splits, "eval", cfg, tokenizer, task, label_names, for_eval=True)
        collate = Collator(tokenizer.pad_token_id, task)
        return Data(train, eval_, collate, collate)

    def loss(self, model, batch):
        return StepResult(model(**model_inputs(batch)).loss)

    def evaluate(self, model, loader, accelerator):
        return evaluate(
            model, loader, task_type=self.recipe.model.task_type, tokenizer=self.tokenizer,
            label_names=self.label_names, data_cfg=self.recipe.data, accelerator=accelerator,
        )


OBJECTIVE = Supervised
