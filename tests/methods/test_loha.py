"""LoHa against the peft oracle: counts, checkpoints both ways, seeded dropout, learning, merge."""

from __future__ import annotations

import oracle
import pytest

# GPT-2's Conv1D is left out of the peft comparisons: peft's LoHa refuses it (see the test below).
ARCHS = [
    ("t5", "SEQ_2_SEQ_LM"),
    ("llama", "CAUSAL_LM"),
    ("roberta", "SEQ_CLS"),
    ("bert", "TOKEN_CLS"),
    ("bloom", "CAUSAL_LM"),
]
PATTERNS = {"r": 4, "alpha": 8, "rank_pattern": {"v": 2}, "alpha_pattern": {"q": 16}}


@pytest.mark.parametrize("arch,task", ARCHS)
def test_trainable_count_equals_peft(arch, task):
    oracle.check_count("loha", arch, task, {})


def test_rank_and_alpha_patterns_count_as_peft():
    # t5 q and v are 32x32: q keeps r=4, v drops to r=2; 2 factors pairs of (32r + 32r) each, 12 layers.
    trainable, _ = oracle.check_count("loha", "t5", "SEQ_2_SEQ_LM", PATTERNS)
    assert trainable == 6 * (2 * 2 * 32 * 4 + 2 * 2 * 32 * 2)


@pytest.mark.parametrize("arch,task", [("t5", "SEQ_2_SEQ_LM"), ("roberta", "SEQ_CLS")])
def test_checkpoint_files_equal_peft(tmp_path, arch, task):
    oracle.check_files(tmp_path, "loha", arch, task, {})


@pytest.mark.parametrize(
    "arch,task,extra",
    [("t5", "SEQ_2_SEQ_LM", PATTERNS), ("llama", "CAUSAL_LM", {}), ("roberta", "SEQ_CLS", {})],
)
def test_adapter_moves_to_peft_and_back(tmp_path, arch, task, extra):
    config = {"init_weights": False, **extra}
    oracle.check_to_peft(tmp_path / "to", "loha", arch, task, config)
    oracle.check_from_peft(tmp_path / "from", "loha", arch, task, config)


@pytest.mark.parametrize("arch,task", [("llama", "CAUSAL_LM"), ("roberta", "SEQ_CLS")])
def test_rank_and_module_dropout_follow_peft_in_training(arch, task):
    oracle.check_train_mode("loha", arch, task, {"rank_dropout": 0.5, "module_dropout": 0.3})


def test_gpt2_conv1d_is_adapted_though_peft_refuses_it():
    with pytest.raises(TypeError, match="Conv1D"):
        oracle.theirs("loha", "gpt2", "CAUSAL_LM", {})
    trainable, _ = oracle.ours("loha", "gpt2", "CAUSAL_LM", {}).parameter_counts()
    # c_attn: out 96, in 32; two Hadamard factor pairs, 2 layers
    assert trainable == 2 * 2 * (96 * 8 + 8 * 32)


@pytest.mark.parametrize("arch,task", [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("roberta", "SEQ_CLS")])
def test_learns_with_frozen_base(arch, task):
    oracle.check_learns("loha", arch, task, {})


@pytest.mark.parametrize("arch,task", [("t5", "SEQ_2_SEQ_LM"), ("gpt2", "CAUSAL_LM"), ("bloom", "CAUSAL_LM")])
def test_merge_equals_unmerged_and_unmerge_is_exact(arch, task):
    oracle.check_merge("loha", arch, task, {"init_weights": False})


def test_default_init_starts_from_the_base():
    import torch

    model = oracle.ours("loha", "llama", "CAUSAL_LM", {})
    layer = model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.hada_w2_b["default"]) == 0
    assert torch.count_nonzero(layer.hada_w1_a["default"]) > 0
    assert torch.count_nonzero(layer.delta_weight("default")) == 0


def test_adapts_conv2d():
    # Conv2d layers are adapted as peft adapts them: tests/methods/test_conv2d.py compares them with peft
    net = oracle.conv_net()
    cfg = oracle.get_method("loha").Config.model_validate({"target_modules": ["0"]})
    trainable, _ = oracle.wrap(net, "CAUSAL_LM", "loha", cfg).parameter_counts()
    assert trainable > 0


def test_recipes_validate_and_count_as_peft():
    oracle.check_recipes("loha", 2_624_514)


@pytest.mark.slow
def test_offline_twin_trains(tmp_path):
    oracle.check_quickstart(tmp_path, "loha", 0.9)
