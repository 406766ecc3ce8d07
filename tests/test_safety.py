"""Safe loading: no pickle unless asked, no remote code unless asked, no secrets in files or logs,
no writes or deletes outside output_dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

from peftrun.errors import PeftrunError
from peftrun.io.peft_format import read_adapter, safe_torch_load, save_adapter
from peftrun.io.scrub import scrub
from peftrun.training.resume import remove_inside

FAKE_TOKEN = "hf_" + "Zq8" * 12  # the shape of a hub token, not a real one


class RunsCode:
    """Unpickling this writes a marker file: what a hostile pickle would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle ran code"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("safety"))


@pytest.fixture()
def adapter(model_dir, tmp_path) -> Path:
    from peftrun.adapted import wrap
    from peftrun.methods import get_method
    from peftrun.models import load_model
    from peftrun.recipe import ModelSection

    section = ModelSection(name_or_path=str(model_dir), task_type="SEQ_CLS", num_labels=2)
    peft_model = wrap(load_model(section), "SEQ_CLS", "lora", get_method("lora").Config(r=4))
    return save_adapter(peft_model, tmp_path / "adapter", base_model=str(model_dir))


# ------------------------------------------------------------------ pickle


def test_pickle_adapter_refused_unless_allowed(adapter):
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(state, adapter / "adapter_model.bin")
    with pytest.raises(PeftrunError, match=r"only a pickle file \(adapter_model.bin\)") as info:
        read_adapter(adapter)
    assert info.value.hint == "pass --allow-pickle if you trust this file"
    _, loaded = read_adapter(adapter, allow_pickle=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_pickle_that_runs_code_is_refused_even_when_allowed(adapter, tmp_path):
    marker = tmp_path / "marker"
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"x": RunsCode(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(PeftrunError, match="cannot be read safely as tensors"):
        read_adapter(adapter, allow_pickle=True)
    assert not marker.exists()
    torch.save(RunsCode(marker), tmp_path / "optimizer.pt")  # a checkpoint's optimizer state likewise
    with pytest.raises(PeftrunError, match="cannot be read safely"):
        safe_torch_load(tmp_path / "optimizer.pt")
    assert not marker.exists()


def test_merge_cli_refuses_pickle_adapter(adapter, tmp_path):
    from safetensors.torch import load_file

    torch.save(load_file(str(adapter / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pickle can run code when loaded" in proc.stderr and "--allow-pickle" in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_pickle_only_model_folder_refused_unless_allowed(model_dir, tmp_path):
    from safetensors.torch import load_file

    from peftrun.models import load_model
    from peftrun.recipe import ModelSection

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(model_dir / "config.json", folder)
    torch.save(load_file(str(model_dir / "model.safetensors")), folder / "pytorch_model.bin")
    section = ModelSection(name_or_path=str(folder), task_type="SEQ_CLS", num_labels=2)
    with pytest.raises(PeftrunError, match=r"holds only pickle weights") as info:
        load_model(section)
    assert info.value.where == "model.name_or_path" and "model.allow_pickle: true" in info.value.hint
    allowed = load_model(section.model_copy(update={"allow_pickle": True}))
    reference = load_model(ModelSection(name_or_path=str(model_dir), task_type="SEQ_CLS", num_labels=2))
    for (name, a), (_, b) in zip(allowed.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ remote code


def remote_code_folder(model_dir: Path, root: Path, model_type: str) -> tuple[Path, Path]:
    folder = root / f"remote-{model_type}"
    folder.mkdir()
    marker = root / f"ran-{model_type}"
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(model_dir / "model.safetensors", folder)
    (folder / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig\n\nclass CustomConfig(BertConfig):\n    model_type = 'custom'\n"
    )
    return folder, marker


def test_remote_code_needs_trust_remote_code(model_dir, tmp_path):
    from peftrun.models import build_from_config, load_model
    from peftrun.recipe import ModelSection

    folder, marker = remote_code_folder(model_dir, tmp_path, "custom")
    section = ModelSection(name_or_path=str(folder), task_type="SEQ_CLS", num_labels=2)
    with pytest.raises(PeftrunError, match="exists only as Python code inside") as info:
        load_model(section)
    assert info.value.where == "model.trust_remote_code" and "custom.CustomConfig" in info.value.message
    with pytest.raises(PeftrunError, match="exists only as Python code"):
        build_from_config(str(folder), "SEQ_CLS", meta=True)  # `peftrun params` too
    assert not marker.exists()


def test_known_architecture_with_auto_map_loads_without_running_its_code(model_dir, tmp_path):
    from peftrun.models import load_model
    from peftrun.recipe import ModelSection

    folder, marker = remote_code_folder(model_dir, tmp_path, "bert")
    model = load_model(ModelSection(name_or_path=str(folder), task_type="SEQ_CLS", num_labels=2))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not marker.exists()


def test_trust_remote_code_is_false_by_default():
    from peftrun.recipe import ModelSection

    assert ModelSection(name_or_path="x", task_type="SEQ_CLS").trust_remote_code is False


# ------------------------------------------------------------------ secrets


def test_scrub_drops_credential_keys_and_token_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "env-secret-123456")
    data = {
        "model": {
            "name_or_path": "m",
            "config_overrides": {"token": "a", "HF_TOKEN": "b", "note": FAKE_TOKEN},
        },
        "list": [{"api_key": "k"}, "prefix env-secret-123456 suffix", "fine"],
    }
    assert scrub(data) == {
        "model": {"name_or_path": "m", "config_overrides": {"note": "<redacted>"}},
        "list": [{}, "<redacted>", "fine"],
    }


def test_recipe_with_a_token_is_refused_without_echoing_it(model_dir, tmp_path):
    data = tiny_recipe_dict(model_dir, tmp_path / "data", tmp_path / "out")
    data["model"]["config_overrides"] = {"hf_token": FAKE_TOKEN}
    path = write_recipe(tmp_path / "r.yaml", data)
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.config_overrides.hf_token" in proc.stderr and "looks like a credential" in proc.stderr
    assert FAKE_TOKEN not in proc.stderr + proc.stdout

    data["model"]["config_overrides"] = {"description": FAKE_TOKEN}  # a token under an innocent key
    path = write_recipe(tmp_path / "r.yaml", data)
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2 and "model.config_overrides.description" in proc.stderr
    assert "looks like a hub token" in proc.stderr and FAKE_TOKEN not in proc.stderr + proc.stdout


def test_hub_token_in_the_environment_never_reaches_files_or_logs(model_dir, tmp_path):
    write_rows(tmp_path / "data" / "train.csv", 16)
    out = tmp_path / "out"
    data = tiny_recipe_dict(model_dir, tmp_path / "data", out, num_epochs=1, save_steps=2)
    path = write_recipe(tmp_path / "r.yaml", data)
    env = {"HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN}
    proc = run_cli("--debug", "train", str(path), env=env)
    assert proc.returncode == 0, proc.stderr
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10  # adapter, tokenizer, recipe copy, metrics, checkpoints
    for file in files:
        assert FAKE_TOKEN.encode() not in file.read_bytes(), file
    saved = yaml.safe_load((out / "peftrun_recipe.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(model_dir)

    # a token passed on the command line is refused too, and not echoed
    proc = run_cli("validate", str(path), "--set", f"model.revision={FAKE_TOKEN}", env=env)
    assert proc.returncode == 2 and FAKE_TOKEN not in proc.stderr + proc.stdout


# ------------------------------------------------------------------ confinement


def test_remove_inside_refuses_paths_outside_and_only_unlinks_symlinks(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(PeftrunError, match="not inside"):
        remove_inside(precious, out)
    with pytest.raises(PeftrunError, match="not inside"):
        remove_inside(out / "checkpoints" / ".." / "..", out)
    with pytest.raises(PeftrunError, match="not inside"):
        remove_inside(out, out)
    link = out / "checkpoints" / "step-000002"
    link.symlink_to(precious, target_is_directory=True)
    remove_inside(link, out / "checkpoints")
    assert not link.exists() and (precious / "keep.txt").read_text() == "mine"


def test_new_run_with_overwrite_clears_only_its_own_checkpoints(model_dir, tmp_path):
    """overwrite: true replaces checkpoints/ and metrics.jsonl, keeps the user's other files, and a
    checkpoints/ that is a symlink elsewhere loses only the link."""
    write_rows(tmp_path / "data" / "train.csv", 16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "step-000009").mkdir(parents=True)
    (elsewhere / "step-000009" / "trainer_state.json").write_text("{}")
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    data = tiny_recipe_dict(model_dir, tmp_path / "data", out, num_epochs=1)
    data["overwrite"] = True
    proc = run_cli("train", str(write_recipe(tmp_path / "r.yaml", data)))
    assert proc.returncode == 0, proc.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert (elsewhere / "step-000009" / "trainer_state.json").is_file()
    assert not (out / "checkpoints").is_symlink()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"]
