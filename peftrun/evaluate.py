"""Evaluation per task type: loss, accuracy/F1, entity F1, perplexity, and generated-label accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from peftrun import metrics
from peftrun.data import IGNORE_INDEX, model_inputs


@dataclass
class EvalResult:
    metrics: dict[str, float]
    preds: list = field(default_factory=list)
    refs: list = field(default_factory=list)


def _gather(accelerator, items: list) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return items
    return accelerator.gather_for_metrics(items, use_gather_object=True)


def generate_texts(model, batch: dict[str, Any], tokenizer, task_type: str, max_new_tokens: int) -> list[str]:
    """Greedy decoding of each row's answer (prompt only, for causal LMs)."""
    if task_type == "CAUSAL_LM":
        ids, mask = batch["prompt_ids"], batch["prompt_attention_mask"]
    else:
        ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = {"task_ids": batch["task_ids"]} if "task_ids" in batch else {}  # multitask prompts
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    if task_type == "CAUSAL_LM":
        out = out[:, ids.shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


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
    model.eval()
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    if generate is None:
        generate = task_type == "SEQ_2_SEQ_LM" or (task_type == "CAUSAL_LM" and bool(data_cfg.verbalizer))
    losses, preds, refs = [], [], []
    for batch in loader:
        out = model(**model_inputs(batch))
        loss = out.loss.detach().float()
        n = batch["input_ids"].shape[0]
        losses.append(loss.repeat(n))
        if task_type == "SEQ_CLS":
            preds += out.logits.argmax(-1).tolist()
            refs += batch["labels"].tolist()
        elif task_type == "TOKEN_CLS":
            for p_row, l_row in zip(out.logits.argmax(-1).tolist(), batch["labels"].tolist()):
                keep = [i for i, lab in enumerate(l_row) if lab != IGNORE_INDEX]
                preds.append([label_names[p_row[i]] for i in keep])
                refs.append([label_names[l_row[i]] for i in keep])
        elif generate:
            preds += generate_texts(unwrapped, batch, tokenizer, task_type, data_cfg.target_max_length)
            refs += list(batch["reference"])
    loss_all = torch.cat(losses)
    if accelerator is not None and accelerator.num_processes > 1:
        loss_all = accelerator.gather_for_metrics(loss_all)
    preds, refs = _gather(accelerator, preds), _gather(accelerator, refs)
    eval_loss = loss_all.mean().item()
    result: dict[str, float] = {"eval_loss": eval_loss}
    if task_type == "SEQ_CLS":
        result["accuracy"] = metrics.accuracy(preds, refs)
        result["f1"] = metrics.f1(preds, refs, average="binary" if len(label_names or []) == 2 else "macro")
        preds = [label_names[p] for p in preds]
        refs = [label_names[r] for r in refs]
    elif task_type == "TOKEN_CLS":
        result["entity_f1"] = metrics.entity_f1(preds, refs)
        flat_p = [t for row in preds for t in row]
        flat_r = [t for row in refs for t in row]
        result["token_accuracy"] = metrics.accuracy(flat_p, flat_r)
    else:
        result["eval_ppl"] = metrics.perplexity(eval_loss)
        if generate:
            result["accuracy"] = metrics.accuracy(preds, refs)
            if data_cfg.verbalizer:
                valid = set(data_cfg.verbalizer.values())
                result["valid_label_rate"] = sum(p in valid for p in preds) / max(len(preds), 1)
    model.train()
    return EvalResult(result, preds, refs)
