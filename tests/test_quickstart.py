"""The embedded default: MiniLM + LoRA on the quickstart reviews, offline, to >= 80% held-out accuracy."""

from __future__ import annotations

import json

from conftest import run_cli


def test_quickstart_recipe_trains_to_80_percent(minilm_path, tmp_path):
    out = tmp_path / "quickstart"
    result = run_cli("train", "recipes/quickstart.yaml", "--set", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainable params: 74,498 || all params: 22,788,484 || trainable%: 0.3269" in result.stdout
    assert "CPU Peak Memory consumed during the train (max-begin):" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "accuracy" in r][-1]
    assert final["accuracy"] >= 0.80
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    # and the saved adapter evaluates the same when loaded back
    from peftrun.io.loading import load_adapted

    model, tokenizer = load_adapted(out)
    assert model.parameter_counts()[1] == 22_788_484
