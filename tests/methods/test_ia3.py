"""(IA)³ against the peft oracle: counts, checkpoints both ways, learning, exact merge/unmerge."""

from __future__ import annotations

import oracle
import pytest

ARCHS = [
    ("t5", "SEQ_2_SEQ_LM"),
    ("llama", "CAUSAL_LM"),
    ("gpt2", "CAUSAL_LM"),
    ("roberta", "SEQ_CLS"),
    ("bert", "TOKEN_CLS"),
    ("bloom", "CAUSAL_LM"),
]
# peft's counts for the default targets on the tiny models (keys, values, feed-forward input).
COUNTS = {"t5": 640, "llama": 192, "gpt2": 448, "roberta": 1475, "bert": 419, "bloom": 448}


@pytest.mark.parametrize("arch,task", ARCHS)
def test_trainable_count_equals_peft(arch, task):
    trainable, _ = oracle.check_count("ia3", arch, task, {})
    assert trainable == COUNTS[arch]


@pytest.mark.parametrize("arch,task", ARCHS)
def test_checkpoint_files_equal_peft(tmp_path, arch, task):
    oracle.check_files(tmp_path, "ia3", arch, task, {})


@pytest.mark.parametrize("arch,task", [("t5", "SEQ_2_SEQ_LM"), ("gpt2", "CAUSAL_LM"), ("roberta", "SEQ_CLS")])
def test_adapter_moves_to_peft_and_back(tmp_path, arch, task):
    config = {"init_ia3_weights": False}
    oracle.check_to_peft(tmp_path / "to", "ia3", arch, task, config)
    oracle.check_from_peft(tmp_path / "from", "ia3", arch, task, config)


def test_feedforward_scales_the_input_and_others_the_output():
    model = oracle.ours("ia3", "llama", "CAUSAL_LM", {})
    layers = model.model.model.layers[0]
    assert tuple(layers.mlp.down_proj.ia3_l["default"].shape) == (1, 64)  # (1, in)
    assert tuple(layers.self_attn.k_proj.ia3_l["default"].shape) == (16, 1)  # (out, 1): 2 kv heads of 8


def test_explicit_feedforward_must_be_a_target():
    from pydantic import ValidationError

    from peftrun.methods import get_method

    with pytest.raises(
        ValidationError, match=r"feedforward_modules \['down_proj'\] are not in target_modules"
    ):
        get_method("ia3").Config.model_validate(
            {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}
        )


@pytest.mark.parametrize("arch,task", [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("roberta", "SEQ_CLS")])
def test_learns_with_frozen_base(arch, task):
    oracle.check_learns("ia3", arch, task, {})


@pytest.mark.parametrize("arch,task", [("t5", "SEQ_2_SEQ_LM"), ("gpt2", "CAUSAL_LM"), ("bloom", "CAUSAL_LM")])
def test_merge_equals_unmerged_and_unmerge_is_exact(arch, task):
    oracle.check_merge("ia3", arch, task, {"init_ia3_weights": False})


def test_refuses_conv2d_and_asks_for_feedforward_modules():
    from peftrun.adapted import wrap
    from peftrun.errors import PeftrunError
    from peftrun.methods import get_method

    config = get_method("ia3").Config(target_modules=["1"])
    with pytest.raises(PeftrunError, match="no default feedforward_modules for model type 'convnet'"):
        wrap(oracle.conv_net(), "CAUSAL_LM", "ia3", config)
    oracle.check_refuses_conv2d("ia3", feedforward_modules=[])


def test_recipes_validate_and_count_as_peft():
    oracle.check_recipes("ia3", 1_223_682)


@pytest.mark.slow
def test_offline_twin_trains(tmp_path):
    oracle.check_quickstart(tmp_path, "ia3", 0.9)
