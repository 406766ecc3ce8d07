"""Where the loop's numbers go: metrics.jsonl and, when the recipe asks (`training.report_to`), experiment
trackers through accelerate's tracking (TensorBoard, MLflow, W&B, trackio). One `write` sends one record to
all of them, so every tracker holds the numbers metrics.jsonl holds, at the same steps.

Each tracker's package is an optional extra (`pip install 'peftrun[tensorboard]'`); a recipe naming one that
is not installed stops before any model loads. Files stay in output_dir: TensorBoard's event files under
tb/, MLflow's local file store under mlruns/ (unless MLFLOW_TRACKING_URI says otherwise), W&B's run under
wandb/ (offline unless WANDB_MODE says otherwise; `wandb sync` uploads it later), trackio's local database under
trackio/ (unless TRACKIO_DIR says otherwise; `trackio show --project peftrun` with that TRACKIO_DIR opens it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from peftrun.errors import PeftrunError

# tracker -> (the module it imports, the peftrun extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}
PROJECT = "peftrun"
# folders a tracker's package keeps under the home folder unless told otherwise (an environment variable read
# when it starts): each goes under output_dir instead, unless the user has set that variable
RUN_FOLDERS = {
    "wandb": {"WANDB_CACHE_DIR": "wandb/cache", "WANDB_CONFIG_DIR": "wandb/config", "WANDB_DATA_DIR": "wandb/data"},
    "trackio": {"TRACKIO_DIR": "trackio"},
}


def check_installed(names: list[str]) -> None:
    """One line naming the extra to install for the first tracker whose package is missing."""
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise PeftrunError(
                f"training.report_to names {name}, but the {module} package is not installed",
                hint=f"pip install 'peftrun[{extra}]' (or remove {name} from training.report_to)",
            )


def start_trackers(names: list[str], out: Path, run_name: str, config: dict[str, Any]) -> list:
    """accelerate's tracker objects for `names`, started, with the recipe stored as the run's parameters.
    Call on the main process only (the caller decides)."""
    check_installed(names)
    trackers = []
    for name in names:
        tracker = _make(name, out, run_name)
        folders = {
            var: str((out / sub).resolve()) for var, sub in RUN_FOLDERS.get(name, {}).items() if not os.environ.get(var)
        }
        if name == "trackio":
            _say_if_trackio_is_fixed(folders.get("TRACKIO_DIR"))
        with _environ(folders):
            tracker.start()
        tracker.store_init_configuration(config)
        trackers.append(tracker)
    return trackers


def _say_if_trackio_is_fixed(folder: str | None) -> None:
    """trackio reads TRACKIO_DIR once, when first imported: in a process that imported it before this run, it
    logs where it decided then, and the run says so."""
    utils = sys.modules.get("trackio.utils")
    if folder and utils is not None and Path(utils.TRACKIO_DIR) != Path(folder):
        print(f"trackio logs to {utils.TRACKIO_DIR} (trackio was imported before this run; set TRACKIO_DIR "
              "before importing it to choose)", file=sys.stderr)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Environment variables set for the block only (none of them set before it)."""
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)


def _make(name: str, out: Path, run_name: str):
    from accelerate import tracking

    if name == "tensorboard":
        return tracking.TensorBoardTracker(run_name, out / "tb")
    if name == "mlflow":
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            # MLflow 3 keeps its file store in maintenance mode behind this switch; a folder in output_dir
            # needs no database server or driver
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        return tracking.MLflowTracker(experiment_name=PROJECT, run_name=run_name)
    if name == "wandb":
        mode = os.environ.get("WANDB_MODE", "offline")
        return tracking.WandBTracker(PROJECT, name=run_name, dir=str(out), mode=mode)
    if name == "trackio":
        return tracking.TrackioTracker(PROJECT, name=run_name)
    raise PeftrunError(f"unknown tracker '{name}'")


def flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """A recipe dict as dotted keys with scalar values (what trackers take as a run's parameters)."""
    flat: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            flat.update(flat_config(value, f"{prefix}{key}."))
        return flat
    key = prefix[:-1]
    if data is None or isinstance(data, (bool, int, float, str)):
        flat[key] = data if data is not None else "null"
    else:
        flat[key] = json.dumps(data, default=str)
    return flat


def numbers(record: dict[str, Any]) -> dict[str, float | int]:
    """The record's finite numbers but its step (the step is where they are logged)."""
    return {
        k: v for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class MetricsLog:
    """Appends one JSON object per line to output_dir/metrics.jsonl and logs the same numbers to the recipe's
    trackers at the record's step (main process only; others write nothing)."""

    def __init__(self, path: Path, enabled: bool, trackers: list | None = None):
        self.path = path
        self.enabled = enabled
        self.trackers = trackers or []

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        values = numbers(record)
        for tracker in self.trackers:
            tracker.log(values, step=record.get("step"))

    def close(self) -> None:
        """Finish the trackers (flush event files, end the MLflow/W&B run) and draw output_dir/loss.png."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()
        if self.enabled and self.path.is_file():
            from peftrun.training.plot import plot_losses

            try:
                plot_losses([self.path], self.path.parent / "loss.png")
            except Exception as exc:  # a picture that cannot be drawn does not fail a finished run
                print(f"loss.png not drawn: {exc}", file=sys.stderr)


def open_log(recipe, out: Path, accelerator) -> MetricsLog:
    """The run's MetricsLog with the trackers its recipe names started on the main process."""
    main = accelerator.is_main_process
    names = list(recipe.training.report_to)
    trackers = start_trackers(names, out, out.resolve().name, flat_config(recipe.to_dict())) if main and names else []
    return MetricsLog(out / "metrics.jsonl", main, trackers)
