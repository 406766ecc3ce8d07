r"""Group-relative policy optimisation (Shao et al., 2024, DeepSeekMath), on prompts, with the adapter as the
policy and the same base with the adapter off as the reference.

For each prompt x, G completions y_1..y_G are sampled from the policy (adapter on, no gradient) and scored by
the recipe's rewards R (peftrun/rewards.py). Advantages are normalised within the group,

    A_i = (R_i - mean_j R_j) / (std_j R_j + 1e-4),

and every completion token t of y_i is trained with the clipped objective and a KL penalty to the reference,

    rho_{i,t} = pi(y_{i,t} | x, y_{i,<t}) / pi_old(...)         (one update per sample: pi_old = pi, detached)
    (pi and the reference read at the sampling temperature T: log softmax(logits / T))
    loss_{i,t} = -min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + beta KL_{i,t},
    KL_{i,t} = exp(ref - logp) - (ref - logp) - 1               (the unbiased k3 estimator),

with, by default (grpo.use_bias_correction_kl, trl's name and default), beta rho KL in place of beta KL: rho is 1
in value, but its gradient adds KL * d log pi, the score-function part of d E_{y~pi}[KL] that the k3 estimator
alone leaves out (DeepSeek-V3.2's unbiased KL gradient). Off, the loss is the original paper's.

averaged over each completion's tokens, then over completions. Held-out prompts are answered once each
(greedily by default) and reported as eval_reward and eval_rewards/<name>.
"""

from __future__ import annotations

import torch

from peftrun.errors import PeftrunError
from peftrun.lm_loss import token_logps
from peftrun.preference import BadRows, PromptCollator, tokenize_prompts
from peftrun.tasks import IGNORE_INDEX
from peftrun.training.objectives import Data, Objective, StepResult


class GRPO(Objective):
    name = "grpo"

    def __init__(self, recipe):
        super().__init__(recipe)
        self.rewards = None  # built on first use: a classifier reward loads a model

    def data(self, tokenizer, splits, label_names):
        notes, rows = [], {}
        for split in ("train", "eval"):
            bad = BadRows(self.recipe.data.bad_rows)
            rows[split] = [  # each dataset of data.datasets with its own data section
                prompt for ds, cfg in splits.pieces(split, self.recipe.data)
                for prompt in tokenize_prompts(ds, cfg, tokenizer, bad=bad)
            ]
            if bad.line(split):
                notes.append(bad.line(split))
            if not rows[split]:
                raise PeftrunError(f"no prompt is left in the {split} split", where="data")
        notes.insert(0, f"prompts: {len(rows['train'])} train, {len(rows['eval'])} eval")
        collate = PromptCollator(tokenizer.pad_token_id)
        return Data(rows["train"], rows["eval"], collate, collate, notes)

    # -- sampling and scoring --------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch, *, group: int, greedy: bool):
        """Completions of every prompt (`group` each): ids, the sequence batch to score, and the texts."""
        cfg, peft_model, tok = self.recipe.grpo, self.peft_model, self.tokenizer
        device = next(peft_model.parameters()).device
        prompt_ids = batch["prompt_ids"].to(device).repeat_interleave(group, 0)
        prompt_mask = batch["prompt_attention_mask"].to(device).repeat_interleave(group, 0)
        was_training = peft_model.training
        peft_model.eval()  # no dropout while sampling
        try:
            out = peft_model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=cfg.max_new_tokens,
                do_sample=not greedy, temperature=cfg.temperature if not greedy else None,
                top_p=cfg.top_p if not greedy else None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
        finally:
            peft_model.train(was_training)
        completion = out[:, prompt_ids.shape[1] :]
        # a completion ends at its first EOS (kept: the model learns to stop); what follows is padding
        is_eos = completion == tok.eos_token_id if tok.eos_token_id is not None else torch.zeros_like(completion, dtype=torch.bool)
        after = (is_eos.cumsum(1) - is_eos.long()) > 0
        completion_mask = (~after).long()
        texts = tok.batch_decode(completion.masked_fill(after, tok.pad_token_id), skip_special_tokens=True)
        prompts = [t for t in batch["prompt_text"] for _ in range(group)]
        return completion, completion_mask, prompts, texts, prompt_ids, prompt_mask

    def score(self, prompts, texts) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted total reward of each completion, and each reward's mean."""
        if self.rewards is None:
            from peftrun.rewards import build_rewards

            self.rewards = build_rewards(self.recipe.grpo.rewards)
        total = torch.zeros(len(texts))
        means = {}
        for name, weight, fn in self.rewards:
            values = fn(prompts, texts).float().cpu()
            total += weight * values
            means[f"rewards/{name}"] = float(values.mean())
        return total, means

    # -- the objective ---------------------------------------------------------------------------
    def loss(self, model, batch):
        cfg = self.recipe.grpo
        group = cfg.num_generations
        completion, completion_mask, prompts, texts, prompt_ids, prompt_mask = self.sample(batch, group=group, greedy=False)
        rewards, means = self.score(prompts, texts)
        grouped = rewards.view(-1, group)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)

        input_ids = torch.cat([prompt_ids, completion], 1)
        attention = torch.cat([prompt_mask, completion_mask], 1)
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), completion.masked_fill(completion_mask == 0, IGNORE_INDEX)], 1)
        inputs = {
            "input_ids": input_ids, "attention_mask": attention,
            "position_ids": (attention.cumsum(1) - 1).clamp(min=0),  # left-padded prompts, as generate saw them
        }
        base, chunked = self.peft_model.model, self.peft_model.chunked_loss
        # both at the sampling temperature: the distribution the completions were drawn from
        how = {"chunked": chunked, "temperature": cfg.temperature}
        logp, owner, rows, _ = token_logps(model, base, labels, **how, **inputs)
        with torch.no_grad(), self.peft_model.disable_adapters():
            ref, _, _, _ = token_logps(self.peft_model, base, labels, **how, **inputs)
        adv = advantages.to(logp.device)[owner]
        ratio = torch.exp(logp - logp.detach())
        clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon)
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1
        penalty = kl * ratio if cfg.use_bias_correction_kl else kl
        per_token = -torch.minimum(ratio * adv, clipped * adv) + cfg.beta * penalty
        counts = torch.zeros(rows, device=logp.device).index_add(0, owner, torch.ones_like(logp)).clamp(min=1)
        per_sequence = torch.zeros(rows, device=logp.device).index_add(0, owner, per_token) / counts
        metrics = {
            "reward": float(rewards.mean()),
            "reward_std": float(grouped.std(1).mean()),
            "kl": float((torch.zeros(rows, device=logp.device).index_add(0, owner, kl.detach()) / counts).mean()),
            "completion_length": float(completion_mask.sum(1).float().mean()),
            **means,
        }
        return StepResult(per_sequence.mean(), metrics, weight=len(batch["prompt_text"]))

    def evaluate(self, model, loader, accelerator):
        """Mean reward of one completion per held-out prompt (greedy unless grpo.eval_greedy is false)."""
        from peftrun.evaluate import EvalResult

        sums: dict[str, float] = {}
        count = 0
        previews: list[str] = []
        for batch in loader:
            _, _, prompts, texts, _, _ = self.sample(batch, group=1, greedy=self.recipe.grpo.eval_greedy)
            rewards, means = self.score(prompts, texts)
            n = len(texts)
            for key, value in {"reward": float(rewards.mean()), **means}.items():
                sums[key] = sums.get(key, 0.0) + value * n
            count += n
            previews += texts
        keys = sorted(sums)
        vector = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            vector = accelerator.reduce(vector.to(accelerator.device), reduction="sum").cpu()
        total = max(float(vector[-1]), 1.0)
        metrics = {f"eval_{k}": float(v) / total for k, v in zip(keys, vector[:-1])}
        metrics["eval_loss"] = -metrics["eval_reward"]  # what a lower-is-better consumer of eval_loss reads
        return EvalResult(metrics, preds=previews[:10])

    def report(self, result):
        lines = [f"{k}={v:.6f}" for k, v in result.metrics.items() if k != "eval_loss"]
        if result.preds:
            lines.append(f"eval_completions[:3]={result.preds[:3]!r}")
        return lines


OBJECTIVE = GRPO
