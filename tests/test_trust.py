"""Issue #13, classes 1, 2, 3 and 7: nothing from an adapter folder switches on code or pickle; no command deletes
or replaces a folder it did not write; one run per output folder; a run writes nothing under the home folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli
from faults import fault_env
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

from peftrun.errors import PeftrunError
from peftrun.io.lock import hold_lock
from peftrun.io.outputs import (
    LOCK,
    MARKER,
    RUN_CACHE,
    check_output_file,
    check_output_folder,
    remove_inside,
    user_path,
    write_marker,
)
from peftrun.io.peft_format import RECIPE_COPY, save_adapter
from peftrun.training.resume import clear_checkpoints, prune


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("trust"))


def lora_adapter(model_dir: Path, folder: Path, **recipe_model) -> Path:
    """A LoRA adapter on the tiny classifier; recipe_model: a saved recipe's model section beside it."""
    from peftrun.adapted import wrap
    from peftrun.methods import get_method
    from peftrun.models import load_model
    from peftrun.recipe import ModelSection

    section = ModelSection(name_or_path=str(model_dir), task_type="SEQ_CLS", num_labels=2)
    peft_model = wrap(load_model(section), "SEQ_CLS", "lora", get_method("lora").Config(r=4))
    save_adapter(peft_model, folder, base_model=str(model_dir))
    if recipe_model:
        model = {"name_or_path": str(model_dir), "task_type": "SEQ_CLS", "num_labels": 2, **recipe_model}
        recipe = {"model": model, "method": {"name": "lora", "r": 4}, "data": {"path": "data"}}
        (folder / RECIPE_COPY).write_text(yaml.safe_dump(recipe))
    return folder


def hostile_folder(model_dir: Path, root: Path) -> tuple[Path, Path]:
    """A base model folder whose Python file writes a marker when it is imported: what remote code could do."""
    folder = root / "remote-base"
    folder.mkdir()
    marker = root / "code-ran"
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="hostile", auto_map={"AutoConfig": "custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    (folder / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig\n\nclass CustomConfig(BertConfig):\n    model_type = 'hostile'\n"
    )
    return folder, marker


def expect_refusal(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for part in parts:
        assert part in proc.stderr, (part, proc.stderr)


# ------------------------------------------------------------------ class 1: the trust boundary


def test_adapter_folder_cannot_switch_on_remote_code(model_dir, tmp_path):
    base, marker = hostile_folder(model_dir, tmp_path)
    adapter = lora_adapter(model_dir, tmp_path / "adapter", name_or_path=str(base), trust_remote_code=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    out = tmp_path / "merged"
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(out))
    expect_refusal(proc, "saved recipe asks for model.trust_remote_code", "never takes that from an adapter folder",
                   str(adapter / RECIPE_COPY), "--trust-remote-code")
    proc = run_cli("generate", "--adapter", str(adapter), "hello")
    expect_refusal(proc, "saved recipe asks for model.trust_remote_code")
    assert not marker.exists() and not out.exists()

    # the same adapter without the saved recipe: the base's code is still refused (the caller did not ask)
    (adapter / RECIPE_COPY).unlink()
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(out))
    expect_refusal(proc, "exists only as Python code")
    assert not marker.exists() and not out.exists()


def test_trust_flags_come_from_the_caller_only(model_dir, tmp_path):
    from peftrun.io.loading import model_section_for

    adapter = lora_adapter(model_dir, tmp_path / "adapter", allow_pickle=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    with pytest.raises(PeftrunError, match="asks for model.allow_pickle") as info:
        model_section_for(adapter, config, None, {})
    assert "--allow-pickle" in info.value.hint and info.value.where == str(adapter / RECIPE_COPY)
    assert model_section_for(adapter, config, None, {}, allow_pickle=True).allow_pickle
    # a folder that asks for nothing gets nothing, and the caller's consent is what counts
    (adapter / RECIPE_COPY).write_text(yaml.safe_dump({"model": {"offload_folder": "/tmp/x", "num_labels": 2}}))
    section = model_section_for(adapter, config, None, {})
    assert not section.trust_remote_code and not section.allow_pickle and section.offload_folder is None
    assert model_section_for(adapter, config, None, {}, trust_remote_code=True).trust_remote_code


def test_pickle_request_from_a_saved_recipe_is_refused_by_merge(model_dir, tmp_path):
    adapter = lora_adapter(model_dir, tmp_path / "adapter", allow_pickle=True)
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged"))
    expect_refusal(proc, "saved recipe asks for model.allow_pickle", "--allow-pickle")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "text, message",
    [("- a\n- b\n", "YAML mapping"), ("model: [1, 2]\n", "section 'model' must be a mapping"),
     ("model:\n  num_labels: many\n", "model.num_labels: Input should be a valid integer")],
)
def test_malformed_saved_recipe_is_one_line_naming_the_file(model_dir, tmp_path, text, message):
    from peftrun.io.loading import model_section_for

    adapter = lora_adapter(model_dir, tmp_path / "adapter")
    (adapter / RECIPE_COPY).write_text(text)
    config = json.loads((adapter / "adapter_config.json").read_text())
    with pytest.raises(PeftrunError, match=message) as info:
        model_section_for(adapter, config, None, {})
    assert str(adapter / RECIPE_COPY) in info.value.render()


def test_combine_does_not_carry_the_trust_flags(model_dir, tmp_path):
    adapter = lora_adapter(model_dir, tmp_path / "a", trust_remote_code=True, allow_pickle=True)
    out = tmp_path / "combined"
    proc = run_cli("combine", "--adapter", f"{adapter}:1", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((out / RECIPE_COPY).read_text())
    assert "trust_remote_code" not in saved["model"] and "allow_pickle" not in saved["model"]
    assert json.loads((out / MARKER).read_text())["written_by"] == "peftrun combine"

    # class 2: --overwrite never reaches an input, nor the folder that holds one
    proc = run_cli("combine", "--adapter", f"{adapter}:1", "--output", str(tmp_path), "--overwrite")
    expect_refusal(proc, "a folder above the input adapter")
    assert (adapter / "adapter_model.safetensors").is_file() and (out / MARKER).is_file()
    # a folder combine wrote is replaced with --overwrite only; not once someone added a file to it
    proc = run_cli("combine", "--adapter", f"{adapter}:1", "--output", str(out))
    expect_refusal(proc, "not empty", "--overwrite")
    proc = run_cli("combine", "--adapter", f"{adapter}:0.5", "--output", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    (out / "notes.txt").write_text("mine")
    proc = run_cli("combine", "--adapter", f"{adapter}:1", "--output", str(out), "--overwrite")
    expect_refusal(proc, "'notes.txt', which peftrun did not write")
    assert (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ class 2: outputs


def test_merge_output_policy(model_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "diary.txt").write_text("mine")
    root = home / "work"
    adapter = lora_adapter(model_dir, root / "adapter")
    (root / "sibling").mkdir()
    (root / "sibling" / "keep.txt").write_text("keep")
    env = {"HOME": str(home)}

    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(root), "--overwrite", env=env)
    expect_refusal(proc, "a folder above the adapter folder")
    proc = run_cli("merge", "--adapter", str(adapter), "--output", "~", "--overwrite", env=env)
    expect_refusal(proc, "your home folder")
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(root / "sibling"), "--overwrite", env=env)
    expect_refusal(proc, "'keep.txt', which peftrun did not write")
    assert (adapter / "adapter_model.safetensors").is_file() and (root / "sibling" / "keep.txt").is_file()
    assert (home / "diary.txt").read_text() == "mine"

    # `~` expanded; a folder merge wrote is replaced only with --overwrite
    proc = run_cli("merge", "--adapter", "~/work/adapter", "--output", "~/work/merged", env=env)
    assert proc.returncode == 0, proc.stderr
    merged = root / "merged"
    assert (merged / "config.json").is_file() and not (tmp_path / "~").exists()
    assert json.loads((merged / MARKER).read_text())["written_by"] == "peftrun merge"
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(merged), env=env)
    expect_refusal(proc, "not empty", "--overwrite")
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(merged), "--overwrite", env=env)
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no lock or temporary folder left


def test_output_checks_unit(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert user_path("~/x") == tmp_path / "home" / "x"
    with pytest.raises(PeftrunError, match="your home folder"):
        check_output_folder("~", where="--output")
    with pytest.raises(PeftrunError, match="filesystem root"):
        check_output_folder("/", where="--output", overwrite=True)
    with pytest.raises(PeftrunError, match="peftrun sources"):
        check_output_folder(REPO / "peftrun" / "io", where="--output", overwrite=True)
    data = tmp_path / "rows.csv"
    data.write_text("text\nhi\n")
    with pytest.raises(PeftrunError, match="the --input file itself"):
        check_output_file(data, where="--output", inputs=[(data, "the --input file")])
    (tmp_path / "folder").mkdir()
    with pytest.raises(PeftrunError, match="is a folder"):
        check_output_file(tmp_path / "folder", where="--output")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "folder", target_is_directory=True)
    with pytest.raises(PeftrunError, match="symbolic link"):
        check_output_folder(link, where="--output", overwrite=True)
    # a marker without a file list (a train's output_dir) never allows a whole-folder replacement
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    write_marker(out, "train", list_files=False)
    with pytest.raises(PeftrunError, match="which peftrun did not write"):
        check_output_folder(out, where="--output", overwrite=True)


def test_predict_output_never_replaces_its_input(model_dir, tmp_path):
    rows = write_rows(tmp_path / "data" / "train.csv", 8)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(model_dir, tmp_path / "data", tmp_path / "out"))
    before = rows.read_bytes()
    proc = run_cli("predict", str(recipe), "--input", str(rows), "--output", str(rows))
    expect_refusal(proc, "the --input file itself")
    assert rows.read_bytes() == before


def test_symlinked_checkpoints_never_lead_to_deletion_outside(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    for step in (1, 2, 3):
        (elsewhere / f"step-{step:06d}").mkdir(parents=True)
        (elsewhere / f"step-{step:06d}" / "trainer_state.json").write_text("{}")
    (elsewhere / ".step-000004.partial").mkdir()
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    assert prune(out, 1) == []
    with pytest.raises(PeftrunError, match="symbolic link on the way"):
        remove_inside(out / "checkpoints" / "step-000001", out)
    clear_checkpoints(out)
    assert not (out / "checkpoints").exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == [".step-000004.partial", "step-000001", "step-000002",
                                                         "step-000003"]
    # a real checkpoints/ loses only what peftrun writes there
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "checkpoints" / "mine.txt").write_text("mine")
    (out / "checkpoints" / "step-000002").symlink_to(elsewhere / "step-000002", target_is_directory=True)
    clear_checkpoints(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["mine.txt"]
    assert (elsewhere / "step-000002" / "trainer_state.json").is_file()


# ------------------------------------------------------------------ class 3: one run per folder


def test_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    lock = tmp_path / LOCK
    code = (
        "import sys\nfrom peftrun.io.lock import hold_lock\nfrom peftrun.errors import PeftrunError\n"
        f"try:\n    with hold_lock({str(lock)!r}, what='the folder', command='test'):\n        print('took it')\n"
        "except PeftrunError as exc:\n    print(exc.render())\n"
    )
    with hold_lock(lock, what="the folder", command="test"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert "in use by another peftrun run" in proc.stdout and f"pid {os.getpid()}" in proc.stdout, proc
        assert socket.gethostname() in proc.stdout
    assert not lock.exists()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert "took it" in proc.stdout and "stale" not in proc.stderr, proc


def test_two_trains_on_one_folder(model_dir, tmp_path):
    write_rows(tmp_path / "data" / "train.csv", 16)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(model_dir, tmp_path / "data", out, num_epochs=1))
    env = {**os.environ, **fault_env("after_step:1:sleep40")}
    first = subprocess.Popen([sys.executable, "-m", "peftrun", "train", str(recipe)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((out / LOCK).is_file() and (out / LOCK).read_text().strip()) and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.5)
        second = run_cli("train", str(recipe))
        expect_refusal(second, "in use by another peftrun run", f"pid {first.pid}", "started")
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert (out / "adapter_model.safetensors").is_file() and "adapter saved" in stdout
    assert not (out / LOCK).exists() and not (out / RUN_CACHE).exists()


# ------------------------------------------------------------------ class 7 (and `~`, stale locks): a train


def test_train_takes_over_a_stale_lock_and_writes_nothing_under_home(model_dir, tmp_path):
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00", "command": "train"}
    (home / "run" / LOCK).write_text(json.dumps(stale))
    write_rows(tmp_path / "data" / "train.csv", 16)
    data = tiny_recipe_dict(model_dir, tmp_path / "data", Path("~/run"), num_epochs=1)
    data["output_dir"] = "~/run"
    recipe = write_recipe(tmp_path / "r.yaml", data)
    proc = run_cli("train", str(recipe), env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert "stale lock" in proc.stderr and f"pid {dead.pid}" in proc.stderr
    run = home / "run"
    assert (run / "adapter_model.safetensors").is_file() and not (run / LOCK).exists()
    assert not (run / RUN_CACHE).exists()
    assert json.loads((run / MARKER).read_text())["written_by"] == "peftrun train"
    assert sorted(p.name for p in home.iterdir()) == ["run"], list(home.rglob("*"))[:10]
