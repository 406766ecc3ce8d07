r"""`peftrun estimate`: the memory a recipe needs, from its architecture alone (meta device, no weights).

One formula for every architecture, in bytes. N is the number of parameters, N_t the trainable ones.

    W  weights      Σ numel(p) · bytes(p): the base in model.dtype, adapter tensors in fp32 (peftrun keeps
                    them fp32); full fine-tuning trains every weight, so it counts them all in fp32
    G  gradients    4 · N_t                        (trainable tensors are fp32)
    O  optimizer    8 · N_t                        (AdamW's two moments in fp32; the fused kernel that
                                                    peftrun uses needs no per-step temporaries)
    A  activations  the bytes autograd saves for backward in one forward pass at the recipe's batch size,
                    sequence length (data.max_length) and, for seq2seq, target length (data.target_max_length),
                    counted exactly on the meta device: a saved-tensor hook sees every tensor kept for
                    backward; each storage counts once and the weights themselves not at all. With
                    gradient checkpointing: what is saved outside the checkpointed blocks, plus each block's
                    input, plus the largest block's own saved tensors (recomputed one block at a time).
    B  baseline     host memory of the process before the model exists (Python, torch, transformers, and
                    torch's CPU runtime warmed by one tiny training step), measured in the estimating process.

    one device, plain PyTorch      device = W + G + O + A                       host = B
    ZeRO-3, parameters and optimizer offloaded to CPU, n ranks on the machine:
                                   device = A + b · min(N, M + R/2)             host = n·B + 1.5 · (W + G + O + 4·N_t)

In the ZeRO-3 line, b is bytes per base parameter, M = stage3_max_live_parameters and R =
stage3_max_reuse_distance (both 1e9 by DeepSpeed's default): a rank gathers up to M parameters ahead of
use, and keeps any parameter whose next use is less than R parameters away, which in a forward+backward
pass holds the last R/2 of the forward for the backward. 1.5 is DeepSpeed's own additional_buffer_factor
for host memory (deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs); 4·N_t is the fp32
master copy of the trainable weights that DeepSpeed's optimizer partition holds.

Where it errs: transients are left out (the attention-score gradient during backward, the loss's fp32
copy of the logits, allocator fragmentation), so plain figures run a few percent low on small models
(the method rows of a causal or seq2seq LM count peftrun's chunked loss, peftrun.lm_loss, which keeps no logits);
activations are counted in the weights' dtype even under autocast mixed precision (an over-count up to
2x for A), and autocast's cached half-precision copy of trainable weights (2·N_t) is not counted;
FlashAttention/SDPA kernels save less than the eager attention counted on the meta device; the ZeRO-3
device term follows DeepSpeed's prefetch/reuse knobs, not its exact schedule; loading (a checkpoint's
file pages while weights are copied) can briefly need up to 2·W of host memory, which is not counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from peftrun.tasks import CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TEXT_TO_IMAGE

GB = 1e9
ADAMW_STATE_BYTES = 8
GRAD_BYTES = 4
ZERO3_MAX_LIVE = 1e9  # DeepSpeed's default stage3_max_live_parameters
ZERO3_MAX_REUSE = 1e9  # DeepSpeed's default stage3_max_reuse_distance
DEEPSPEED_HOST_BUFFER = 1.5  # DeepSpeed's additional_buffer_factor


@dataclass
class Row:
    setting: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    device: float
    host: float
    trainable: int
    fits: bool | None = None


@dataclass
class Estimate:
    model: str
    params: int
    batch_size: int
    seq_len: int
    target_len: int | None
    baseline: float
    rows: list[Row] = field(default_factory=list)
    device_gb: float | None = None

    def row(self, setting: str) -> Row:
        return next(r for r in self.rows if r.setting == setting)


# ------------------------------------------------------------------ activations on the meta device


def _batch(model: nn.Module, task_type: str, batch: int, seq: int, target: int) -> dict[str, torch.Tensor]:
    meta = torch.device("meta")
    ids = torch.zeros(batch, seq, dtype=torch.long, device=meta)
    # no attention mask: a mask makes transformers test its values, which meta tensors do not have
    inputs = {"input_ids": ids}
    if task_type == SEQ_CLS:
        inputs["labels"] = torch.zeros(batch, dtype=torch.long, device=meta)
    elif task_type == SEQ_2_SEQ_LM:
        inputs["labels"] = torch.zeros(batch, target, dtype=torch.long, device=meta)
    else:
        inputs["labels"] = torch.zeros(batch, seq, dtype=torch.long, device=meta)
    return inputs


def saved_activation_bytes(
    model: nn.Module, inputs: dict[str, torch.Tensor], checkpointing: bool = False, block_types: tuple = ()
) -> int:
    """Bytes autograd keeps for backward after one forward pass (see the module docstring). `block_types`: more
    module classes that gradient checkpointing recomputes whole (a diffusers UNet's resnets and
    transformer blocks), beside transformers' GradientCheckpointingLayer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    outside: dict[int, int] = {}
    blocks: list[dict[int, int]] = []
    block_inputs = 0
    current: list[dict[int, int] | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in weights:
            bucket = current[0] if current[0] is not None else outside
            bucket[key] = max(bucket.get(key, 0), storage.nbytes())
        return t

    def enter(module, args, kwargs):
        nonlocal block_inputs
        if checkpointing:
            hidden = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
            block_inputs += hidden.numel() * hidden.element_size()
            current[0] = {}
            blocks.append(current[0])

    def leave(module, args, output):
        current[0] = None

    handles = []
    for module in model.modules():
        if isinstance(module, (GradientCheckpointingLayer, *block_types)):
            handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
    except (RuntimeError, NotImplementedError) as exc:
        from peftrun.errors import PeftrunError

        raise PeftrunError(
            f"this model's forward pass cannot run on the meta device: {str(exc).splitlines()[0][:160]}",
            hint="the estimate needs a forward pass without data-dependent steps; try another method or model",
        ) from None
    finally:
        for h in handles:
            h.remove()
    total = sum(outside.values())
    if checkpointing and blocks:
        total += block_inputs + max(sum(b.values()) for b in blocks)
    else:
        total += sum(sum(b.values()) for b in blocks)
    return total


def weight_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(bytes of all weights as they sit, all parameter count, trainable count), shared weights once."""
    seen: set[int] = set()
    size = count = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size += p.numel() * p.element_size()
        count += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return size, count, trainable


# ------------------------------------------------------------------ the table


def process_baseline() -> float:
    """Resident memory of this process with torch's CPU runtime warm: one tiny training step first loads
    the kernels, thread pools and the fused AdamW code that every training process carries."""
    import psutil

    layer = nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(layer.parameters(), fused=True)
    layer(torch.randn(8, 64)).square().mean().backward()
    optimizer.step()
    return float(psutil.Process(os.getpid()).memory_info().rss)


def _plain_row(setting: str, w: float, n_t: int, a: float, baseline: float) -> Row:
    g, o = GRAD_BYTES * n_t, ADAMW_STATE_BYTES * n_t
    return Row(setting, w, g, o, a, device=w + g + o + a, host=baseline, trainable=n_t)


def _zero3_row(setting: str, w: float, n: int, n_t: int, a: float, baseline: float, ranks: int) -> Row:
    g, o = GRAD_BYTES * n_t, ADAMW_STATE_BYTES * n_t
    per_param = (w - 4 * n_t) / max(n - n_t, 1)  # the base weights' own bytes per parameter
    resident = per_param * min(n, ZERO3_MAX_LIVE + ZERO3_MAX_REUSE / 2)
    host = ranks * baseline + DEEPSPEED_HOST_BUFFER * (w + g + o + 4 * n_t)
    return Row(setting, w, g, o, a, device=a + resident, host=host, trainable=n_t)


def estimate(
    recipe, *, device_gb: float | None = None, baseline: float | None = None, ranks: int | None = None
) -> Estimate:
    """Full fine-tuning, the recipe's method, and the method under ZeRO-3 with CPU offload."""
    from peftrun.adapted import wrap
    from peftrun.models import DTYPES, build_from_config

    m = recipe.model
    task = m.task_type
    if task == TEXT_TO_IMAGE:
        return _estimate_diffusion(recipe, device_gb=device_gb, baseline=baseline)
    num_labels = m.num_labels or (len(recipe.data.label_names) if recipe.data.label_names else 2)
    if recipe.training.objective == "reward":
        num_labels = 1  # a reward model's head has one output (as training builds it)
    batch, seq, target = recipe.training.batch_size, recipe.data.max_length, recipe.data.target_max_length
    baseline = process_baseline() if baseline is None else baseline
    ranks = ranks or recipe.distributed.num_processes  # on one machine

    def build(dtype: torch.dtype) -> nn.Module:
        model = build_from_config(
            m.name_or_path,
            task,
            meta=True,
            dtype=dtype,
            num_labels=num_labels,
            overrides=m.config_overrides,
            trust_remote_code=m.trust_remote_code,
        )
        model.train()
        return model

    full = build(torch.float32)
    for p in full.parameters():
        p.requires_grad_(True)
    inputs = _batch(full, task, batch, seq, target)
    a_full = saved_activation_bytes(full, inputs, m.gradient_checkpointing)
    w_full, n, _ = weight_bytes(full)
    del full
    base = build(DTYPES[m.dtype])
    adapted = wrap(base, task, recipe.method.name, recipe.method_config)
    adapted.train()
    adapted.chunked_loss = recipe.training.chunked_loss
    a_method = a_zero3 = saved_activation_bytes(adapted, inputs, m.gradient_checkpointing)
    if adapted.chunked_loss and task in (CAUSAL_LM, SEQ_2_SEQ_LM):
        adapted.chunked_loss = False  # ZeRO-3 partitions the output head, which keeps transformers' loss
        a_zero3 = saved_activation_bytes(adapted, inputs, m.gradient_checkpointing)
    w_method, n_method, n_t = weight_bytes(adapted)

    method = recipe.method.name
    est = Estimate(m.name_or_path, n, batch, seq, target if task == SEQ_2_SEQ_LM else None, baseline)
    est.rows = [
        _plain_row("full fine-tuning", w_full, n, a_full, baseline),
        _plain_row(method, w_method, n_t, a_method, baseline),
        _zero3_row(f"{method} + ZeRO-3 CPU offload", w_method, n_method, n_t, a_zero3, baseline, ranks),
    ]
    est.device_gb = device_gb
    if device_gb is not None:
        for row in est.rows:
            row.fits = row.device <= device_gb * GB
    return est


def _estimate_diffusion(recipe, *, device_gb: float | None, baseline: float | None) -> Estimate:
    """TEXT_TO_IMAGE (DreamBooth): the same W + G + O + A, from the pipeline's components on the meta device.
    One step's UNet batch is batch_size images, twice that with prior preservation, at dreambooth.resolution;
    the prompts are the text encoder's max_position_embeddings long. Full fine-tuning trains the UNet (and
    the text encoder with train_text_encoder) whole; the VAE only encodes (no saved tensors). Checkpointed
    units: the UNet's resnets and transformer blocks, the text encoder's layers. Attention is counted as the
    meta device runs it (the probabilities saved, as the language models' eager attention): a GPU's fused
    SDPA kernel saves less, so on torch>=2 GPUs the activations run lower than these. No ZeRO-3 row."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    from peftrun.diffusion.adapted import adapted_from_recipe

    m, db = recipe.model, recipe.dreambooth
    baseline = process_baseline() if baseline is None else baseline
    images = recipe.training.batch_size * (2 if db.with_prior_preservation else 1)
    blocks = (ResnetBlock2D, BasicTransformerBlock)

    def measure(model: nn.Module) -> float:
        meta = torch.device("meta")
        length = model.model.text_encoder.config.max_position_embeddings
        inputs = {
            "pixel_values": torch.zeros(images, 3, db.resolution, db.resolution, device=meta),
            "input_ids": torch.zeros(images, length, dtype=torch.long, device=meta),
        }
        model.train()
        return saved_activation_bytes(model, inputs, m.gradient_checkpointing, blocks)

    adapted = adapted_from_recipe(recipe)
    a_method = measure(adapted)
    w_method, n, n_t = weight_bytes(adapted)
    full = adapted_from_recipe(recipe.model_copy(update={"model": m.model_copy(update={"dtype": "float32"})}))
    components = full.model
    whole = [components.unet] + ([components.text_encoder] if db.train_text_encoder else [])
    for module in whole:
        for p in module.parameters():
            p.requires_grad_(True)
    a_full = measure(full)
    _, _, n_full = weight_bytes(full)
    w_full = sum(p.numel() * 4 for p in components.parameters() if p is not None) - 4 * n_t
    est = Estimate(m.name_or_path, n - n_t, images, db.resolution, None, baseline)
    est.rows = [
        _plain_row("full fine-tuning", w_full, n_full - n_t, a_full, baseline),
        _plain_row(recipe.method.name, w_method, n_t, a_method, baseline),
    ]
    est.device_gb = device_gb
    if device_gb is not None:
        for row in est.rows:
            row.fits = row.device <= device_gb * GB
    return est


def render(est: Estimate) -> str:
    """The table `peftrun estimate` prints (GB = 10^9 bytes)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    shape = f"batch {est.batch_size} x length {est.seq_len}"
    if est.target_len:
        shape += f" (+{est.target_len} target tokens)"
    title = f"{est.model}: {est.params:,d} parameters, {shape}"
    table = Table(title=title)
    for column in ("setting", "trainable", "weights", "gradients", "optimizer", "activations", "GPU", "CPU"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    if est.device_gb is not None:
        table.add_column(f"on {est.device_gb:g} GB", justify="center")
    for r in est.rows:
        cells = [r.setting, f"{r.trainable:,d}"] + [
            f"{x / GB:.2f} GB" for x in (r.weights, r.gradients, r.optimizer, r.activations, r.device, r.host)
        ]
        if est.device_gb is not None:
            cells.append("fits" if r.fits else "OOM")
        table.add_row(*cells)
    buffer = StringIO()
    Console(file=buffer, width=150).print(table)
    note = (
        "GPU: what one device holds at the peak; CPU: the process's host memory (ZeRO-3 rows: the machine's).\n"
        "Formula and where it errs: peftrun/estimate.py (docs/distributed.md)."
    )
    return buffer.getvalue() + note
