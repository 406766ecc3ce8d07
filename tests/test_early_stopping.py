"""Step-based evaluation (training.eval_steps), early stopping on a reported metric, and load_best_at_end
(peftrun/training/best.py and the loop), on the tiny BERT classifier of tinyrun.py (10 optimizer steps per epoch):
the cadence in metrics.jsonl, a run that stops exactly where its metric says, the final adapter equal to the
checkpoint of the best step, and a run killed and resumed equal to one that never stopped."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import run_cli
from faults import fault_env
from safetensors.torch import load_file
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

from peftrun.errors import PeftrunError
from peftrun.recipe import recipe_from_dict
from peftrun.training.best import BestState, Criterion, track
from peftrun.training.hooks import Hooks
from peftrun.training.loop import train
from peftrun.training.resume import complete_checkpoints, read_position


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    model = tiny_model_dir(root)
    write_rows(root / "data" / "train.csv", 40)
    write_rows(root / "data" / "validation.csv", 12)
    return root, model


def recipe_dict(work, name: str, **training) -> dict:
    root, model = work
    return tiny_recipe_dict(model, root / "data", root / name, **{"logging_steps": 1, **training})


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if "mem" not in k.lower()} for row in rows]


def adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().max().item() == 0 for k in a)


class ScriptedEval(Hooks):
    """Replaces each evaluation's eval_loss by the next scripted value (the metric the test decides)."""

    def __init__(self, values: list[float]):
        self.values = list(values)
        self.steps: list[int] = []

    def at(self, point, step, value=None):
        if point == "eval_metrics":
            self.steps.append(step)
            return {**value, "eval_loss": self.values.pop(0)}
        return value


# ------------------------------------------------------------------ the rule, alone


def test_track_counts_improvements_by_min_delta_and_stops_after_patience():
    crit = Criterion("eval_loss", "auto", patience=2, min_delta=0.05)
    state = BestState()
    assert track(state, crit, 2, {"eval_loss": 1.0}) == "best eval_loss=1.000000 at step 2"
    assert track(state, crit, 4, {"eval_loss": 0.97}) is None  # better, but by less than min_delta
    assert (state.bad, state.step) == (1, 2)
    assert track(state, crit, 4, {"eval_loss": 0.1}) is None  # the same step again (a resumed epoch end): ignored
    assert track(state, crit, 6, {"eval_loss": 0.9}).startswith("best")
    assert state.bad == 0 and state.step == 6
    track(state, crit, 8, {"eval_loss": 0.9})
    assert not state.stopped
    assert track(state, crit, 10, {"eval_loss": float("nan")}).startswith("early stopping at step 10")
    assert state.stopped and state.step == 6


def test_track_reads_higher_is_better_metrics_and_names_a_missing_one():
    state = BestState()
    crit = Criterion("accuracy", "auto", patience=1, min_delta=0.0)  # auto: accuracy is better higher
    track(state, crit, 1, {"eval_loss": 1.0, "accuracy": 0.5})
    track(state, crit, 2, {"eval_loss": 2.0, "accuracy": 0.6})
    assert state.step == 2 and state.metric == "accuracy"
    assert track(state, Criterion("loss", "auto", 1, 0.0), 3, {"eval_loss": 1.0}) is not None  # eval_ optional
    with pytest.raises(PeftrunError, match=r"'bleu' is not reported .*\(it reports: accuracy, eval_loss\)"):
        track(BestState(), Criterion("bleu", "max", 1, 0.0), 1, {"eval_loss": 1.0, "accuracy": 0.5})


def test_the_state_round_trips_through_a_checkpoint_file(tmp_path):
    from dataclasses import asdict

    from peftrun.training.resume import STATE_FILE, Position

    position = Position(step=6, best=BestState("eval_loss", 0.25, 4, 1, 6, False))
    (tmp_path / STATE_FILE).write_text(json.dumps(asdict(position)))
    assert read_position(tmp_path).best == position.best
    (tmp_path / STATE_FILE).write_text(json.dumps({**asdict(position), "best": {"bad": "x"}}))
    with pytest.raises(PeftrunError, match="best.bad"):
        read_position(tmp_path)


# ------------------------------------------------------------------ runs


def test_eval_steps_cadence_and_a_scripted_metric_stops_exactly_there(work):
    # evaluations at steps 2, 4, 6, 8, 10; the best at step 4; 6, 8 (by less than min_delta) and 10 are bad
    hooks = ScriptedEval([1.0, 0.8, 0.85, 0.79, 0.9])
    data = recipe_dict(
        work, "scripted", eval_steps=2, eval_each_epoch=False, save_steps=5, keep_last_n=1,
        early_stopping={"metric": "eval_loss", "mode": "min", "patience": 3, "min_delta": 0.05},
        load_best_at_end=True,
    )
    out = Path(data["output_dir"])
    train(recipe_from_dict(data), hooks=hooks)
    rows = records(out)
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "train_epoch_loss" not in r]
    assert evals == [(2, 1.0), (4, 0.8), (6, 0.85), (8, 0.79), (10, 0.9)]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))  # stopped after step 10
    stop = next(r for r in rows if r.get("early_stopped"))
    assert (stop["step"], stop["best_step"], stop["best_value"], stop["bad_evaluations"]) == (10, 4, 0.8, 3)
    final = next(r for r in rows if "final_adapter_step" in r)
    assert (final["final_adapter_step"], final["best_metric"]) == (4, "eval_loss")
    # the epoch's record reuses step 10's evaluation (no second evaluation at the same step)
    assert hooks.steps == [2, 4, 6, 8, 10]
    # the best step's checkpoint is kept through pruning (keep_last_n 1), and it is the final adapter
    assert [p.name for p in complete_checkpoints(out)] == ["step-000004", "step-000010"]
    assert same_tensors(adapter(out), adapter(out / "checkpoints" / "step-000004"))
    assert not same_tensors(adapter(out), adapter(out / "checkpoints" / "step-000010"))


def test_early_stopping_on_the_real_metric_stops_where_metrics_jsonl_says(work):
    es = {"metric": "eval_loss", "patience": 2, "min_delta": 0.0}
    data = recipe_dict(work, "real", eval_steps=3, eval_each_epoch=False, early_stopping=es, load_best_at_end=True)
    out = Path(data["output_dir"])
    train(recipe_from_dict(data))
    rows = records(out)
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "train_epoch_loss" not in r]
    assert [s for s, _ in evals][:3] == [3, 6, 9]
    # replay the rule on the logged values: where it stops and which step is best
    best, best_step, bad, stop = None, None, 0, None
    for step, value in evals:
        if best is None or value < best:
            best, best_step, bad = value, step, 0
        else:
            bad += 1
            if bad == 2:
                stop = step
                break
    last_step = max(r["step"] for r in rows if "loss" in r)
    final = next(r for r in rows if "final_adapter_step" in r)
    assert final["final_adapter_step"] == best_step
    if stop is None:
        assert last_step == 30 and not any(r.get("early_stopped") for r in rows)
    else:
        assert last_step == stop
        assert next(r for r in rows if r.get("early_stopped"))["step"] == stop


def test_a_killed_run_resumes_to_the_same_early_stop_and_best_adapter(work):
    # min_delta 1: only the first evaluation (step 2) improves; 4, 6, 8 are bad and stop the run at step 8
    training = dict(
        eval_steps=2, save_steps=2, keep_last_n=2, early_stopping={"patience": 3, "min_delta": 1.0},
        load_best_at_end=True,
    )
    ref_recipe = write_recipe(work[0] / "es_ref.yaml", recipe_dict(work, "es_ref", **training))
    proc = run_cli("train", str(ref_recipe))
    assert proc.returncode == 0, proc.stderr
    assert "early stopping at step 8" in proc.stdout
    assert "load_best_at_end: the final adapter is the one of step 2" in proc.stdout
    ref = work[0] / "es_ref"

    recipe = write_recipe(work[0] / "es_kill.yaml", recipe_dict(work, "es_kill", **training))
    out = work[0] / "es_kill"
    proc = run_cli("train", str(recipe), env=fault_env("after_step:7:kill"))
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002", "step-000004", "step-000006"]
    state = read_position(out / "checkpoints" / "step-000006").best
    assert (state.step, state.bad, state.last_step, state.stopped) == (2, 2, 6, False)

    done = run_cli("train", str(recipe), "--resume")
    assert done.returncode == 0, done.stderr
    assert "early stopping at step 8" in done.stdout
    assert same_tensors(adapter(out), adapter(ref))
    assert same_tensors(adapter(out), adapter(out / "checkpoints" / "step-000002"))
    got, want = records(out), records(ref)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    # the best step's checkpoint survived pruning beside the last two
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002", "step-000006", "step-000008"]


def test_early_stopping_at_epoch_ends_alone(work):
    # no eval_steps: the epochs' evaluations (steps 10, 20) count; the second is worse and patience is 1
    hooks = ScriptedEval([0.5, 0.6])
    data = recipe_dict(work, "epochs", early_stopping={"patience": 1}, load_best_at_end=True)
    out = Path(data["output_dir"])
    train(recipe_from_dict(data), hooks=hooks)
    rows = records(out)
    assert hooks.steps == [10, 20]
    assert [r["epoch"] for r in rows if "train_epoch_loss" in r] == [0, 1]  # the third epoch never ran
    assert next(r for r in rows if r.get("early_stopped"))["step"] == 20
    assert next(r for r in rows if "final_adapter_step" in r)["final_adapter_step"] == 10
    assert same_tensors(adapter(out), adapter(out / "checkpoints" / "step-000010"))
