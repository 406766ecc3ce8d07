"""P-tuning against the peft oracle: MLP and LSTM encoders, checkpoints both ways, generation, training."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, run_cli, shared_data
from soft_prompts import (
    FAMILIES,
    config_differences,
    counts,
    generations,
    ours_to_peft,
    params_line,
    peft_to_ours,
    recipe_paths,
    run_twin,
    train_steps,
    write_recipe,
)
from tiny import tiny_model

from peftrun.adapted import wrap
from peftrun.errors import PeftrunError
from peftrun.io.peft_format import config_from_peft, read_adapter, save_adapter
from peftrun.methods import get_method
from peftrun.recipe import load_recipe

METHOD = "p_tuning"
MLP = dict(num_virtual_tokens=5, encoder_hidden_size=16)
LSTM = dict(
    num_virtual_tokens=5, encoder_reparameterization_type="LSTM", encoder_hidden_size=8, encoder_num_layers=2
)


@pytest.mark.parametrize(("arch", "task"), FAMILIES)
@pytest.mark.parametrize("kw", [MLP, LSTM], ids=["mlp", "lstm"])
def test_parameter_counts_equal_peft(arch, task, kw):
    ours, theirs = counts(arch, task, METHOD, **kw)
    assert ours == theirs


def test_mlp_count_by_hand():
    """Table n*d (2n rows on seq2seq) + MLP d->h->h->d with biases; h defaults to d."""
    (trainable, _), _ = counts("llama", "CAUSAL_LM", METHOD, num_virtual_tokens=5)
    d = h = 32
    assert trainable == 5 * d + (d * h + h) + (h * h + h) + (h * d + d) == 3328


def test_seed_scale_count_on_bloomz_560m():
    """The p-tuning docs' bloomz-560m figure: 20 virtual tokens, encoder_hidden_size 128."""
    from peftrun.models import build_from_config

    model = build_from_config("bigscience/bloomz-560m", "CAUSAL_LM", meta=True)
    config = get_method(METHOD).Config(num_virtual_tokens=20, encoder_hidden_size=128)
    line = wrap(model, "CAUSAL_LM", METHOD, config).trainable_report()
    assert line == "trainable params: 300,288 || all params: 559,514,880 || trainable%: 0.0537"


@pytest.mark.parametrize(
    ("recipe", "line"),
    [
        (
            "roberta_large_mrpc_p_tuning.yaml",  # peft's p-tuning guide: roberta-large on MRPC
            "trainable params: 1,351,938 || all params: 356,713,732 || trainable%: 0.3790",
        ),
        (
            "mt0_large_p_tuning_twitter.yaml",  # 2 x 20 x 1024 table + MLP 1024 -> 128 -> 128 -> 1024
            "trainable params: 320,768 || all params: 1,229,902,080 || trainable%: 0.0261",
        ),
    ],
)
def test_recipe_params_lines(recipe, line):
    assert params_line(REPO / "recipes" / recipe) == line


@pytest.mark.parametrize("recipe", recipe_paths(METHOD), ids=lambda p: p.name)
def test_recipes_validate(recipe):
    assert load_recipe(recipe).method.name == METHOD


@pytest.mark.parametrize(("arch", "task"), FAMILIES)
@pytest.mark.parametrize("kw", [MLP, LSTM], ids=["mlp", "lstm"])
def test_peftrun_adapter_loads_in_peft(tmp_path, tiny_dir, arch, task, kw):
    """peft keeps the encoder's output as `prompt_embeddings`; loading it gives our encoder's logits."""
    diff, our_keys, their_keys = ours_to_peft(tmp_path, tiny_dir(arch, task), task, METHOD, **kw)
    assert our_keys == their_keys
    assert our_keys["prompt_embeddings"] == (10 if task == "SEQ_2_SEQ_LM" else 5, 32)
    assert diff <= 1e-5


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS")]
)
def test_peft_adapter_loads_in_peftrun(tmp_path, tiny_dir, arch, task):
    assert peft_to_ours(tmp_path, tiny_dir(arch, task), task, METHOD, **MLP) <= 1e-5


def test_saved_table_is_the_encoder_output_and_reloads_without_a_head(tmp_path, tiny_dir):
    path = tiny_dir("gpt2", "CAUSAL_LM")
    model = wrap(tiny_model("gpt2", "CAUSAL_LM"), "CAUSAL_LM", METHOD, get_method(METHOD).Config(**LSTM))
    encoder = model.prompt_encoders["default"]
    expected = encoder(1)[0].detach()
    assert not torch.allclose(expected, encoder.embedding.weight)  # the LSTM+MLP really reparameterises
    save_adapter(model, tmp_path / "a", base_model=str(path))
    config, state = read_adapter(tmp_path / "a")
    assert (
        config["peft_type"] == "P_TUNING" and config["encoder_hidden_size"] == 8 and config["token_dim"] == 32
    )
    assert torch.allclose(state["prompt_embeddings"], expected, atol=0, rtol=0)
    loaded = wrap(
        tiny_model("gpt2", "CAUSAL_LM"), "CAUSAL_LM", METHOD, config_from_peft(get_method(METHOD), config)
    )
    loaded.load_adapter_state_dict(state)
    assert loaded.prompt_encoders["default"].mlp_head is None
    assert loaded.parameter_counts()[0] == 5 * 32  # only the table remains
    assert torch.equal(loaded.prompt_encoders["default"](1)[0], expected)
    # an adapter loaded from the table alone cannot train its encoder further: said at the first step
    resumed = wrap(tiny_model("gpt2", "CAUSAL_LM"), "CAUSAL_LM", METHOD, get_method(METHOD).Config(**LSTM))
    resumed.load_adapter_state_dict(dict(state))
    with pytest.raises(PeftrunError, match="cannot train further"):
        get_method(METHOD).after_step(resumed, "default", 1, 10)
    get_method(METHOD).after_step(model, "default", 1, 10)  # a fresh run trains on


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("bloom", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")]
)
def test_greedy_generation_matches_peft(tmp_path, tiny_dir, arch, task):
    mine, oracle, reference, _ = generations(tmp_path, tiny_dir(arch, task), task, METHOD, **MLP)
    assert torch.equal(mine, reference)
    if arch in ("bloom", "t5"):  # where peft's cached generate agrees with its forward
        assert torch.equal(mine, oracle)


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS")]
)
@pytest.mark.parametrize("kw", [MLP, LSTM], ids=["mlp", "lstm"])
def test_training_lowers_loss_and_leaves_base_untouched(arch, task, kw):
    losses, changed = train_steps(arch, task, METHOD, **kw)
    assert losses[-1] < losses[0] - 0.1, losses
    assert changed == []


RECIPE = """
model: {{name_or_path: bigscience/mt0-large, task_type: {task}}}
method: {{name: p_tuning, num_virtual_tokens: 20, {extra}}}
data: {{train_file: train.csv}}
"""


@pytest.mark.parametrize(
    ("task", "extra", "message"),
    [
        ("SEQ_2_SEQ_LM", "encoder_num_layers: 4", "the MLP encoder always has 3 layers"),
        ("SEQ_2_SEQ_LM", "encoder_reparameterization_type: GRU", "Input should be 'MLP' or 'LSTM'"),
        ("CAUSAL_LM", "num_transformer_submodules: 2", "only an encoder-decoder model (SEQ_2_SEQ_LM) has"),
    ],
)
def test_validate_refuses_what_makes_no_sense(tmp_path, task, extra, message):
    result = run_cli("validate", str(write_recipe(tmp_path, RECIPE.format(task=task, extra=extra))))
    assert result.returncode == 2, result.stdout
    assert message in result.stderr


def test_lstm_depth_is_accepted(tmp_path):
    recipe = write_recipe(
        tmp_path,
        RECIPE.format(
            task="SEQ_2_SEQ_LM", extra="encoder_reparameterization_type: LSTM, encoder_num_layers: 3"
        ),
    )
    result = run_cli("validate", str(recipe))
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_offline_twin_learns_on_t5_small(tmp_path):
    """Random-init t5-small (byte tokenizer) on the twitter_complaints rows, MLP encoder, 4 epochs."""
    train = shared_data("raft_twitter_complaints", "train.csv")
    epochs = run_twin(
        "recipes/offline/p_tuning_t5_small_twitter.yaml", tmp_path / "out", f"data.train_file={train}"
    )
    assert len(epochs) == 4 and epochs[-1]["eval_loss"] < epochs[0]["eval_loss"]
    assert read_adapter(tmp_path / "out")[1]["prompt_embeddings"].shape == (40, 512)


@pytest.mark.parametrize(
    ("arch", "task"), [("t5", "SEQ_2_SEQ_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")]
)
def test_adapter_config_matches_peft(tmp_path, arch, task):
    differ, extra = config_differences(
        tmp_path,
        arch,
        task,
        METHOD,
        **dict(num_virtual_tokens=6, encoder_reparameterization_type="LSTM", encoder_hidden_size=8),
    )
    assert differ == {}
    assert extra == set()
