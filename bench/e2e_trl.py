"""End to end against trl: peftrun's chat SFT and DPO recipes through `peftrun train`, beside trl's SFTTrainer
(bench/trl_sft.py) and DPOTrainer (bench/trl_dpo.py) with peft LoRA on the same model, rows, template, masking,
batch, epochs and learning rate. Each side runs in its own process: wall time of the whole process, peak RSS
from wait4, and the held-out metrics each side reports.

The runs are cut (fewer training rows, one epoch; the same cut on both sides) so that a side takes a few minutes
on a 2-core CPU. Both sides run with their own speed settings for the same work:
  - SFT: peftrun packs (`data.packing=true`), trl packs too (`packing=True`, best-fit decreasing, which turns on
    its padding-free batches); fused AdamW on both sides; bf16 autocast as the recipe says.
  - DPO: pairs are batched whole on both sides (neither packs preference pairs); fused AdamW; bf16 autocast.
  - both: gradient checkpointing, trl's default for SFTConfig and DPOConfig (it trades time for memory), set
    on peftrun's side too (`model.gradient_checkpointing=true`), so the two make the same trade.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SFT_RECIPE = REPO / "recipes" / "offline" / "smollm2_alpaca_chat_lora.yaml"
DPO_RECIPE = REPO / "recipes" / "offline" / "smollm2_dpo_lora.yaml"
# the cut, the same on both sides: (training rows, epochs); --tiny cuts further
CUTS = {"sft": (256, 1), "dpo": (128, 1)}
TINY_CUTS = {"sft": (16, 1), "dpo": (16, 1)}
SFT_PACKING = True  # peftrun's data.packing and trl's packing (bfd, padding-free)
TARGETS = {
    # kind: (wall limit, RSS limit, metric, metric tolerance, how the metric is compared)
    "sft": (0.6, 0.8, "eval_loss", 0.01, "relative"),
    "dpo": (0.7, 0.75, "eval_rewards/accuracies", 0.05, "absolute"),
}
PEER_SETTINGS = {
    "sft": "trl.SFTTrainer + peft LoRA, `packing=True` (best-fit decreasing: padding-free batches, position_ids "
    "per example), `completion_only_loss=True` on a tokenized prompt-completion dataset, "
    "`optim=adamw_torch_fused`, `bf16=True`, `gradient_checkpointing=True` (trl's default)",
    "dpo": "trl.DPOTrainer + peft LoRA, `ref_model=None` (the adapter switched off), `optim=adamw_torch_fused`, "
    "`bf16=True`, `gradient_checkpointing=True` (trl's default), same `beta`, `loss_type`, `label_smoothing`, "
    "`max_length`",
}
PEFTRUN_SETTINGS = {
    "sft": {
        "data.packing": "true" if SFT_PACKING else "false",
        "model.gradient_checkpointing": "true",
        "training.progress_bar": "false",
    },
    "dpo": {"model.gradient_checkpointing": "true", "training.progress_bar": "false"},
}


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Run a command in its own process: wall time, peak RSS (wait4), return code, output."""
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=so, stderr=se, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    return {
        "cmd": " ".join(cmd),
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "returncode": os.waitstatus_to_exitcode(status),
        "stdout": stdout,
        "stderr": stderr,
    }


def data_there(kind: str) -> str | None:
    """None when the recipe's data is on this machine, else why not."""
    shared = Path(os.environ.get("PEFTRUN_SHARED_DATA", REPO.parent / "shared" / "data"))
    need = (
        shared / "llamafactory_demo" / "alpaca_en_demo.json"
        if kind == "sft"
        else shared / "hh_rlhf_harmless" / "harmless_base_test.jsonl.gz"
    )
    return None if need.is_file() else f"{need} not found (set PEFTRUN_SHARED_DATA)"


def data_override(kind: str) -> list[str]:
    shared = os.environ.get("PEFTRUN_SHARED_DATA")
    if not shared:
        return []
    name = (
        "llamafactory_demo/alpaca_en_demo.json"
        if kind == "sft"
        else "hh_rlhf_harmless/harmless_base_test.jsonl.gz"
    )
    return [f"data.train_file={Path(shared) / name}"]


def cut(kind: str, args) -> tuple[int, int]:
    """(training rows, epochs) of the cut; --trl-train-samples overrides the rows (a quicker check)."""
    rows, epochs = (TINY_CUTS if args.tiny else CUTS)[kind]
    return getattr(args, "trl_train_samples", None) or rows, epochs


def side_command(kind: str, impl: str, out: Path, args) -> list[str]:
    tiny = args.tiny
    rows, epochs = cut(kind, args)
    recipe = SFT_RECIPE if kind == "sft" else DPO_RECIPE
    if impl == "peftrun":
        sets = {
            "output_dir": str(out),
            "data.max_train_samples": str(rows),
            "training.num_epochs": str(epochs),
            **PEFTRUN_SETTINGS[kind],
        }
        if tiny and kind == "dpo":
            sets["data.max_eval_samples"] = "16"
        cmd = [sys.executable, "-m", "peftrun", "train", str(recipe)]
        cmd += [f"--set={k}={v}" for k, v in sets.items()]
        cmd += [f"--set={o}" for o in data_override(kind)]
        return cmd
    script = "bench.trl_sft" if kind == "sft" else "bench.trl_dpo"
    cmd = [sys.executable, "-m", script, "--recipe", str(recipe), "--output-dir", str(out)]
    cmd += ["--max-train-samples", str(rows), "--epochs", str(epochs)]
    if kind == "sft" and SFT_PACKING:
        cmd.append("--packing")
    if tiny and kind == "dpo":
        cmd += ["--max-eval-samples", "16"]
    if data_override(kind):
        cmd += ["--train-file", data_override(kind)[0].split("=", 1)[1]] if kind == "sft" else []
    return cmd


def side_metrics(kind: str, impl: str, res: dict, out: Path) -> dict:
    """The held-out metrics the side reported."""
    if impl == "peftrun":
        records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        evals = [r for r in records if "eval_loss" in r]
        last = evals[-1]
        got = {k: v for k, v in last.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        epoch_losses = [
            r["train_epoch_loss"] for r in records if isinstance(r.get("train_epoch_loss"), (int, float))
        ]
        if epoch_losses:  # the mean over the last epoch's steps (the cut runs one epoch: the whole run)
            got["train_loss"] = epoch_losses[-1]
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        if losses:
            got["last_logged_loss"] = losses[-1]
        if isinstance(last.get("train_cpu_mem_peak_total_mb"), (int, float)):  # peftrun's own memory line
            got["train_peak_mib"] = last["train_cpu_mem_peak_total_mb"]
        steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
        if steps:
            got["steps"] = max(steps)
        return got
    line = [ln for ln in res["stdout"].splitlines() if ln.startswith("BENCH_E2E ")][-1]
    return json.loads(line.split(" ", 1)[1])


def run_once(kind: str, impl: str, out: Path, env: dict[str, str], args) -> dict:
    cmd = side_command(kind, impl, out, args)
    res = measure(cmd, env)
    stdout, stderr = res.pop("stdout"), res.pop("stderr")
    res["impl"] = impl
    if res["returncode"] != 0:
        res["error"] = " | ".join((stderr or stdout).strip().splitlines()[-5:])
        return res
    res["stdout"] = stdout
    try:
        res["metrics"] = side_metrics(kind, impl, res, out)
    except (OSError, IndexError, KeyError, ValueError) as exc:
        res["error"] = f"no held-out metrics in the output ({exc})"
    res.pop("stdout", None)
    return res


def run_trl(kind: str, args, env: dict[str, str], log) -> dict:
    """Both sides of one comparison, interleaved over --e2e-rounds rounds; medians and ratios."""
    why = data_there(kind)
    if why:
        return {"skipped": why}
    base = Path(tempfile.mkdtemp(prefix=f"peftrun-bench-trl-{kind}-"))
    runs = []
    for rnd in range(args.e2e_rounds):
        for impl in ("peftrun", "trl") if rnd % 2 == 0 else ("trl", "peftrun"):
            res = run_once(kind, impl, base / f"{impl}-{rnd}", env, args)
            res["round"] = rnd
            runs.append(res)
            if "error" in res:
                log(f"[{kind} {rnd}] {impl:8s} FAILED: {res['error']}")
            else:
                m = res["metrics"]
                shown = ", ".join(
                    f"{k} {m[k]:.4f}"
                    for k in ("eval_loss", "eval_rewards/accuracies", "train_loss")
                    if m.get(k) is not None
                )
                log(
                    f"[{kind} {rnd}] {impl:8s} wall {res['wall_s']:.1f}s  peak RSS {res['peak_rss_mib']:.0f} MiB  {shown}"
                )
    rows, epochs = cut(kind, args)
    summary: dict = {"runs": runs, "cut": {"max_train_samples": rows, "num_epochs": epochs}}
    med: dict = {}
    for impl in ("peftrun", "trl"):
        ok = [r for r in runs if r["impl"] == impl and "error" not in r]
        if not ok:
            continue
        med[impl] = {
            "wall_s": statistics.median(r["wall_s"] for r in ok),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ok),
        }
        keys = set.intersection(*(set(r["metrics"]) for r in ok))
        for k in sorted(keys):
            vals = [r["metrics"][k] for r in ok if isinstance(r["metrics"][k], (int, float))]
            if vals:
                med[impl][k] = statistics.median(vals)
    summary["median"] = med
    if len(med) == 2:
        a, b = med["peftrun"], med["trl"]
        _, _, metric, _, how = TARGETS[kind]
        ratios = {"wall": a["wall_s"] / b["wall_s"], "rss": a["peak_rss_mib"] / b["peak_rss_mib"]}
        if a.get(metric) is not None and b.get(metric) is not None:
            ratios["metric"] = (a[metric] / b[metric] - 1) if how == "relative" else (a[metric] - b[metric])
        summary["ratios"] = ratios
    return summary


def target_rows(kind: str, summary: dict) -> list[tuple[str, str, str, str, bool]]:
    """(target, model, value, limit, met) rows for RESULTS.md's target table."""
    if "ratios" not in summary:
        return []
    wall, rss, metric, tol, how = TARGETS[kind]
    r = summary["ratios"]
    name = {"sft": "chat SFT end to end", "dpo": "DPO end to end"}[kind]
    peer = {"sft": "trl SFTTrainer + peft", "dpo": "trl DPOTrainer + peft"}[kind]
    rows = [
        (f"{name}: wall time vs {peer}", "smollm2", f"{r['wall']:.3f}", f"≤ {wall:.2f}", r["wall"] <= wall),
        (f"{name}: peak RSS vs {peer}", "smollm2", f"{r['rss']:.3f}", f"≤ {rss:.2f}", r["rss"] <= rss),
    ]
    if "metric" in r:
        if how == "relative":
            rows.append(
                (
                    f"{name}: held-out loss difference",
                    "smollm2",
                    f"{100 * r['metric']:+.2f}%",
                    f"within ±{100 * tol:.0f}%",
                    abs(r["metric"]) <= tol,
                )
            )
        else:
            rows.append(
                (
                    f"{name}: held-out rewards/accuracies difference (points)",
                    "smollm2",
                    f"{100 * r['metric']:+.1f}",
                    f"within ±{100 * tol:.0f}",
                    abs(r["metric"]) <= tol,
                )
            )
    return rows


def markdown(kind: str, summary: dict) -> list[str]:
    rows, epochs = summary.get("cut", {}).get("max_train_samples"), summary.get("cut", {}).get("num_epochs")
    recipe = SFT_RECIPE if kind == "sft" else DPO_RECIPE
    title = (
        "chat SFT, SmolLM2-135M-Instruct + LoRA, against trl's SFTTrainer"
        if kind == "sft"
        else ("DPO, SmolLM2-135M-Instruct + LoRA, against trl's DPOTrainer")
    )
    ours = ", ".join(f"`{k}={v}`" for k, v in PEFTRUN_SETTINGS[kind].items())
    lines = [
        "",
        f"## End to end: {title}",
        "",
        f"{recipe.relative_to(REPO)} through `peftrun train` with {ours}, cut to the first {rows} training rows and "
        f"{epochs} epoch (the same cut on both sides), against bench/{'trl_sft.py' if kind == 'sft' else 'trl_dpo.py'}: "
        f"{PEER_SETTINGS[kind]}. Same model, rows, chat template, "
        + (
            "masking (the answer tokens only, prompts cut from the left at max_length as peftrun cuts them), "
            if kind == "sft"
            else "pairs (those whose prompt fits max_length), reference = base with the adapter off, "
        )
        + "LoRA, batch, learning rate, warm-up and schedule. Wall time of the whole process (loading, data, "
        "training, evaluation, saving); peak RSS from wait4. "
        + (
            "Held-out loss: the answer tokens' cross-entropy per token over the eval rows, after training, on both sides."
            if kind == "sft"
            else "Held-out metrics: each side's own evaluation of the eval pairs after training."
        ),
        "",
    ]
    if "skipped" in summary:
        return lines + [f"Skipped: {summary['skipped']}."]
    keys = (("eval_loss", "held-out loss"), ("train_loss", "mean train loss"), ("steps", "steps"))
    if kind == "dpo":
        keys = (
            ("eval_loss", "held-out loss"),
            ("eval_rewards/accuracies", "rewards/accuracies"),
            ("eval_rewards/margins", "rewards/margins"),
            ("train_loss", "mean train loss"),
            ("steps", "steps"),
        )
    lines += [
        "| | wall (s) | peak RSS (MiB) | " + " | ".join(label for _, label in keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for impl, med in summary.get("median", {}).items():
        cells = []
        for k, _ in keys:
            v = med.get(k)
            cells.append("–" if v is None else (f"{v:.0f}" if k == "steps" else f"{v:.4f}"))
        lines.append(
            f"| {impl} | {med['wall_s']:.1f} | {med['peak_rss_mib']:.0f} | " + " | ".join(cells) + " |"
        )
    ours = summary.get("median", {}).get("peftrun", {})
    if ours.get("train_peak_mib") and ours.get("eval_cpu_mem_peak_total_mb"):
        lines += [
            "",
            f"peftrun's own memory lines (metrics.jsonl): the process peaked at {ours['train_peak_mib']:.0f} MiB "
            f"while training and {ours['eval_cpu_mem_peak_total_mb']:.0f} MiB while evaluating.",
        ]
    for r in summary.get("runs", []):
        if "error" in r:
            lines.append(f"\n{r['impl']} failed: {r['error']}")
    return lines
