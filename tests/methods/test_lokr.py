"""LoKr against the peft oracle: factorisation, counts, checkpoints both ways, dropout, learning, merge."""

from __future__ import annotations

import oracle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftrun.methods.lokr import factorize

# GPT-2's Conv1D is left out of the peft comparisons: peft's LoKr refuses it (see below).
ARCHS = [
    ("t5", "SEQ_2_SEQ_LM"),
    ("llama", "CAUSAL_LM"),
    ("roberta", "SEQ_CLS"),
    ("bert", "TOKEN_CLS"),
    ("bloom", "CAUSAL_LM"),
]
# full W1 and W2; low-rank W2; both low-rank (decompose_both); a fixed decompose_factor; rank/alpha patterns
CONFIGS = [
    {},
    {"r": 2},
    {"r": 1, "decompose_both": True},
    {"r": 2, "decompose_factor": 4},
    {"r": 4, "rank_pattern": {"v": 1}, "alpha_pattern": {"q": 16}, "decompose_both": True},
]


def test_factorize_examples():
    assert factorize(256) == (16, 16) and factorize(128) == (8, 16) and factorize(127) == (1, 127)
    assert factorize(128, 4) == (4, 32) and factorize(96, 5) == (4, 24) and factorize(4096, -1) == (64, 64)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 8, 16, 33, 64, 100]))
def test_factorize_is_peft_rule(dimension, factor):
    lokr_layer = pytest.importorskip("peft.tuners.lokr.layer")
    assert factorize(dimension, factor) == lokr_layer.factorization(dimension, factor)


@pytest.mark.parametrize("arch,task", ARCHS)
@pytest.mark.parametrize("config", CONFIGS[:3])
def test_trainable_count_equals_peft(arch, task, config):
    oracle.check_count("lokr", arch, task, config)


@pytest.mark.parametrize(
    "arch,task,config", [("llama", "CAUSAL_LM", CONFIGS[3]), ("t5", "SEQ_2_SEQ_LM", CONFIGS[4])]
)
def test_factor_and_pattern_counts_equal_peft(arch, task, config):
    oracle.check_count("lokr", arch, task, config)


def test_shapes_follow_the_factorisation():
    model = oracle.ours("lokr", "llama", "CAUSAL_LM", {"r": 1, "decompose_both": True})
    q = model.model.model.layers[0].self_attn.q_proj  # 32x32 = (4·8)x(4·8)
    shapes = {k: tuple(v.shape) for k, v in q.adapter_state("default").items()}
    assert shapes == {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}


@pytest.mark.parametrize(
    "arch,task,config", [("t5", "SEQ_2_SEQ_LM", CONFIGS[4]), ("roberta", "SEQ_CLS", CONFIGS[1])]
)
def test_checkpoint_files_equal_peft(tmp_path, arch, task, config):
    oracle.check_files(tmp_path, "lokr", arch, task, config)


@pytest.mark.parametrize(
    "arch,task,config",
    [
        ("t5", "SEQ_2_SEQ_LM", CONFIGS[4]),
        ("llama", "CAUSAL_LM", CONFIGS[2]),
        ("roberta", "SEQ_CLS", CONFIGS[3]),
    ],
)
def test_adapter_moves_to_peft_and_back(tmp_path, arch, task, config):
    config = {"init_weights": False, **config}
    oracle.check_to_peft(tmp_path / "to", "lokr", arch, task, config)
    oracle.check_from_peft(tmp_path / "from", "lokr", arch, task, config)


@pytest.mark.parametrize("scale", [False, True])
def test_rank_and_module_dropout_follow_peft_in_training(scale):
    config = {"r": 2, "rank_dropout": 0.5, "module_dropout": 0.3, "rank_dropout_scale": scale}
    oracle.check_train_mode("lokr", "roberta", "SEQ_CLS", config)


@pytest.mark.parametrize("init,zeroed", [(True, "lokr_w1"), ("lycoris", "lokr_w2")])
def test_init_starts_from_the_base(init, zeroed):
    import torch

    model = oracle.ours("lokr", "llama", "CAUSAL_LM", {"init_weights": init})
    q = model.model.model.layers[0].self_attn.q_proj
    state = q.adapter_state("default")
    assert [k for k, v in state.items() if torch.count_nonzero(v) == 0] == [zeroed]
    assert torch.count_nonzero(q.delta_weight("default")) == 0


def test_gpt2_conv1d_is_adapted_though_peft_refuses_it():
    with pytest.raises(TypeError, match="Conv1D"):
        oracle.theirs("lokr", "gpt2", "CAUSAL_LM", {})
    trainable, _ = oracle.ours("lokr", "gpt2", "CAUSAL_LM", {}).parameter_counts()
    # c_attn 96x32 = (8·12)x(4·8): W1 8x4 ⊗ W2 12x8, both full as r=8 >= max/2; 2 layers
    assert trainable == 2 * (8 * 4 + 12 * 8)


@pytest.mark.parametrize("arch,task", [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("roberta", "SEQ_CLS")])
def test_learns_with_frozen_base(arch, task):
    oracle.check_learns("lokr", arch, task, {"r": 2})


@pytest.mark.parametrize(
    "arch,task,config",
    [
        ("t5", "SEQ_2_SEQ_LM", CONFIGS[2]),
        ("gpt2", "CAUSAL_LM", CONFIGS[1]),
        ("bloom", "CAUSAL_LM", CONFIGS[0]),
    ],
)
def test_merge_equals_unmerged_and_unmerge_is_exact(arch, task, config):
    oracle.check_merge("lokr", arch, task, {"init_weights": False, **config})


def test_adapts_conv2d():
    # Conv2d layers are adapted as peft adapts them: tests/methods/test_conv2d.py compares them with peft
    net = oracle.conv_net()
    cfg = oracle.get_method("lokr").Config.model_validate({"target_modules": ["0"]})
    trainable, _ = oracle.wrap(net, "CAUSAL_LM", "lokr", cfg).parameter_counts()
    assert trainable > 0


def test_recipes_validate_and_count_as_peft():
    oracle.check_recipes("lokr", 1_125_378)


@pytest.mark.slow
def test_offline_twin_trains(tmp_path):
    oracle.check_quickstart(tmp_path, "lokr", 0.9)
