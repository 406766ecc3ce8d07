"""loss.png: train and eval loss against optimizer steps, from one or several metrics.jsonl (runs overlaid).

Train loss is the logged step loss (`loss`, every training.logging_steps); a run that logged none shows its
epochs' mean (`train_epoch_loss`). Eval loss is `eval_loss` at the step of each evaluated epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from peftrun.errors import PeftrunError


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)...], "eval": [...]} from a metrics.jsonl."""
    path = Path(path)
    if not path.is_file():
        raise PeftrunError("no such metrics file", where=str(path))
    steps, epochs, evals = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise PeftrunError("not a JSON line (is this a metrics.jsonl?)", where=f"{path}:{n}") from None
        if not isinstance(record, dict) or "step" not in record:
            continue
        step = record["step"]
        if "loss" in record:
            steps.append((step, float(record["loss"])))
        if "train_epoch_loss" in record:
            epochs.append((step, float(record["train_epoch_loss"])))
        if "eval_loss" in record:
            evals.append((step, float(record["eval_loss"])))
    if not (steps or epochs or evals):
        raise PeftrunError("holds no loss to draw (no loss, train_epoch_loss or eval_loss)", where=str(path))
    return {"train": steps or epochs, "eval": evals}


def run_label(path: Path, paths: list[Path]) -> str:
    """A run's name in the legend: its folder's name, or the file's path when folders share a name."""
    path = Path(path)
    names = [Path(p).resolve().parent.name for p in paths]
    name = path.resolve().parent.name
    return name if names.count(name) == 1 else str(path)


@contextlib.contextmanager
def _matplotlib_outside_home():
    """matplotlib writes its font cache and config under the home folder on first import: point it at a
    temporary folder instead (unless the user chose one with MPLCONFIGDIR), removed once it has loaded."""
    if "matplotlib" in sys.modules or "MPLCONFIGDIR" in os.environ:
        yield
        return
    folder = tempfile.mkdtemp(prefix="peftrun-matplotlib-")
    os.environ["MPLCONFIGDIR"] = folder
    try:
        yield
    finally:
        os.environ.pop("MPLCONFIGDIR", None)
        shutil.rmtree(folder, ignore_errors=True)


def plot_losses(paths: list[Path], output: Path) -> Path:
    """Draw every run's train (solid) and eval (dashed, dots) loss on one axis; write `output` (a PNG)."""
    curves = [(Path(p), read_curves(p)) for p in paths]  # every file read before anything is drawn
    with _matplotlib_outside_home():
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    several = len(curves) > 1
    for i, (path, curve) in enumerate(curves):
        color = f"C{i % 10}"
        prefix = f"{run_label(path, [p for p, _ in curves])}: " if several else ""
        if curve["train"]:
            x, y = zip(*curve["train"])
            ax.plot(x, y, color=color, linewidth=1.2, label=f"{prefix}train loss")
        if curve["eval"]:
            x, y = zip(*curve["eval"])
            ax.plot(x, y, color=color, linestyle="--", marker="o", label=f"{prefix}eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, format="png")
    plt.close(fig)
    return output
