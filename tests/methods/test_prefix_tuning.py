"""Prefix tuning against the peft oracle, both ways; generation; learning; what trains; refusals.

peft 0.21.2 meets transformers 5.24 in two places where its own calls lose the prefix, so the oracle there
is peft's prefix cache (`get_prompt`, the layout its checkpoints mean) rather than its wrappers:
- its sequence-classification forward looks for a `past_key_values` argument that transformers renamed
  `cache`, and raises; the oracle feeds peft's cache to the base model with the mask extended;
- its generate hands the cache over as `past_key_values`, which loses to generate's own empty `cache`, so
  peft generates without the prefix; the oracle is greedy decoding through peft's forward.
"""

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
from peftrun.methods.prefix_tuning import PrefixTuningConfig
from peftrun.recipe import recipe_from_dict

peft = pytest.importorskip("peft")

N = 3  # virtual tokens
CASES = [
    ("llama", "CAUSAL_LM"),
    ("gpt2", "CAUSAL_LM"),
    ("bloom", "CAUSAL_LM"),
    ("t5", "SEQ_2_SEQ_LM"),
    ("bert", "SEQ_CLS"),
    ("roberta", "SEQ_CLS"),
    ("llama", "SEQ_CLS"),
    ("bert", "TOKEN_CLS"),
]
# (arch, task, prefix_projection) -> trainable parameters, worked out by hand:
# table n·2·L·d (d = key/value width: 16 for the grouped-query tiny llama, 32 elsewhere; L = 2), with
# prefix_projection n·d + (d·h + h) + (h·2Ld + 2Ld) for h = 16, plus any new classifier head.
EXPECTED_TRAINABLE = {
    ("llama", "CAUSAL_LM", False): 3 * 2 * 2 * 16,
    ("llama", "CAUSAL_LM", True): 3 * 16 + (16 * 16 + 16) + (16 * 64 + 64),
    ("t5", "SEQ_2_SEQ_LM", False): 3 * 2 * 2 * 32,
    ("bert", "SEQ_CLS", False): 3 * 2 * 2 * 32 + (3 * 32 + 3),
    ("roberta", "SEQ_CLS", True): 3 * 32 + (32 * 16 + 16) + (16 * 128 + 128) + (32 * 32 + 32) + (3 * 32 + 3),
}


def _ids(case):
    return "-".join(str(c) for c in case)


def _peft_config(task: str, projection: bool, **extra):
    return peft.PrefixTuningConfig(
        task_type=task,
        num_virtual_tokens=N,
        prefix_projection=projection,
        encoder_hidden_size=16 if projection else None,
        **extra,
    )


def _ours(arch: str, task: str, projection: bool, **overrides):
    config = PrefixTuningConfig(
        num_virtual_tokens=N, prefix_projection=projection, encoder_hidden_size=16 if projection else None
    )
    return wrap(tiny_model(arch, task, **overrides), task, "prefix_tuning", config).eval()


def _peft_logits(theirs, task: str, batch: dict) -> torch.Tensor:
    """peft's outputs; for classification, peft's prefix cache fed to the base model (see module docstring)."""
    if task not in ("SEQ_CLS", "TOKEN_CLS"):
        return theirs(**batch).logits
    extended = dict(batch)
    mask = batch["attention_mask"]
    extended["attention_mask"] = torch.cat((torch.ones(mask.shape[0], N, dtype=mask.dtype), mask), dim=1)
    return theirs.base_model(**extended, past_key_values=theirs.get_prompt(mask.shape[0])).logits


def _batch(model, task):
    batch = tiny_batch(model, task)
    batch["attention_mask"][0, :2] = 0  # a padded row, so the extended mask matters
    return batch


def _randomise_heads(model) -> None:
    """New classifier heads start random anyway; make sure the copy that trains differs from the frozen one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.normal_()


# ------------------------------------------------------------------ counts


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_trainable_parameters_equal_peft(case, projection):
    arch, task = case
    ours = _ours(arch, task, projection)
    theirs = peft.get_peft_model(tiny_model(arch, task), _peft_config(task, projection))
    assert ours.parameter_counts() == theirs.get_nb_trainable_parameters()
    expected = EXPECTED_TRAINABLE.get((arch, task, projection))
    if expected is not None:
        assert ours.parameter_counts()[0] == expected
    # the geometry peft fills in from the model, field for field
    for field in (
        "num_layers",
        "token_dim",
        "num_attention_heads",
        "num_transformer_submodules",
        "encoder_hidden_size",
    ):
        assert getattr(ours.config, field) == getattr(theirs.peft_config["default"], field), field


# ------------------------------------------------------------------ checkpoints, both ways


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_peftrun_adapter_loads_in_peft(case, projection, tmp_path):
    arch, task = case
    ours = _ours(arch, task, projection)
    _randomise_heads(ours)
    save_adapter(ours, tmp_path, base_model="tiny")
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert state["prompt_embeddings"].shape == (N, 2 * ours.config.num_layers * ours.config.token_dim)
    assert all(k == "prompt_embeddings" or k.startswith("base_model.") for k in state)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is projection

    theirs = peft.PeftModel.from_pretrained(tiny_model(arch, task), tmp_path).eval()
    batch = _batch(ours.model, task)
    with torch.no_grad():
        mine = ours(**batch).logits
        with ours.disable_adapters():
            base = ours(**batch).logits
        diff = (mine - _peft_logits(theirs, task, batch)).abs().max().item()
    assert diff <= 1e-5
    # the prefixes change the output, so the comparison means something
    assert (mine - base).abs().max().item() > 1e-4


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_peft_adapter_loads_in_peftrun(case, projection, tmp_path):
    arch, task = case
    theirs = peft.get_peft_model(tiny_model(arch, task), _peft_config(task, projection)).eval()
    _randomise_heads(theirs)
    theirs.save_pretrained(tmp_path)
    config, state = read_adapter(tmp_path)
    method = get_method("prefix_tuning")
    ours = wrap(tiny_model(arch, task), task, method, config_from_peft(method, config)).eval()
    ours.load_adapter_state_dict(state)
    batch = _batch(ours.model, task)
    with torch.no_grad():
        diff = (ours(**batch).logits - _peft_logits(theirs, task, batch)).abs().max().item()
    assert diff <= 1e-5
    # a saved projection is its table: the MLP is gone, and saving again gives the same tensor back
    assert torch.equal(ours.adapter_state_dict()["prompt_embeddings"], state["prompt_embeddings"])


def test_a_table_of_the_wrong_shape_is_refused(tmp_path):
    theirs = peft.get_peft_model(tiny_model("gpt2", "CAUSAL_LM"), _peft_config("CAUSAL_LM", False))
    theirs.save_pretrained(tmp_path)
    _, state = read_adapter(tmp_path)
    # a 3-layer base needs a longer table than the 2-layer one saved
    ours = wrap(
        tiny_model("gpt2", "CAUSAL_LM", n_layer=3),
        "CAUSAL_LM",
        "prefix_tuning",
        PrefixTuningConfig(num_virtual_tokens=N),
    )
    with pytest.raises(
        PeftrunError, match=r"prompt_embeddings has shape \(3, 128\), this model's prefixes need \(3, 192\)"
    ):
        ours.load_adapter_state_dict(state)


def test_training_a_loaded_projection_table_is_refused_not_silently_frozen():
    ours = _ours("gpt2", "CAUSAL_LM", True)
    method = get_method("prefix_tuning")
    method.after_step(ours, "default", 1, 10)  # a fresh run trains its MLP
    ours.load_adapter_state_dict(ours.adapter_state_dict())  # peft's format: the MLP's output only
    with pytest.raises(PeftrunError, match="cannot train further"):
        method.after_step(ours, "default", 2, 10)


def test_prefixes_that_do_not_fit_the_keys_are_refused():
    # the tiny llama shares 2 key/value heads of 8 between its 4 query heads: prefixes are 2 x 8 wide
    with pytest.raises(
        PeftrunError, match=r"4 heads x 8 do not fit this model's keys and values \(2 heads x 8\)"
    ):
        _ = wrap(
            tiny_model("llama", "CAUSAL_LM"),
            "CAUSAL_LM",
            "prefix_tuning",
            PrefixTuningConfig(token_dim=32, num_attention_heads=4),
        )


# ------------------------------------------------------------------ generation


def _peft_greedy(theirs, task: str, batch: dict, steps: int, start: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        if task == "CAUSAL_LM":
            ids, mask = batch["input_ids"], batch["attention_mask"]
            for _ in range(steps):
                nxt = theirs(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
                ids, mask = torch.cat((ids, nxt), 1), torch.cat((mask, torch.ones_like(nxt)), 1)
            return ids
        dec = torch.full((batch["input_ids"].shape[0], 1), start)
        for _ in range(steps):
            nxt = theirs(**batch, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat((dec, nxt), 1)
        return dec


@pytest.mark.parametrize(
    "arch,task,sharp",
    [
        ("llama", "CAUSAL_LM", {"initializer_range": 0.5}),
        ("gpt2", "CAUSAL_LM", {"initializer_range": 0.5}),
        ("t5", "SEQ_2_SEQ_LM", {"initializer_factor": 3.0}),
    ],
)
def test_greedy_generation_equals_peft(arch, task, sharp, tmp_path):
    # larger initial weights give the tiny models decisive logits, so greedy choices are not near-ties
    ours = _ours(arch, task, False, **sharp)
    save_adapter(ours, tmp_path, base_model="tiny")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch, task, **sharp), tmp_path).eval()
    batch = tiny_batch(ours.model, task, length=6)
    batch.pop("decoder_input_ids", None)
    steps = 6
    out = ours.generate(**batch, max_new_tokens=steps, do_sample=False)
    expected = _peft_greedy(
        theirs, task, batch, steps, getattr(ours.model.config, "decoder_start_token_id", None)
    )
    assert torch.equal(out, expected)
    with ours.disable_adapters():
        base = ours.generate(**batch, max_new_tokens=steps, do_sample=False)
    assert not torch.equal(out, base)  # the prefixes steer the tokens chosen
    # beams and several sequences per row: the prefix cache is sized for generate's expanded batch
    beams = ours.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 2 * batch["input_ids"].shape[0]


# ------------------------------------------------------------------ learning


@pytest.mark.parametrize(
    "arch,task,projection",
    [("llama", "CAUSAL_LM", True), ("t5", "SEQ_2_SEQ_LM", False), ("roberta", "SEQ_CLS", False)],
)
def test_training_lowers_the_loss_and_leaves_the_base_alone(arch, task, projection):
    torch.manual_seed(0)
    ours = _ours(arch, task, projection)
    base_before = {k: v.clone() for k, v in ours.model.state_dict().items() if ".modules_to_save." not in k}
    batch = tiny_batch(ours.model, task, batch=4, length=8)
    if task == "SEQ_CLS":
        batch["labels"] = torch.tensor([0, 1, 2, 1])
    else:
        batch["labels"] = batch.pop("decoder_input_ids", batch["input_ids"]).clone()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert trainable and all(
        n.startswith("prompt_encoders.") or ".modules_to_save." in n
        for n, p in ours.named_parameters()
        if p.requires_grad
    )
    losses = train_losses(ours, batch, lr=1e-2, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses
    after = ours.model.state_dict()
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)


# ------------------------------------------------------------------ what is refused


def _recipe(task: str, **method):
    return {
        "model": {"name_or_path": "t5-small", "task_type": task},
        "method": {"name": "prefix_tuning", **method},
        "data": {"path": "data/quickstart"},
    }


def test_validate_refuses_a_submodule_count_that_does_not_fit_the_task():
    assert (
        recipe_from_dict(_recipe("SEQ_2_SEQ_LM", num_virtual_tokens=20)).method_config.num_virtual_tokens
        == 20
    )
    with pytest.raises(PeftrunError, match="num_transformer_submodules is 2 for SEQ_2_SEQ_LM"):
        recipe_from_dict(_recipe("SEQ_2_SEQ_LM", num_transformer_submodules=1))
    with pytest.raises(PeftrunError, match="unknown key 'num_virtual_token'"):
        recipe_from_dict(_recipe("SEQ_2_SEQ_LM", num_virtual_token=20))


def test_an_architecture_without_a_cache_is_refused():
    import transformers

    config = transformers.AutoConfig.for_model(
        "distilbert", vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64
    )
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(
        PeftrunError, match="needs attention layers that take a key/value cache, and DistilBertModel"
    ):
        wrap(model, "SEQ_CLS", "prefix_tuning", PrefixTuningConfig(num_virtual_tokens=N))


def test_merge_is_refused_with_exit_2(tmp_path, tiny_dir):
    ours = wrap(
        tiny_model("gpt2", "CAUSAL_LM"),
        "CAUSAL_LM",
        "prefix_tuning",
        PrefixTuningConfig(num_virtual_tokens=N),
    )
    assert_merge_refused(
        tmp_path, ours, tiny_dir("gpt2", "CAUSAL_LM"), "CAUSAL_LM", "cannot be folded into the base weights"
    )


def test_recipes_validate_and_count():
    from peftrun.recipe import load_recipe

    ours = recipe_model("mt0_large_prefix_tuning.yaml")
    # mt0-large's 1,229,581,312 base parameters plus 20 tokens x 24 decoder layers x (key + value) x 1024
    assert ours.parameter_counts() == (983_040, 1_229_581_312 + 983_040)
    twin = load_recipe(REPO / "recipes" / "offline" / "prefix_tuning_t5_small.yaml")
    assert (twin.method.name, twin.model.task_type, twin.model.random_init) == (
        "prefix_tuning",
        "SEQ_2_SEQ_LM",
        True,
    )
