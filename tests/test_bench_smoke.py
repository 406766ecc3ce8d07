"""The benchmark harness's code paths on tiny models (nothing here is timed or compared to a target)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytest.importorskip("peft")
bench_run = pytest.importorskip("bench.run")
from bench import worker  # noqa: E402


def fake_report(**parts) -> dict:
    """A bench report as bench.run assembles it, with made-up machine facts and the given parts."""
    machine = {"cpu": "cpu", "cores": 2, "gpu": None, "torch": "t", "transformers": "x", "peft": "p", "python": "3"}
    return {
        "command": "python -m bench.run",
        "date": "today",
        "load_before": 0.1,
        "machine": machine,
        "args": {"threads": 2, "rounds": 2, "max_steal": 0.05, "max_others": 0.1, "tiny": False},
        **parts,
    }


@pytest.mark.parametrize(
    "model, config",
    [
        ("llama", "peftrun-lora-d0.1"),
        ("t5", "peft-lora-d0"),
        ("minilm", "limit"),
        ("llama", "infer-peftrun-merged"),
    ],
)


def test_worker_measures_a_configuration(model, config):
    result = worker.run(model, config, steps=2, warmup=1, threads=1, tiny=True)
    assert result["model"] == model and result["config"] == config
    assert len(result["step_times_s"]) == 2 and result["step_s"] > 0
    assert result["tokens"] == {"minilm": 16 * 128, "llama": 4 * 256, "t5": 8 * (128 + 32)}[model]
    assert result["peak_rss_mib"] > 50 and 0.0 <= result["steal"] <= 1.0
    assert (result["trainable"] > 0) == config.startswith(("peft", "full"))


def test_plain_configuration_turns_the_fast_path_off_on_its_own_model():
    from peftrun.methods.lora import LoraLayer

    spec = worker.MODELS["llama"]
    model, params = worker.prepare(worker.build_model(spec, tiny=True), spec, "peftrun-plain-d0.1")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4 and not any(m.fast_path for m in layers) and LoraLayer.fast_path
    # 2 layers x (q: A 8x32 + B 32x8; v: A 8x32 + B 16x8, two kv heads of 8)
    assert sum(p.numel() for p in params) == 2 * (8 * 32 + 32 * 8 + 8 * 32 + 16 * 8)


def test_nochunk_configuration_keeps_transformers_loss_and_mt0_runs_only_that_pair():
    import torch

    spec = worker.MODELS["t5"]
    base = worker.build_model(spec, tiny=True)
    batch, _ = worker.make_batch(spec, base.config.vocab_size)
    chunked, _ = worker.prepare(base, spec, "peftrun-lora-d0.1")
    plain, _ = worker.prepare(worker.build_model(spec, tiny=True), spec, "peftrun-nochunk-d0.1")
    assert chunked.chunked_loss and not plain.chunked_loss
    torch.manual_seed(0)
    assert chunked.train()(**batch).logits is None  # the T5 row's LoRA takes the chunked loss
    assert plain.train()(**batch).logits is not None
    assert bench_run.runs_on("mt0", "peftrun-nochunk-d0.1") and not bench_run.runs_on("mt0", "full")
    assert bench_run.runs_on("t5", "peftrun-nochunk-d0.1") and bench_run.runs_on("t5", "full")
    assert not bench_run.runs_on("minilm", "peftrun-nochunk-d0.1")
    tiny_mt0 = worker.build_model(worker.MODELS["mt0"], tiny=True)
    assert tiny_mt0.config.model_type == "mt5"


def test_worker_runs_in_its_own_process():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.worker",
            "minilm",
            "peftrun-lora-d0",
            "--tiny",
            "--steps",
            "1",
            "--threads",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**bench_run.child_env(1)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")][-1]
    assert json.loads(line.split(" ", 1)[1])["config"] == "peftrun-lora-d0"


def _run(model, config, step_s, rss, steal=0.0, rnd=0):
    return {
        "model": model,
        "config": config,
        "step_s": step_s,
        "tokens_per_s": 100 / step_s,
        "peak_rss_mib": rss,
        "steal": steal,
        "round": rnd,
        "kept": steal <= 0.05,
    }


def test_summary_ratios_drop_stolen_runs_and_report_missed_targets(tmp_path):
    runs = [
        _run("llama", "limit", 1.0, 1000),
        _run("llama", "limit", 1.2, 1000, rnd=1),
        _run("llama", "peftrun-lora-d0.1", 1.08, 1040),
        _run("llama", "peftrun-lora-d0.1", 1.32, 1040, rnd=1),
        _run("llama", "peftrun-lora-d0.1", 9.0, 5000, steal=0.3),  # left out
        _run("llama", "peft-lora-d0.1", 1.3, 1200),
        _run("llama", "infer-base", 0.5, 900),
        _run("llama", "infer-peftrun-merged", 0.505, 900),
    ]
    summary = bench_run.summarise(runs)["llama"]
    assert summary["configs"]["limit"]["step_s"] == pytest.approx(1.1)
    assert summary["configs"]["peftrun-lora-d0.1"]["runs"] == 2
    ratios = summary["ratios"]
    assert ratios["time:peftrun-lora-d0.1/limit"] == pytest.approx(1.2 / 1.1)
    assert ratios["rss:peftrun-lora-d0.1/limit"] == pytest.approx(1.04)
    assert ratios["time:peftrun-lora-d0.1/peft-lora-d0.1"] == pytest.approx(1.2 / 1.3)
    assert ratios["time:infer-peftrun-merged/infer-base"] == pytest.approx(1.01)
    report = fake_report(
        models={"llama": summary},
        e2e={"ratios": {"wall": 0.5, "rss": 0.95, "accuracy_points": -0.4}, "median": {}, "runs": []},
    )
    bench_run.write_markdown(tmp_path / "RESULTS.md", report)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| LoRA step time, dropout 0.1, vs the limit | llama | 1.091 | ≤ 1.05 | MISSED |" in text
    assert "| LoRA peak RSS, dropout 0.1, vs the limit | llama | 1.040 | ≤ 1.05 | met |" in text
    assert "| merged-adapter inference vs the base | llama | 1.010 | ≤ 1.02 | met |" in text
    assert "wall time vs HF peft + Trainer | minilm | 0.500 | ≤ 0.60 | met |" in text
    assert "- SST-2 peak RSS (minilm): 0.950 against ≤ 0.90, 5.6% over." in text
    assert "LoRA step time, dropout 0.1, vs the limit (llama): 1.091 against ≤ 1.05, 3.9% over." in text


@pytest.mark.slow
def test_end_to_end_pair_runs_on_a_slice_of_sst2(tmp_path):
    from conftest import shared_data

    data = shared_data("glue_sst2")
    args = bench_run.argparse.Namespace(tiny=True, threads=2)
    for impl in ("peftrun", "peft"):
        res = bench_run.e2e_once(impl, data, tmp_path / impl, args)
        assert "error" not in res, res.get("error")
        assert 0.0 <= res["accuracy"] <= 1.0 and res["peak_rss_mib"] > 100 and res["wall_s"] > 0


def test_cli_latency_rows(tmp_path):
    """The CLI's latency in the bench: each command in fresh processes, medians, a Targets row and a section."""
    args = bench_run.argparse.Namespace(cli_rounds=1, threads=1)
    cli = bench_run.run_cli_latency(args)
    assert "error" not in cli, cli.get("error")
    assert set(cli["commands"]) == set(bench_run.CLI_COMMANDS)
    assert all(v["runs"] == 1 and v["median_s"] > 0 for v in cli["commands"].values())
    row, section = bench_run.cli_markdown(cli)
    assert row[0].startswith("| CLI: `peftrun validate` wall time, s | cli | ")
    assert "| `python -c pass` |" in "\n".join(section)
    assert f"| `peftrun validate {bench_run.CLI_RECIPE}` |" in "\n".join(section)


def test_worker_takes_another_batch_size_and_length():
    result = worker.run(
        "llama", "peft-lora-d0.1", steps=1, warmup=0, threads=1, tiny=True, batch_size=2, length=48
    )
    assert (result["batch"], result["length"], result["tokens"]) == (2, 48, 96)


def _scaling_runs():
    from bench import scaling

    runs = []
    for sweep, batch, length in scaling.points(tiny=False):
        tokens = batch * length
        for config, per_token in (("peftrun-lora-d0.1", 0.5), ("peft-lora-d0.1", 1.0)):
            runs.append(
                {
                    "config": config,
                    "sweep": sweep,
                    "batch": batch,
                    "length": length,
                    "step_s": 0.001 * tokens,
                    "peak_rss_mib": 1000 + per_token * tokens,
                }
            )
    return runs


def test_scaling_points_slopes_table_and_plot(tmp_path):
    from bench import scaling

    pts = scaling.points(tiny=False)
    assert [(b, n) for s, b, n in pts if s == "length"] == [(1, 256), (1, 512), (1, 1024), (1, 2048)]
    assert [(b, n) for s, b, n in pts if s == "batch"] == [(2, 256), (4, 256), (8, 256)]  # 1 x 256 is shared
    summary = scaling.summarise(_scaling_runs(), tiny=False)
    assert summary["slopes"]["length:peftrun:rss"] == pytest.approx(0.5)
    assert summary["slopes"]["length:peft:rss"] == pytest.approx(1.0)
    assert summary["slopes"]["length:rss_ratio"] == pytest.approx(0.5)
    assert summary["slopes"]["batch:rss_ratio"] == pytest.approx(0.5)
    assert len(summary["table"]) == 7
    assert scaling.target_rows(summary) == [
        ("peak RSS per token (length sweep): peftrun slope / peft slope", "llama", pytest.approx(0.5), 0.8)
    ]
    png = scaling.plot(summary, tmp_path / "scaling.png", tiny=False)
    assert png is not None and png.stat().st_size > 1000
    text = "\n".join(scaling.markdown(summary, png.name))
    assert "| 1 × 2048 | 2048 | 2.05 | 2.05 | 2024 | 3048 | 0.664 |" in text
    assert "| length | 0.500 | 1.000 | 0.500 |" in text and "![LoRA step cost" in text


def test_trl_comparisons_in_the_targets_and_sections(tmp_path):
    from bench import e2e_trl, scaling

    sft = {
        "cut": {"max_train_samples": 256, "num_epochs": 1},
        "median": {
            "peftrun": {"wall_s": 100.0, "peak_rss_mib": 1500, "eval_loss": 1.505, "steps": 20},
            "trl": {"wall_s": 200.0, "peak_rss_mib": 2500, "eval_loss": 1.5, "steps": 20},
        },
        "ratios": {"wall": 0.5, "rss": 0.6, "metric": 1.505 / 1.5 - 1},
        "runs": [],
    }
    dpo = {
        "cut": {"max_train_samples": 128, "num_epochs": 1},
        "median": {
            "peftrun": {"wall_s": 150.0, "peak_rss_mib": 2000, "eval_rewards/accuracies": 0.6},
            "trl": {"wall_s": 200.0, "peak_rss_mib": 2500, "eval_rewards/accuracies": 0.55},
        },
        "ratios": {"wall": 0.75, "rss": 0.8, "metric": 0.05},
        "runs": [{"impl": "trl", "error": "boom"}],
    }
    rows = e2e_trl.target_rows("dpo", dpo)
    assert [ok for *_, ok in rows] == [False, False, True]
    report = fake_report(
        models={}, sft=sft, dpo=dpo,
        scaling=dict(scaling.summarise(_scaling_runs(), tiny=False), plot="scaling.png"),
    )
    bench_run.write_markdown(tmp_path / "RESULTS.md", report)
    text = (tmp_path / "RESULTS.md").read_text()
    assert (
        "| chat SFT end to end: wall time vs trl SFTTrainer + peft | smollm2 | 0.500 | ≤ 0.60 | met |" in text
    )
    assert "| chat SFT end to end: held-out loss difference | smollm2 | +0.33% | within ±1% | met |" in text
    assert (
        "| DPO end to end: wall time vs trl DPOTrainer + peft | smollm2 | 0.750 | ≤ 0.70 | MISSED |" in text
    )
    assert (
        "| peak RSS per token (length sweep): peftrun slope / peft slope | llama | 0.500 | ≤ 0.80 | met |"
        in text
    )
    assert "- DPO end to end: peak RSS vs trl DPOTrainer + peft (smollm2): 0.800 against ≤ 0.75." in text
    assert "packing=True" in text and "adamw_torch_fused" in text and "trl failed: boom" in text


@pytest.mark.slow
def test_trl_pairs_run_on_a_slice(tmp_path):
    from bench import e2e_trl

    args = bench_run.argparse.Namespace(tiny=True, threads=2, e2e_rounds=1, trl_train_samples=None)
    for kind in ("sft", "dpo"):
        summary = e2e_trl.run_trl(kind, args, bench_run.child_env(2), print)
        if "skipped" in summary:
            pytest.skip(summary["skipped"])
        errors = [r["error"] for r in summary["runs"] if "error" in r]
        assert not errors, errors
        assert set(summary["ratios"]) == {"wall", "rss", "metric"}
