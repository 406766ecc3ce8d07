r"""A reward model (ranker): a classifier head with one output on any encoder or causal LM, trained on
preference pairs with the pairwise (Bradley-Terry) loss

    loss = - mean log sigmoid( r(x, y_chosen) - r(x, y_rejected) - m ),

m a per-pair margin (a `margin` column) or `preference.reward_margin`. Evaluated by pairwise accuracy (the
share of pairs ranked right) and the mean margin r_chosen - r_rejected. The head trains whole (it is the
task head of SEQ_CLS), the body through the recipe's method.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from peftrun.training.objectives import StepResult
from peftrun.training.objectives.pairs import PairObjective, halves


class Reward(PairObjective):
    name = "reward"

    def num_labels(self, label_names):
        return 1

    def scores(self, model, batch) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits[:, 0].float()

    def loss(self, model, batch):
        chosen, rejected = halves(self.scores(model, batch))
        margin = batch.get("margin")
        margin = margin.to(chosen.device) if margin is not None else self.recipe.preference.reward_margin
        loss = -F.logsigmoid(chosen - rejected - margin).mean()
        diff = (chosen - rejected).detach()
        metrics = {
            "accuracy": float((diff > 0).float().mean()),
            "margin": float(diff.mean()),
            "rewards/chosen": float(chosen.detach().mean()),
            "rewards/rejected": float(rejected.detach().mean()),
        }
        return StepResult(loss, metrics, weight=chosen.shape[0])


OBJECTIVE = Reward
