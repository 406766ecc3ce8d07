"""Rewards for policy optimisation (GRPO): functions from (prompt, completion) texts to numbers, from simple
rules or from a saved peftrun classifier, combined with weights.

    regex       1 where the completion matches `pattern` (re.search), else 0
    length      1 where the completion's length in characters is within [min_chars, max_chars], else 0
    classifier  a saved SEQ_CLS adapter folder: P(label) from its softmax (the seed's sentiment example:
                P(positive) of an SST-2 classifier), or the score of a one-output reward model

The total is sum_i weight_i * reward_i; each reward is also reported on its own (`rewards/<name>`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from peftrun.errors import PeftrunError

RewardFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


def regex_reward(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)

    def score(prompts, completions):
        return torch.tensor([1.0 if compiled.search(c) else 0.0 for c in completions])

    return score


def length_reward(min_chars: int, max_chars: int) -> RewardFn:
    def score(prompts, completions):
        return torch.tensor([1.0 if min_chars <= len(c) <= max_chars else 0.0 for c in completions])

    return score


class ClassifierReward:
    """A saved sequence-classification adapter as a reward: P(label), or a one-output model's score.
    Loaded once, frozen, in eval mode; scores in batches without gradients. The class names are those the
    classifier was trained with (its saved recipe's data.label_names, as `peftrun predict` reads them), else
    its config's id2label."""

    def __init__(self, folder: str, label: str | None, with_prompt: bool, batch_size: int = 16):
        from peftrun.io.loading import load_adapted, saved_section

        if not Path(folder).is_dir():
            raise PeftrunError("reward classifier adapter folder not found", where=f"grpo.rewards ({folder})")
        self.model, self.tokenizer = load_adapted(folder)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        labels = getattr(self.model.model.config, "id2label", None) or {}
        names = [str(labels[i]) for i in sorted(labels)] if labels else []
        trained = saved_section(folder, "data").get("label_names")
        if isinstance(trained, list) and len(trained) == self.model.model.config.num_labels:
            names = [str(n) for n in trained]
        outputs = self.model.model.config.num_labels
        if outputs == 1:
            self.index = None  # a reward model: its raw score
        elif label is None or label not in names:
            raise PeftrunError(
                f"the classifier's labels are {names}: name the one to reward", where="grpo.rewards.label"
            )
        else:
            self.index = names.index(label)
        self.with_prompt = with_prompt
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions):
        texts = [p + c for p, c in zip(prompts, completions)] if self.with_prompt else list(completions)
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True, max_length=512,
                return_tensors="pt",
            )
            logits = self.model(**enc).logits.float()
            scores.append(logits[:, 0] if self.index is None else logits.softmax(-1)[:, self.index])
        return torch.cat(scores)


def build_rewards(specs) -> list[tuple[str, float, RewardFn]]:
    """(name, weight, function) for each `grpo.rewards` entry of a recipe."""
    out = []
    for i, spec in enumerate(specs):
        if spec.type == "regex":
            fn = regex_reward(spec.pattern)
        elif spec.type == "length":
            fn = length_reward(spec.min_chars, spec.max_chars)
        else:
            fn = ClassifierReward(spec.adapter, spec.label, spec.with_prompt)
        out.append((spec.name or f"{spec.type}{i}", spec.weight, fn))
    return out
