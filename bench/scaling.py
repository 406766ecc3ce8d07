"""Cost as the work grows: a LoRA step's time and peak RSS against sequence length and batch size, peftrun beside
peft, on the SmolLM2-135M-shaped Llama (random weights, bench/worker.py's `llama`), each point in its own process.

Sequence lengths 256, 512, 1024, 2048 at batch 1, and batch sizes 1, 2, 4, 8 at 256 tokens. For each side the
slope of peak RSS per token (a least-squares line through the points, MiB per token) over each sweep; the target
is peftrun's slope over the length sweep <= 0.8x peft's. Writes a table (into RESULTS.md, through bench/run.py)
and bench/scaling.png.
"""

from __future__ import annotations

import statistics
from pathlib import Path

LENGTHS = (256, 512, 1024, 2048)
BATCHES = (1, 2, 4, 8)
BATCH_LENGTH = 256
TINY_LENGTHS = (32, 64, 128, 256)
TINY_BATCH_LENGTH = 32
CONFIGS = ("peftrun-lora-d0.1", "peft-lora-d0.1")
MODEL = "llama"
SLOPE_TARGET = 0.8


def points(tiny: bool, lengths=None, batches=None) -> list[tuple[str, int, int]]:
    """(sweep, batch, length) for every point; the batch-1 point at the batch sweep's length is shared."""
    lengths = lengths or (TINY_LENGTHS if tiny else LENGTHS)
    at = TINY_BATCH_LENGTH if tiny else BATCH_LENGTH
    out = [("length", 1, n) for n in lengths]
    out += [("batch", b, at) for b in (batches or BATCHES) if (b, at) not in [(1, n) for n in lengths]]
    return out


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def run_scaling(args, run_job, log) -> dict:
    """Every point for both sides, interleaved (peftrun, peft at each point), one process each."""
    runs = []
    lengths = (
        [int(v) for v in args.scaling_lengths.split(",")] if getattr(args, "scaling_lengths", None) else None
    )
    batches = (
        [int(v) for v in args.scaling_batches.split(",")] if getattr(args, "scaling_batches", None) else None
    )
    for sweep, batch, length in points(args.tiny, lengths, batches):
        for config in CONFIGS:
            res = run_job(MODEL, config, args, batch=batch, length=length, steps=2, warmup=1)
            res["sweep"] = sweep
            runs.append(res)
            if "error" in res:
                log(f"[scaling] {config:18s} batch {batch} x {length}: FAILED {res['error']}")
            else:
                log(
                    f"[scaling] {config:18s} batch {batch} x {length:4d}: step {res['step_s']:.2f}s  "
                    f"peak RSS {res['peak_rss_mib']:.0f} MiB  others {res.get('others', 0.0):.0%}"
                )
    return summarise(runs, args.tiny)


def summarise(runs: list[dict], tiny: bool) -> dict:
    ok = [r for r in runs if "error" not in r]
    at = TINY_BATCH_LENGTH if tiny else BATCH_LENGTH
    table = []
    for batch, length in dict.fromkeys((r["batch"], r["length"]) for r in ok):
        row = {"batch": batch, "length": length, "tokens": batch * length}
        for config in CONFIGS:
            hit = [r for r in ok if r["config"] == config and r["batch"] == batch and r["length"] == length]
            if hit:
                impl = config.split("-")[0]
                row[f"{impl}_step_s"] = hit[-1]["step_s"]
                row[f"{impl}_peak_rss_mib"] = hit[-1]["peak_rss_mib"]
        table.append(row)
    slopes: dict = {}
    for sweep, pick in (("length", lambda r: r["batch"] == 1), ("batch", lambda r: r["length"] == at)):
        rows = sorted((r for r in table if pick(r)), key=lambda r: r["tokens"])
        for impl in ("peftrun", "peft"):
            have = [r for r in rows if f"{impl}_peak_rss_mib" in r]
            slopes[f"{sweep}:{impl}:rss"] = slope(
                [r["tokens"] for r in have], [r[f"{impl}_peak_rss_mib"] for r in have]
            )
            slopes[f"{sweep}:{impl}:time"] = slope(
                [r["tokens"] for r in have], [r[f"{impl}_step_s"] for r in have]
            )
        a, b = slopes[f"{sweep}:peftrun:rss"], slopes[f"{sweep}:peft:rss"]
        slopes[f"{sweep}:rss_ratio"] = a / b if a is not None and b else None
    errors = [f"{r['config']} {r.get('batch')}x{r.get('length')}: {r['error']}" for r in runs if "error" in r]
    return {"table": table, "slopes": slopes, "errors": errors, "runs": runs}


def plot(summary: dict, path: Path, tiny: bool) -> Path | None:
    """Step time and peak RSS against tokens, both sweeps, peftrun beside peft."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    at = TINY_BATCH_LENGTH if tiny else BATCH_LENGTH
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    sweeps = (
        ("sequence length (batch 1)", lambda r: r["batch"] == 1, "length"),
        (f"batch size ({at} tokens)", lambda r: r["length"] == at, "batch"),
    )
    for col, (title, pick, key) in enumerate(sweeps):
        rows = sorted((r for r in summary["table"] if pick(r)), key=lambda r: r[key])
        for row_i, (field, label) in enumerate((("peak_rss_mib", "peak RSS (MiB)"), ("step_s", "step (s)"))):
            ax = axes[row_i][col]
            for impl, style in (("peftrun", "o-"), ("peft", "s--")):
                have = [r for r in rows if f"{impl}_{field}" in r]
                ax.plot([r[key] for r in have], [r[f"{impl}_{field}"] for r in have], style, label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xticks([r[key] for r in rows], [str(r[key]) for r in rows])
            ax.set_xlabel(title)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(
        "LoRA step (r=8, dropout 0.1), SmolLM2-135M-shaped Llama" + (" (tiny: smoke run)" if tiny else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def markdown(summary: dict, plot_name: str | None) -> list[str]:
    lines = [
        "",
        "## Cost as the work grows: LoRA step against sequence length and batch size",
        "",
        "The SmolLM2-135M-shaped Llama (random weights), LoRA r=8, alpha 16, dropout 0.1, default targets; one "
        "process per point, 1 warm-up and 2 timed steps (median), peak RSS of the timed steps. "
        "Slopes: least-squares MiB (or seconds) per token over each sweep.",
        "",
        "| batch × length | tokens | peftrun step (s) | peft step (s) | peftrun peak RSS (MiB) | peft peak RSS (MiB) | RSS peftrun/peft |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["table"]:
        a, b = r.get("peftrun_peak_rss_mib"), r.get("peft_peak_rss_mib")
        cells = [
            f"{r.get('peftrun_step_s', float('nan')):.2f}",
            f"{r.get('peft_step_s', float('nan')):.2f}",
            f"{a:.0f}" if a else "–",
            f"{b:.0f}" if b else "–",
            f"{a / b:.3f}" if a and b else "–",
        ]
        lines.append(f"| {r['batch']} × {r['length']} | {r['tokens']} | " + " | ".join(cells) + " |")
    s = summary["slopes"]
    lines += [
        "",
        "| sweep | peftrun MiB/token | peft MiB/token | ratio | peftrun ms/token | peft ms/token |",
        "|---|---|---|---|---|---|",
    ]
    for sweep in ("length", "batch"):

        def f(key, scale=1.0, spec=".3f"):
            v = s.get(key)
            return "–" if v is None else format(v * scale, spec)

        lines.append(
            f"| {sweep} | {f(f'{sweep}:peftrun:rss')} | {f(f'{sweep}:peft:rss')} | {f(f'{sweep}:rss_ratio')} | "
            f"{f(f'{sweep}:peftrun:time', 1000, '.2f')} | {f(f'{sweep}:peft:time', 1000, '.2f')} |"
        )
    if plot_name:
        lines += ["", f"![LoRA step cost against tokens]({plot_name})"]
    for err in summary.get("errors", []):
        lines.append(f"\nfailed: {err}")
    return lines


def target_rows(summary: dict) -> list[tuple[str, str, float, float]]:
    """(target, model, ratio, limit) rows for RESULTS.md's target table."""
    ratio = summary["slopes"].get("length:rss_ratio")
    if ratio is None:
        return []
    return [("peak RSS per token (length sweep): peftrun slope / peft slope", "llama", ratio, SLOPE_TARGET)]
