"""What the preference objectives share: chosen/rejected pairs as data, and the answers' log-probabilities.

A batch holds the chosen rows then the rejected rows (peftrun.preference.PairCollator), so one forward scores
both halves. log p(answer | prompt) is summed over the answer's tokens without the full logits where the head
allows it (peftrun.lm_loss.sequence_logps); the reference model is the same base with the adapter switched off,
so no second copy of the model is ever in memory.
"""

from __future__ import annotations

import torch

from peftrun.data import model_inputs
from peftrun.lm_loss import sequence_logps
from peftrun.preference import BadRows, PairCollator, tokenize_pairs
from peftrun.tasks import CAUSAL_LM
from peftrun.training.objectives import Data, Objective


class PairObjective(Objective):
    """Data for every pair objective: the pairs of the train and eval splits, bad rows counted."""

    def data(self, tokenizer, splits, label_names):
        causal = self.recipe.model.task_type == CAUSAL_LM
        notes, rows = [], {}
        for split in ("train", "eval"):
            bad = BadRows(self.recipe.data.bad_rows)
            rows[split] = [  # each dataset of data.datasets with its own data section
                pair for ds, cfg in splits.pieces(split, self.recipe.data)
                for pair in tokenize_pairs(ds, cfg, tokenizer, causal=causal, bad=bad)
            ]
            if bad.line(split):
                notes.append(bad.line(split))
        from peftrun.errors import PeftrunError

        if not rows["train"]:
            raise PeftrunError("no preference pair is left to train on", where="data", hint="; ".join(notes) or None)
        if not rows["eval"]:
            raise PeftrunError("no preference pair is left to evaluate on", where="data", hint="; ".join(notes) or None)
        collate = PairCollator(tokenizer.pad_token_id)
        notes.insert(0, f"preference pairs: {len(rows['train'])} train, {len(rows['eval'])} eval")
        return Data(rows["train"], rows["eval"], collate, collate, notes)

    def answer_logps(
        self, model, batch, *, reference: bool = False, labels: torch.Tensor | None = None,
        within: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Summed log-probabilities of each row's answer and its token count, by the adapted model, or with
        `reference` by the base alone (adapter off, no gradient). `labels` other than the batch's answers and a
        `within` mask: see lm_loss.sequence_logps."""
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        labels = batch["labels"] if labels is None else labels
        peft_model = self.peft_model
        base = peft_model.model
        kwargs = {"chunked": peft_model.chunked_loss, "within": within, **inputs}
        if reference:
            with torch.no_grad(), peft_model.disable_adapters():
                return sequence_logps(peft_model, base, labels, **kwargs)
        return sequence_logps(model, base, labels, **kwargs)

    def report(self, result):
        return [f"{k}={v:.6f}" for k, v in result.metrics.items() if k != "eval_loss"]


def halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rows of a pair batch."""
    n = t.shape[0] // 2
    return t[:n], t[n:]
