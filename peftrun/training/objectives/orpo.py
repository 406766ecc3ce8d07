r"""Odds-ratio preference optimisation (Hong et al., 2024): supervised fine-tuning and preference in one
loss, with no reference model. With P(y|x) the answer's per-token mean log-probability, exponentiated,

    odds(y|x) = P / (1 - P),    log OR = log odds(y_c|x) - log odds(y_r|x)
              = (log P_c - log P_r) - (log(1 - P_c) - log(1 - P_r)),

    loss = NLL(x, y_c) - lambda * mean log sigmoid(log OR),

NLL the token cross-entropy of the whole chosen sequences, prompt and answer (averaged over their tokens), and
lambda = `preference.beta`, as in trl and the ORPO authors' code (trl#1516, kept on purpose in trl#2527); the
odds read the answers alone. One forward gives both: the chosen rows are scored on every token, their answers
picked out with a mask. Reported: nll_loss, log_odds_ratio, log_odds_chosen, rewards/chosen = lambda log P_c
(and rejected), rewards/accuracies, rewards/margins, logps/chosen and logps/rejected (the mean log P).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from peftrun.tasks import IGNORE_INDEX
from peftrun.training.objectives import StepResult
from peftrun.training.objectives.pairs import PairObjective, halves


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class ORPO(PairObjective):
    name = "orpo"

    def loss(self, model, batch):
        lam = self.recipe.preference.beta
        answers = batch["labels"]
        n = answers.shape[0] // 2
        whole = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        labels = torch.cat([whole[:n].to(answers.device), answers[n:]])
        seq_logps, seq_counts, logps, counts = self.answer_logps(
            model, batch, labels=labels, within=answers != IGNORE_INDEX
        )
        (sc, sr), (nc, nr) = halves(logps), halves(counts)
        mean_c, mean_r = sc / nc.clamp(min=1), sr / nr.clamp(min=1)
        nll = -halves(seq_logps)[0].sum() / halves(seq_counts)[0].sum().clamp(min=1)
        log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
        ratio = F.logsigmoid(log_odds)
        loss = nll - lam * ratio.mean()
        chosen_reward, rejected_reward = lam * mean_c.detach(), lam * mean_r.detach()
        metrics = {
            "nll_loss": float(nll.detach()),
            "log_odds_ratio": float(ratio.detach().mean()),
            "log_odds_chosen": float(log_odds.detach().mean()),
            "rewards/chosen": float(chosen_reward.mean()),
            "rewards/rejected": float(rejected_reward.mean()),
            "rewards/accuracies": float((chosen_reward > rejected_reward).float().mean()),
            "rewards/margins": float((chosen_reward - rejected_reward).mean()),
            "logps/chosen": float(mean_c.detach().mean()),
            "logps/rejected": float(mean_r.detach().mean()),
        }
        return StepResult(loss, metrics, weight=sc.shape[0])


OBJECTIVE = ORPO
