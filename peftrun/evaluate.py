"""Evaluation per task type: loss, accuracy/F1, entity F1, perplexity, and generated-label accuracy.

Generated answers are compared with the reference text by exact match after stripping whitespace, as
the seed's `accuracy=` line does. When the recipe names its label strings (a verbaliser), decoding is
constrained to them by default (`data.constrain_labels`), so every prediction is a valid label.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from peftrun import metrics
from peftrun.data import model_inputs
from peftrun.generation import GenerationOptions, generate_texts
from peftrun.prompts import label_strings
from peftrun.tasks import CAUSAL_LM, IGNORE_INDEX, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, has_label_names, is_lm


@dataclass
class EvalResult:
    metrics: dict[str, float]
    preds: list = field(default_factory=list)
    refs: list = field(default_factory=list)


def _gather(accelerator, items: list) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return items
    return accelerator.gather_for_metrics(items, use_gather_object=True)


class LabelConstraint:
    """`prefix_allowed_tokens_fn` for generate(): each row may only spell one of the label strings,
    token by token as training tokenised them, then end with EOS."""

    def __init__(self, tokenizer, labels: list[str], task_type: str):
        self.eos = tokenizer.eos_token_id
        self.sequences: list[list[int]] = []
        for label in labels:
            if task_type == SEQ_2_SEQ_LM:
                ids = list(tokenizer(text_target=label)["input_ids"])
            else:
                ids = list(tokenizer(label, add_special_tokens=False)["input_ids"])
            if self.eos is not None and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
            self.sequences.append(ids)
        self.max_new_tokens = max(len(s) for s in self.sequences)
        self.start = 0  # where the generated part begins in the sequences generate() passes in

    def __call__(self, batch_id: int, sequence: torch.Tensor) -> list[int]:
        done = sequence[self.start :].tolist()
        n = len(done)
        allowed = {s[n] for s in self.sequences if len(s) > n and s[:n] == done}
        return sorted(allowed) if allowed else [self.eos if self.eos is not None else 0]


def label_options(tokenizer, data_cfg) -> GenerationOptions:
    """How eval and predict decode answers: greedy, up to the answers' length, stopping at the tokenizer's
    EOS (which training appended to every answer); the model's own repetition penalty, if any."""
    return GenerationOptions(
        max_new_tokens=data_cfg.target_max_length, repetition_penalty=None, eos_token_id=tokenizer.eos_token_id
    )


def make_constraint(tokenizer, data_cfg, task_type: str) -> LabelConstraint | None:
    labels = label_strings(data_cfg)
    if not (labels and data_cfg.constrain_labels) or not is_lm(task_type):
        return None
    return LabelConstraint(tokenizer, labels, task_type)


def _target_tokens(labels: torch.Tensor, task_type: str) -> int:
    """How many tokens the LM loss averaged over (causal LMs predict token t+1 from t)."""
    if task_type == CAUSAL_LM:
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def wants_generation(task_type: str, data_cfg) -> bool:
    """Seq2seq always generates its answer; a causal LM does when its answers are labels."""
    return task_type == SEQ_2_SEQ_LM or (task_type == CAUSAL_LM and bool(label_strings(data_cfg)))


@torch.no_grad()
def evaluate(
    model,
    loader,
    *,
    task_type: str,
    tokenizer,
    label_names: list[str] | None,
    data_cfg,
    accelerator=None,
    generate: bool | None = None,
) -> EvalResult:
    """Loss and the task's metrics over `loader`. LM losses are averaged per target token, so
    eval_ppl is the perplexity of the answers; classification losses per row."""
    was_training = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    if generate is None:
        generate = wants_generation(task_type, data_cfg)
    constraint = make_constraint(tokenizer, data_cfg, task_type) if generate else None
    options = label_options(tokenizer, data_cfg)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    loss_sums, weights, preds, refs = [], [], [], []
    # an LM's evaluation reads the loss alone: no held-out batch's full logits (lm_loss)
    loss_only = is_lm(task_type) and hasattr(unwrapped, "reading_loss_only")
    for batch in loader:
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        with unwrapped.reading_loss_only() if loss_only else contextlib.nullcontext():
            out = model(**inputs)
        if has_label_names(task_type):
            weight = batch["input_ids"].shape[0]
        else:
            weight = _target_tokens(batch["labels"], task_type)
        loss_sums.append(out.loss.detach().float().cpu() * weight)
        weights.append(weight)
        if task_type == SEQ_CLS:
            preds += out.logits.argmax(-1).tolist()
            refs += batch["labels"].tolist()
        elif task_type == TOKEN_CLS:
            for p_row, l_row in zip(out.logits.argmax(-1).tolist(), batch["labels"].tolist()):
                keep = [i for i, lab in enumerate(l_row) if lab != IGNORE_INDEX]
                preds.append([label_names[p_row[i]] for i in keep])
                refs.append([label_names[l_row[i]] for i in keep])
        elif generate:
            preds += generate_texts(
                unwrapped, tokenizer, batch, options=options, constraint=constraint, task_type=task_type
            )
            refs += list(batch["reference"])
    sums = torch.stack([torch.stack(loss_sums).sum(), torch.tensor(float(sum(weights)))])
    if accelerator is not None and accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    preds, refs = _gather(accelerator, preds), _gather(accelerator, refs)
    eval_loss = (sums[0] / sums[1].clamp(min=1)).item()
    result: dict[str, float] = {"eval_loss": eval_loss}
    if task_type == SEQ_CLS:
        result["accuracy"] = metrics.accuracy(preds, refs)
        binary = len(label_names or []) == 2
        result["f1"] = metrics.f1(preds, refs, average="binary" if binary else "macro")
        preds = [label_names[p] for p in preds]
        refs = [label_names[r] for r in refs]
    elif task_type == TOKEN_CLS:
        result["entity_f1"] = metrics.entity_f1(preds, refs)
        flat_p = [t for row in preds for t in row]
        flat_r = [t for row in refs for t in row]
        result["token_accuracy"] = metrics.accuracy(flat_p, flat_r)
    else:
        result["eval_ppl"] = metrics.perplexity(eval_loss)
        if generate:
            result["accuracy"] = metrics.accuracy(preds, refs)
            valid = label_strings(data_cfg)
            if valid:
                result["valid_label_rate"] = metrics.accuracy(
                    [p in valid for p in preds], [True] * len(preds)
                )
    if was_training:
        model.train()
    return EvalResult(result, preds, refs)


def report_lines(result: EvalResult, refs_name: str = "references") -> list[str]:
    """The seed's log lines: `accuracy=...`, `eval_preds[:10]=[...]` and the first ten references."""
    lines = [
        f"{key}={result.metrics[key] * 100:.2f}"
        for key in ("accuracy", "f1", "entity_f1")
        if key in result.metrics
    ]
    if result.preds:
        lines.append(f"eval_preds[:10]={result.preds[:10]!r}")
        lines.append(f"{refs_name}[:10]={result.refs[:10]!r}")
    return lines
