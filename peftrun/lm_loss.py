"""The causal-LM training loss in chunks, without the batch's full logits.

transformers computes a causal LM's loss as

    logits = h W^T + b                                  (N x V, then upcast to fp32)
    loss   = (1/D) * sum_{t: y_t != -100} [ logsumexp(logits_t) - logits_t[y_t] ]

with y the labels shifted one to the left and D the number of counted tokens (or `num_items_in_batch`).
Autograd then keeps the N x V logits, their log-softmax and, in the backward, their gradient: for a
SmolLM2-sized vocabulary (49,152) and a 4 x 256 batch that is 192 MiB each, more than all the activations
LoRA adds. Here the same sum runs over chunks of counted tokens only. Because the loss is the last thing
in the graph, each chunk's gradient is known at once,

    dloss/dlogits_t = (softmax(logits_t) - onehot(y_t)) / D,
    dloss/dh_t      = (dloss/dlogits_t) W,     dloss/dW += (dloss/dlogits_t)^T h_t,   dloss/db += sum_t ...

so the forward writes dloss/dh (the size of h) and keeps no logits; the backward only scales it by the
incoming gradient. Rows whose label is -100 (prompt tokens, padding, each sequence's last position) cost
nothing. The result equals transformers' loss and gradients up to the order of fp32 sums, except for a
batch with no counted token at all: 0 here (no gradient), NaN from transformers' mean over nothing.

It applies while training (grad enabled, model in train mode), and to evaluation that reads the loss alone
(PeftrunModel.loss_only: no logits of a held-out batch either), a causal LM whose forward is exactly
`lm_head(hidden)` then transformers' causal-LM loss, with a plain unsharded `nn.Linear` head; elsewhere
(eval, generation, ZeRO-3/FSDP-sharded heads, torch.compile, heads with soft-capping or logit scales)
the model runs as it is. The output then carries the loss and no logits.

Seq2seq LMs (T5, mT5, umT5, BART, mBART: `seq2seq_lm_forward`) take the same loss over the decoder's
positions, with the labels unshifted (the decoder reads them shifted right) and a plain mean over the counted
tokens, as their forward computes it. The encoder-decoder runs as it is up to the head, so what the forward
does to the decoder's last hidden state on the way (T5's d_model**-0.5 when the head is tied to the embedding)
is in the state the head's pre-hook sees; BART's and mBART's `final_logits_bias` buffer, added after the head,
joins the head's bias in the chunks. Soft-prompt methods that put virtual tokens in front of the decoder pass
labels already padded with -100 over them.
"""

from __future__ import annotations

import torch
from torch import nn

from peftrun.tasks import IGNORE_INDEX

# causal LMs whose forward is `logits = lm_head(last hidden state)` and whose loss is transformers'
# ForCausalLM loss, each checked against transformers in tests/test_lm_loss.py
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gpt2", "bloom", "opt", "gpt_neox", "phi"})
# config fields that change the logits after the head; a model that sets any keeps transformers' loss
_LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")
# seq2seq LMs whose logits are `lm_head(decoder's last hidden state, as the forward leaves it)`, plus a
# `final_logits_bias` buffer where the model has one, and whose loss is the plain token mean of
# CrossEntropyLoss(ignore_index=-100) over the unshifted labels; each checked in tests/test_lm_loss.py
SEQ2SEQ_MODEL_TYPES = frozenset({"t5", "mt5", "umt5", "bart", "mbart"})
# those whose forward turns the decoder's cache off when it is given labels (so must the chunked forward)
_NO_CACHE_WITH_LABELS = frozenset({"bart", "mbart"})
CHUNK_ELEMENTS = 1 << 23  # logits of one chunk: 8M fp32 values (32 MiB)
# ... but never fewer rows than this: each chunk reads the whole head weight, and a matmul of a few rows
# against a 250k-token vocabulary (mT5's 1 GB head) is bound by that read, not by its arithmetic
MIN_CHUNK_ROWS = 256


def chunk_rows(vocab: int) -> int:
    """Rows of one chunk for a head with `vocab` outputs."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)


def applies(model: nn.Module, kwargs: dict, *, seq2seq: bool = False, loss_only: bool = False) -> bool:
    """Whether `model(**kwargs)` may take its loss from `causal_lm_forward` (or with `seq2seq`, from
    `seq2seq_lm_forward`; see the module docstring). `loss_only`: the caller reads the loss and never the
    logits (evaluation of an LM's loss), so the chunks apply in eval mode and without gradients too."""
    if kwargs.get("labels") is None:
        return False
    if not loss_only and (not model.training or not torch.is_grad_enabled()):
        return False
    if seq2seq and (kwargs.get("return_dict") is False or not hasattr(model, "prepare_decoder_input_ids_from_labels")):
        return False
    return plain_head(model, SEQ2SEQ_MODEL_TYPES if seq2seq else MODEL_TYPES)


def plain_head(model: nn.Module, model_types: frozenset[str] = MODEL_TYPES) -> bool:
    """Whether the model's logits are exactly `lm_head(last hidden state)` with a whole, plain Linear head
    (for one of `model_types`)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in model_types:
        return False
    if any(getattr(config, field, None) for field in _LOGIT_CHANGES):
        return False
    if getattr(model, "_compiled_call_impl", None) is not None:
        return False
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    # ZeRO-3 partitions a parameter in place (ds_id); FSDP2 turns it into a DTensor
    return all(type(p) in (torch.Tensor, nn.Parameter) and not hasattr(p, "ds_id") for p in head.parameters())


def _run_to_head(model: nn.Module, head: nn.Module, *args, **kwargs):
    """`model(*args, **kwargs)` with the output head computing nothing: (the output, the head's input)."""
    seen: list[torch.Tensor] = []

    def keep_hidden(module, inputs):
        seen.append(inputs[0])
        return (inputs[0][..., :0, :],)  # the head then computes no logits at all

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        out = model(*args, **kwargs)
    finally:
        handle.remove()
    if len(seen) != 1:  # a model whose forward is not what MODEL_TYPES / SEQ2SEQ_MODEL_TYPES promise
        raise RuntimeError(f"the output head ran {len(seen)} times in one forward")
    return out, seen[0]


def causal_lm_forward(model: nn.Module, *args, labels: torch.Tensor, **kwargs):
    """`model(*args, labels=labels, **kwargs)` with the loss from `chunked_loss`; the output has no logits."""
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    head = model.get_output_embeddings()
    out, hidden = _run_to_head(model, head, *args, **kwargs)
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    out.loss = chunked_loss(hidden, head, shift_labels.to(hidden.device), num_items, ignore_index)
    out.logits = None
    return out


def seq2seq_lm_forward(model: nn.Module, *args, labels: torch.Tensor, **kwargs):
    """`model(*args, labels=labels, **kwargs)` for a seq2seq LM (SEQ2SEQ_MODEL_TYPES) with the loss from
    `chunked_loss`; the output has no logits. The model runs without labels: the decoder's input is the labels
    shifted right as the model's own forward would shift them (unless decoder inputs are given)."""
    if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels)
    if model.config.model_type in _NO_CACHE_WITH_LABELS:
        kwargs["use_cache"] = False
    head = model.get_output_embeddings()
    out, hidden = _run_to_head(model, head, *args, **kwargs)
    extra = getattr(model, "final_logits_bias", None)  # (1, V): added to the logits after the head
    out.loss = chunked_loss(hidden, head, labels.to(hidden.device), None, IGNORE_INDEX, extra_bias=extra)
    out.logits = None
    return out


def chunked_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    num_items: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    extra_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (or sum / num_items) cross-entropy of `head(hidden) + extra_bias` against `targets`, chunk by
    chunk."""
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.is_meta:  # `peftrun estimate`: every row counted, the most this can keep
        rows = torch.arange(targets.numel(), device=hidden.device)
    else:
        rows = (targets != ignore_index).nonzero().squeeze(1)
    if num_items is None or hidden.is_meta:
        denominator = float(max(rows.numel(), 1))
    else:
        denominator = float(num_items.item() if torch.is_tensor(num_items) else num_items)
    chunk = chunk_rows(head.out_features)
    bias = head.bias
    if extra_bias is not None:
        extra_bias = extra_bias.reshape(-1).to(head.weight.dtype)
        bias = extra_bias if bias is None else bias + extra_bias
    return _ChunkedCrossEntropy.apply(hidden2d, head.weight, bias, targets, rows, denominator, chunk)


def _through_head(grad, h, idx, weight, grad_hidden, grad_weight, grad_bias) -> None:
    """Accumulate a chunk's logit gradient `grad` (rows `idx`, hidden states `h`) into the gradients of the
    hidden states, the head's weight and its bias. Under autocast the matmuls run in its dtype, as
    transformers' backward would."""
    grad_low = grad.to(h.dtype)
    if grad_hidden is not None:
        grad_hidden.index_copy_(0, idx, (grad_low @ weight.to(h.dtype)).to(grad_hidden.dtype))
    if grad_weight is not None:
        grad_weight += (grad_low.T @ h).float()
    if grad_bias is not None:
        grad_bias += grad.sum(0)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, denominator, chunk):
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk):
            idx = rows[start : start + chunk]
            h = hidden.index_select(0, idx)
            y = targets.index_select(0, idx)
            logits = nn.functional.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            grad[torch.arange(idx.numel(), device=grad.device), y] -= 1.0
            grad.div_(denominator)
            _through_head(grad, h, idx, weight, grad_hidden, grad_weight, grad_bias)
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight, grad_bias) if t is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if has else None for has in ctx.has]
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


# ------------------------------------------------------------------ per-sequence log-probabilities


def _row_sums(values: torch.Tensor, owner: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.zeros(rows, dtype=torch.float32, device=values.device).index_add(0, owner, values)


def sequence_logps(
    run_model, base: nn.Module, labels: torch.Tensor, *, chunked: bool, within: torch.Tensor | None = None, **inputs
):
    """Summed log-probabilities of each row's labelled tokens, and how many there are: (logps[B], counts[B]);
    with `within` (a boolean mask shaped like `labels`, marking some of the labelled tokens) also the sums and
    counts over those tokens alone, from the same forward: (logps, counts, within_logps, within_counts).
    See `token_logps`."""
    token, owner, rows, part = token_logps(run_model, base, labels, chunked=chunked, within=within, **inputs)
    logps, counts = _row_sums(token, owner, rows), _row_sums(torch.ones_like(token), owner, rows)
    if part is None:
        return logps, counts
    return logps, counts, _row_sums(token[part], owner[part], rows), _row_sums(torch.ones_like(token[part]), owner[part], rows)


def token_logps(
    run_model, base: nn.Module, labels: torch.Tensor, *, chunked: bool, within: torch.Tensor | None = None,
    temperature: float = 1.0, **inputs
):
    """log p of every labelled token under the model: (logp[T], the row of each[T], rows B, and where `within`
    marks them, a boolean mask over the T tokens, else None).

    `run_model(**inputs)` runs the (adapted) model; `base` is the transformers model whose head it calls.
    Preference and policy objectives (DPO, ORPO, GRPO) need log p(answer | prompt) = sum_t log softmax(h_t W^T)
    [y_{t+1}], a function of every logit of the answer. With `chunked` (and a plain head, `plain_head`) no
    N x V logits are kept: the forward computes the values chunk by chunk, with

        d logp_t / d h_t = (onehot(y_t) - softmax(h_t W^T)) W,   d logp_t / dW = (onehot - softmax)^T h_t,

    scaled in the backward by the incoming gradient of that token (the first written by the forward when the
    head is frozen, else both recomputed chunk by chunk in the backward). Otherwise the model's own logits are
    read. Soft-prompt methods prepend virtual tokens: the labels are aligned to the end of the sequence. A `temperature` T reads
    log softmax(logits / T), the distribution that sampling at T draws from (GRPO's policy and reference).
    """
    head = base.get_output_embeddings()
    use_chunks = chunked and plain_head(base)
    seen: list[torch.Tensor] = []

    def keep_hidden(module, args):
        seen.append(args[0])
        return (args[0][..., :0, :],)

    handle = head.register_forward_pre_hook(keep_hidden) if use_chunks else None
    try:
        out = run_model(**inputs)
    finally:
        if handle is not None:
            handle.remove()
    states = seen[0] if use_chunks else out.logits
    virtual = states.shape[1] - labels.shape[1]
    if virtual > 0:  # virtual tokens in front
        labels = nn.functional.pad(labels, (virtual, 0), value=IGNORE_INDEX)
        within = nn.functional.pad(within, (virtual, 0), value=False) if within is not None else None
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(states.device)
    flat_targets = targets.reshape(-1)
    rows = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    if use_chunks:
        chunk = chunk_rows(head.out_features)
        flat = states.reshape(-1, states.shape[-1])
        bias = head.bias
        if temperature != 1.0:  # (h W^T + b) / T = (h / T) W^T + b / T
            flat, bias = flat / temperature, (bias / temperature if bias is not None else None)
        token = _ChunkedTokenLogps.apply(flat, head.weight, bias, flat_targets, rows, chunk)
    else:
        flat = states.reshape(-1, states.shape[-1]).index_select(0, rows).float() / temperature
        token = flat.log_softmax(-1).gather(1, flat_targets[rows][:, None]).squeeze(1)
    part = None
    if within is not None:
        part = nn.functional.pad(within, (0, 1), value=False)[:, 1:].reshape(-1).to(states.device)[rows]
    return token, rows // targets.shape[1], targets.shape[0], part


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p of each counted token, chunk by chunk. With a frozen head (the adapter methods' case) the forward
    also writes each token's d logp_t / d h_t = (onehot(y_t) - softmax_t) W, the size of h, so the backward
    only scales it by the incoming gradient and never computes the logits again; a trained head's weight
    gradient sums over tokens weighted by that gradient, so then the backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        early = need_h and not need_w and not (need_b and bias is not None)
        out = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        per_token = hidden.new_empty(rows.numel(), hidden.shape[-1]) if early else None
        for start in range(0, rows.numel(), chunk):
            idx = rows[start : start + chunk]
            h = hidden.index_select(0, idx)
            logits = nn.functional.linear(h, weight, bias).float()
            y = targets.index_select(0, idx)
            lse = torch.logsumexp(logits, -1)
            out[start : start + idx.numel()] = logits.gather(1, y[:, None]).squeeze(1) - lse
            if early:
                grad = logits.sub_(lse[:, None]).exp_().neg_()  # -softmax, in the logits' memory
                grad[torch.arange(idx.numel(), device=grad.device), y] += 1.0
                per_token[start : start + idx.numel()] = grad.to(h.dtype) @ weight.to(h.dtype)
        if early:
            ctx.save_for_backward(per_token, rows)
            ctx.hidden_shape = hidden.shape
        else:
            ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets, rows)
        ctx.early, ctx.has_bias, ctx.chunk = early, bias is not None, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.early:
            per_token, rows = ctx.saved_tensors
            grad_hidden = per_token.new_zeros(ctx.hidden_shape)
            grad_hidden.index_copy_(0, rows, per_token * grad_out[:, None].to(per_token.dtype))
            return grad_hidden, None, None, None, None, None
        hidden, weight, bias, targets, rows = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        for start in range(0, rows.numel(), ctx.chunk):
            idx = rows[start : start + ctx.chunk]
            h = hidden.index_select(0, idx)
            logits = nn.functional.linear(h, weight, bias).float()
            grad = logits.softmax(-1).neg_()  # d logp / d logits = onehot - softmax
            grad[torch.arange(idx.numel(), device=grad.device), targets.index_select(0, idx)] += 1.0
            grad.mul_(grad_out[start : start + idx.numel(), None])
            _through_head(grad, h, idx, weight, grad_hidden, grad_weight, grad_bias)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None
