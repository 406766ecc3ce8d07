"""Atomic writes: a save that fails or is killed half-way leaves what was there before intact and loadable;
a failed merge or evaluation deletes or overwrites nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from faults import fault_env
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

from peftrun.io.atomic import atomic_dir, atomic_files
from peftrun.io.peft_format import ADAPTER_CONFIG, read_adapter


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# ------------------------------------------------------------------ the primitives


def test_atomic_dir_error_mid_write_leaves_the_old_folder(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "weights").write_text("new, half")
        raise RuntimeError("disk full")
    assert (final / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the temporary folder is gone


def test_atomic_dir_replaces_whole(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "stale").write_text("x")
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("2")
    assert tree_digest(final).keys() == {"a"} and (final / "a").read_text() == "2"


def test_atomic_files_moves_the_config_last_and_keeps_other_files(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}\n")
    moved = []
    real_replace = os.replace

    def spy(src, dst):
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text("{}")
        (tmp / "adapter_model.safetensors").write_text("w")
        (tmp / "tokenizer_config.json").write_text("{}")

    atomic_files(folder, write)
    assert moved[-1] == ADAPTER_CONFIG
    assert (folder / "metrics.jsonl").read_text() == "{}\n"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_sigkill_inside_an_adapter_save_keeps_the_previous_adapter(tmp_path):
    """A real SIGKILL while the new weights are being written: the old adapter still loads, bit for bit."""
    folder = tmp_path / "adapter"
    code = f"""
        import os, signal, torch
        from tiny import tiny_model
        from peftrun.adapted import wrap
        from peftrun.io.peft_format import save_adapter
        from peftrun.methods import get_method

        model = wrap(tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", "lora", get_method("lora").Config(r=2))
        save_adapter(model, {str(folder)!r}, base_model="tiny")
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)

        def dying_save(tensors, path, metadata=None):
            with open(path, "wb") as fh:
                fh.write(b"half a file")
                fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        import peftrun.io.peft_format as ck
        ck.save_file = dying_save
        save_adapter(model, {str(folder)!r}, base_model="tiny")
    """
    proc = run_python(code)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    config, state = read_adapter(folder)
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert all(torch.all(v == 0) for k, v in state.items() if "lora_B" in k)  # the first save, untouched
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(hidden) == 1 and hidden[0].startswith(".adapter.tmp-")  # the killed save, beside it


# ------------------------------------------------------------------ merge never loses the adapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peftrun.adapted import wrap
    from peftrun.io.peft_format import save_adapter
    from peftrun.methods import get_method
    from peftrun.models import load_model
    from peftrun.recipe import ModelSection

    root = tmp_path_factory.mktemp("merge")
    model_dir = tiny_model_dir(root)
    section = ModelSection(name_or_path=str(model_dir), task_type="SEQ_CLS", num_labels=2)
    peft_model = wrap(load_model(section), "SEQ_CLS", "lora", get_method("lora").Config(r=4, lora_alpha=8))
    with torch.no_grad():  # a non-zero update, so merging changes the weights
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return save_adapter(peft_model, root / "adapter", base_model=str(model_dir))


def test_merge_refuses_to_write_into_the_adapter_folder(adapter):
    before = tree_digest(adapter)
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(adapter))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--output must differ from the adapter folder" in proc.stderr
    assert tree_digest(adapter) == before


def test_merge_whose_outputs_disagree_writes_nothing(adapter, tmp_path):
    """A merge that silently dropped the adapter (merged logits = base logits) is caught by the probe."""
    before = tree_digest(adapter)
    out = tmp_path / "merged"
    code = f"""
        import sys
        from peftrun.adapted import PeftrunModel

        def unmerged(self):  # a broken merge: the base model back, adapter not folded in
            from peftrun.methods.layers import AdapterLayer
            from peftrun.methods.targets import set_module
            for path, module in list(self.model.named_modules()):
                if isinstance(module, AdapterLayer):
                    set_module(self.model, path, module.base_layer)
            return self.model

        PeftrunModel.merge_and_unload = unmerged
        sys.argv = ["peftrun", "merge", "--adapter", {str(adapter)!r}, "--output", {str(out)!r}]
        from peftrun.cli import main
        main()
    """
    proc = run_python(code)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "merged and unmerged outputs differ by" in proc.stderr and "nothing written" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    assert tree_digest(adapter) == before


def test_merge_success_writes_a_complete_folder(adapter, tmp_path):
    before = tree_digest(adapter)
    out = tmp_path / "merged"
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"merged model written to {out}" in proc.stdout
    diff = float(proc.stdout.split("probe input: ")[1].rstrip(")\n"))
    assert diff <= 1e-5
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert not list(out.glob("*.bin"))
    assert tree_digest(adapter) == before


# ------------------------------------------------------------------ a failed evaluation keeps the training


def test_failed_evaluation_keeps_the_trained_adapter(tmp_path):
    model = tiny_model_dir(tmp_path)
    write_rows(tmp_path / "data" / "train.csv", 16)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(model, tmp_path / "data", out, num_epochs=1))
    proc = run_cli("train", str(recipe), env=fault_env("eval:*:fail"))
    assert proc.returncode == 1  # an unexpected failure, reported as such
    step = out / "checkpoints" / "step-000004"  # 16 rows -> 14 train -> 4 batches
    assert f"evaluation failed after epoch 0; the last good checkpoint is {step}" in proc.stderr
    config, state = read_adapter(step)
    assert config["r"] == 4 and any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
