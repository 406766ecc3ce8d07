r"""Direct preference optimisation (Rafailov et al., 2023) with the reference = the base model, adapter off.

With pi the adapted model, ref the base, and per pair the log-ratios of the answers' summed log-probabilities

    h = [log pi(y_c|x) - log ref(y_c|x)] - [log pi(y_r|x) - log ref(y_r|x)],

    sigmoid (DPO):  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)    (eps: label smoothing)
    ipo (IPO, Azar et al., 2023, with trl's per-token averaging of each answer's log-ratio):
                    loss = (h_c / |y_c| - h_r / |y_r| - 1 / (2 beta))^2

Reported with trl's names: rewards/chosen = beta (log pi - log ref)(y_c) (likewise rejected), rewards/margins,
rewards/accuracies (chosen reward above the rejected one), logps/chosen, logps/rejected.
"""

from __future__ import annotations

from torch.nn import functional as F

from peftrun.training.objectives import StepResult
from peftrun.training.objectives.pairs import PairObjective, halves


class DPO(PairObjective):
    name = "dpo"

    def loss(self, model, batch):
        cfg = self.recipe.preference
        logps, counts = self.answer_logps(model, batch)
        ref_logps, _ = self.answer_logps(model, batch, reference=True)
        (pc, pr), (rc, rr), (nc, nr) = halves(logps), halves(ref_logps), halves(counts)
        chosen_ratio, rejected_ratio = pc - rc, pr - rr
        if cfg.loss_type == "ipo":
            delta = chosen_ratio / nc.clamp(min=1) - rejected_ratio / nr.clamp(min=1)
            losses = (delta - 1 / (2 * cfg.beta)) ** 2
        else:
            h = cfg.beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - cfg.label_smoothing) * F.logsigmoid(h) - cfg.label_smoothing * F.logsigmoid(-h)
        chosen_reward, rejected_reward = cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()
        metrics = {
            "rewards/chosen": float(chosen_reward.mean()),
            "rewards/rejected": float(rejected_reward.mean()),
            "rewards/accuracies": float((chosen_reward > rejected_reward).float().mean()),
            "rewards/margins": float((chosen_reward - rejected_reward).mean()),
            "logps/chosen": float(pc.detach().mean()),
            "logps/rejected": float(pr.detach().mean()),
        }
        return StepResult(losses.mean(), metrics, weight=pc.shape[0])


OBJECTIVE = DPO
