"""Trackers (training.report_to) hold the numbers metrics.jsonl holds; loss.png and `peftrun plot` draw them."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

from peftrun.recipe import recipe_from_dict
from peftrun.training.tracking import flat_config, numbers

INSTALLED = [n for n in ("tensorboard", "mlflow", "wandb", "trackio") if importlib.util.find_spec(n) is not None]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tiny run logging to every installed tracker (2 epochs of 6 steps, a loss each step)."""
    if not INSTALLED:
        pytest.skip("no tracker package installed (pip install 'peftrun[tensorboard]')")
    root = tmp_path_factory.mktemp("tracked")
    out = root / "run"
    data = tiny_recipe_dict(
        tiny_model_dir(root), write_rows(root / "data" / "train.csv", 24).parent, out, num_epochs=2, report_to=INSTALLED
    )
    home = root / "home"  # an empty home folder for the run: trackers must leave it empty
    home.mkdir()
    # through the CLI in a fresh process, as users run it (in a process that imported trackio before, trackio
    # keeps the folder it chose then: the run says so)
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    recipe = write_recipe(root / "recipe.yaml", data)
    result = subprocess.run([sys.executable, "-m", "peftrun", "train", str(recipe)], capture_output=True, text=True,
                            timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


CACHE_VARIABLES = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "TRACKIO_DIR", "WANDB_DIR",
                   "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "MLFLOW_TRACKING_URI")


def expected(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in records if key in r]


def test_tensorboard_event_files_hold_the_logged_numbers(tracked):
    if "tensorboard" not in INSTALLED:
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records = tracked
    folders = {p.parent for p in (out / "tb").rglob("events.out.tfevents.*")}
    assert folders, "no event file under tb/"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for folder in folders:
        acc = EventAccumulator(str(folder)).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    for key in ("loss", "lr", "eval_loss", "accuracy", "train_epoch_loss"):
        want = expected(records, key)
        assert want, key
        got = sorted(scalars[key])
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert all(math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-9) for (_, g), (_, w) in zip(got, want)), key
    assert len(expected(records, "loss")) == 12  # 22 train rows, batch 4: 6 steps an epoch, 2 epochs


def test_mlflow_local_file_store_holds_the_run_and_its_numbers(tracked, monkeypatch):
    if "mlflow" not in INSTALLED:
        pytest.skip("mlflow is not installed (pip install 'peftrun[mlflow]')")
    from mlflow.tracking import MlflowClient

    out, records = tracked
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("peftrun")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "run" and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["method.r"] == "4" and run.data.params["training.learning_rate"] == "0.01"
    for key in ("loss", "eval_loss", "accuracy"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        want = expected(records, key)
        assert [s for s, _ in history] == [s for s, _ in want], key
        assert all(math.isclose(g, w, rel_tol=1e-6) for (_, g), (_, w) in zip(history, want)), key


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file: LevelDB-log records (32 KiB blocks after a 7-byte file
    header; each chunk a 7-byte header: crc, length, type full/first/middle/last) of wandb's protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4) and chunks:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_logged_numbers(tracked):
    if "wandb" not in INSTALLED:
        pytest.skip("wandb is not installed (pip install 'peftrun[wandb]')")
    out, records = tracked
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    rows = wandb_history(runs[0])
    for key in ("loss", "eval_loss", "accuracy"):
        got = [(r["_step"], r[key]) for r in rows if key in r]
        want = expected(records, key)
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert all(math.isclose(g, w, rel_tol=1e-6) for (_, g), (_, w) in zip(got, want)), key


def test_trackio_database_in_output_dir_holds_the_logged_numbers(tracked):
    if "trackio" not in INSTALLED:
        pytest.skip("trackio is not installed (pip install 'peftrun[trackio]')")
    out, records = tracked
    # trackio fixes its folder when first imported: read the run's database in a process of its own
    read = (
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        "print(json.dumps([str(S.get_project_db_path('peftrun')), S.get_runs('peftrun'), "
        "S.get_logs('peftrun', 'run')], default=str))"
    )
    env = {**os.environ, "TRACKIO_DIR": str(out / "trackio")}
    result = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    db, runs, logs = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(db).is_file() and Path(db).parent == out / "trackio"  # under output_dir, not the home folder
    assert runs == ["run"]
    for key in ("loss", "eval_loss", "accuracy"):
        got = [(r["step"], r[key]) for r in logs if key in r]
        want = expected(records, key)
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert all(math.isclose(g, w, rel_tol=1e-6) for (_, g), (_, w) in zip(got, want)), key


def test_the_run_draws_loss_png_and_plot_overlays_runs(tracked, tmp_path):
    from PIL import Image

    out, records = tracked
    with Image.open(out / "loss.png") as image:
        image.load()
        assert image.format == "PNG" and image.size == (700, 450)
        # not a blank canvas: the curves put colour on it
        assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 10
    other = tmp_path / "other" / "metrics.jsonl"
    other.parent.mkdir()
    other.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    result = run_cli("plot", str(out / "metrics.jsonl"), str(other), "--output", str(tmp_path / "both.png"))
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "both.png") as image:
        image.load()
        assert image.size == (700, 450)


def test_plot_refuses_a_file_without_losses_in_one_line(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "lr": 0.1}\n')
    result = run_cli("plot", str(bad), "--output", str(tmp_path / "x.png"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "holds no loss to draw" in result.stderr and not (tmp_path / "x.png").exists()


# the CLI's main with one tracker package hidden from importlib, as on a machine without it
HIDDEN = """
import importlib.util, sys
find, hidden = importlib.util.find_spec, sys.argv.pop(1)
importlib.util.find_spec = lambda name, *a, **k: None if name == hidden else find(name, *a, **k)
from peftrun.cli import main
main()
"""


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb", "trackio"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, name):
    root = tmp_path
    data = tiny_recipe_dict(root / "model", write_rows(root / "data" / "train.csv").parent, root / "out")
    data["training"]["report_to"] = [name]
    recipe = write_recipe(root / "r.yaml", data)
    result = subprocess.run(
        [sys.executable, "-c", HIDDEN, name, "train", str(recipe)], capture_output=True, text=True, timeout=300,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'peftrun[{name}]'" in lines[0], lines
    assert not (root / "out").exists()  # stopped before anything was built


def test_report_to_is_off_by_default_and_checked():
    data = {"model": {"name_or_path": "x", "task_type": "SEQ_CLS"}, "data": {"path": "d"}}
    assert recipe_from_dict(data).training.report_to == []
    data["training"] = {"report_to": "tensorboard"}
    assert recipe_from_dict(data).training.report_to == ["tensorboard"]
    data["training"] = {"report_to": ["tensorbord"]}
    with pytest.raises(Exception, match="report_to"):
        recipe_from_dict(data)


def test_numbers_and_flat_config():
    assert numbers({"step": 3, "loss": 0.5, "ok": True, "bad": float("nan"), "name": "x", "n": 2}) == {
        "loss": 0.5, "n": 2,
    }
    assert flat_config({"a": {"b": 1, "c": [1, 2], "d": None}}) == {"a.b": 1, "a.c": "[1, 2]", "a.d": "null"}

