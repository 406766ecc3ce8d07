"""`peftrun merge`: a plain transformers model equal to the adapted one; refusals write nothing."""

from __future__ import annotations

import torch
from conftest import run_cli
from tiny import tiny_batch

from peftrun.adapted import wrap
from peftrun.io.peft_format import save_adapter
from peftrun.methods.lora import LoraConfig
from peftrun.tasks import auto_class


def _adapter(tiny_dir, tmp_path, arch, task, **extra):
    base_dir = tiny_dir(arch, task)
    model = auto_class(task).from_pretrained(base_dir)
    peft_model = wrap(model, task, "lora", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **extra))
    save_adapter(peft_model, tmp_path / "adapter", base_model=str(base_dir))
    return peft_model.eval(), tmp_path / "adapter"


def test_merge_cli_matches_adapted_model(tiny_dir, tmp_path):
    for arch, task in (("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("roberta", "SEQ_CLS")):
        adapted, folder = _adapter(tiny_dir, tmp_path / arch, arch, task)
        out = tmp_path / arch / "merged"
        result = run_cli("merge", "--adapter", str(folder), "--output", str(out))
        assert result.returncode == 0, result.stderr
        assert "merged model written" in result.stdout
        merged = auto_class(task).from_pretrained(out).eval()
        assert not any("lora" in k for k in merged.state_dict())
        batch = tiny_batch(merged, task)
        with torch.no_grad():
            diff = (merged(**batch).logits - adapted(**batch).logits).abs().max().item()
        assert diff <= 1e-5, (arch, diff)


def test_merge_refuses_adapter_of_another_base(tiny_dir, tmp_path):
    _, folder = _adapter(tiny_dir, tmp_path, "llama", "CAUSAL_LM")
    other = tmp_path / "other-base"
    from tiny import save_tiny

    save_tiny(other, "llama", "CAUSAL_LM", hidden_size=48, intermediate_size=96)
    out = tmp_path / "merged"
    result = run_cli("merge", "--adapter", str(folder), "--base", str(other), "--output", str(out))
    assert result.returncode == 2
    assert "does not fit this base model" in result.stderr
    assert "shapes differ" in result.stderr and "lora_A.weight" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert (folder / "adapter_model.safetensors").is_file()  # the adapter is untouched


def test_merge_refuses_output_equal_to_adapter(tiny_dir, tmp_path):
    _, folder = _adapter(tiny_dir, tmp_path, "llama", "CAUSAL_LM")
    result = run_cli("merge", "--adapter", str(folder), "--output", str(folder))
    assert result.returncode == 2
    assert "never overwrites an adapter" in result.stderr
