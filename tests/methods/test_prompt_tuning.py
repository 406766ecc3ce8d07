"""Prompt tuning against the peft oracle: counts, checkpoints both ways, generation, training, recipes."""

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
from peftrun.io.peft_format import read_adapter, save_adapter
from peftrun.methods import get_method
from peftrun.recipe import load_recipe

METHOD = "prompt_tuning"


@pytest.mark.parametrize(("arch", "task"), FAMILIES)
def test_parameter_counts_equal_peft(arch, task):
    ours, theirs = counts(arch, task, METHOD, num_virtual_tokens=7)
    assert ours == theirs
    # the table alone (2n rows on seq2seq, peft's default of two transformer submodules) plus a task head
    head = {"bert": 3 * 32 + 3, "roberta": 32 * 32 + 32 + 3 * 32 + 3}.get(arch, 0) if "CLS" in task else 0
    assert ours[0] == 7 * 32 * (2 if task == "SEQ_2_SEQ_LM" else 1) + head


def test_recipe_params_line_is_peft_figure():
    """The seed's bloomz-560m example: 8 virtual tokens of width 1024, as peft prints it."""
    line = params_line(REPO / "recipes" / "bloomz_560m_prompt_tuning_twitter.yaml")
    assert line == "trainable params: 8,192 || all params: 559,222,784 || trainable%: 0.0015"


@pytest.mark.parametrize("recipe", recipe_paths(METHOD), ids=lambda p: p.name)
def test_recipes_validate(recipe):
    assert load_recipe(recipe).method.name == METHOD


@pytest.mark.parametrize(
    ("arch", "task"), [("t5", "SEQ_2_SEQ_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")]
)
def test_adapter_config_matches_peft(tmp_path, arch, task):
    differ, extra = config_differences(tmp_path, arch, task, METHOD, **dict(num_virtual_tokens=6))
    assert differ == {}
    assert extra == set()


@pytest.mark.parametrize(("arch", "task"), FAMILIES)
def test_peftrun_adapter_loads_in_peft(tmp_path, tiny_dir, arch, task):
    diff, our_keys, their_keys = ours_to_peft(
        tmp_path, tiny_dir(arch, task), task, METHOD, num_virtual_tokens=4
    )
    assert our_keys == their_keys
    assert our_keys["prompt_embeddings"] == (8 if task == "SEQ_2_SEQ_LM" else 4, 32)
    assert diff <= 1e-5


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("roberta", "SEQ_CLS")]
)
def test_peft_adapter_loads_in_peftrun(tmp_path, tiny_dir, arch, task):
    assert peft_to_ours(tmp_path, tiny_dir(arch, task), task, METHOD, num_virtual_tokens=4) <= 1e-5


@pytest.mark.parametrize(
    ("arch", "task", "left_pad"),
    [
        ("llama", "CAUSAL_LM", False),
        ("llama", "CAUSAL_LM", True),
        ("gpt2", "CAUSAL_LM", False),
        ("bloom", "CAUSAL_LM", False),
        ("t5", "SEQ_2_SEQ_LM", False),
    ],
)
def test_greedy_generation_matches_peft(tmp_path, tiny_dir, arch, task, left_pad):
    """Same tokens as decoding step by step through peft's forward; same as peft's own generate where that
    agrees with its forward (bloom, t5: peft 0.21's cached generate drifts on rotary/learned positions)."""
    mine, oracle, reference, base = generations(
        tmp_path, tiny_dir(arch, task), task, METHOD, left_pad=left_pad, num_virtual_tokens=3
    )
    assert torch.equal(mine, reference)
    if arch in ("bloom", "t5"):
        assert torch.equal(mine, oracle)
    assert mine.shape == base.shape
    if arch != "bloom":  # tiny random bloom repeats its last token whatever the prompt
        assert not torch.equal(mine, base)  # the prompt changes what is generated


def test_label_constrained_generation_sees_prompt_and_answer(tiny_dir):
    """evaluate's label constraint reads the answer after the prompt, as plain generate() passes it."""
    from transformers import ByT5Tokenizer

    from peftrun.evaluate import LabelConstraint

    constraint = LabelConstraint(
        ByT5Tokenizer(), ["ab", "cd"], "CAUSAL_LM"
    )  # ids [100, 101, 1], [102, 103, 1]
    model = wrap(tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", METHOD, get_method(METHOD).Config()).eval()
    ids = torch.randint(4, 100, (3, 5))
    constraint.start = ids.shape[1]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=1,
        prefix_allowed_tokens_fn=constraint,
    )
    assert torch.equal(out[:, :5], ids)
    assert all(row in ([100, 101, 1], [102, 103, 1]) for row in out[:, 5:].tolist())


def test_text_init_copies_the_word_embeddings_like_peft(tmp_path, tiny_dir):
    peft = pytest.importorskip("peft")
    from transformers import ByT5Tokenizer

    tok_dir = tmp_path / "tok"
    ByT5Tokenizer().save_pretrained(tok_dir)
    text = "Classify:"  # 9 bytes + </s> = 10 ids, repeated to fill 13 rows
    kw = dict(num_virtual_tokens=13, prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    base = tiny_model("t5", "SEQ_2_SEQ_LM")
    ours = wrap(base, "SEQ_2_SEQ_LM", METHOD, get_method(METHOD).Config(tokenizer_name_or_path="byt5", **kw))
    theirs = peft.get_peft_model(
        tiny_model("t5", "SEQ_2_SEQ_LM"),
        peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", tokenizer_name_or_path=str(tok_dir), **kw),
    )
    table = ours.prompt_encoders["default"].embedding.weight
    assert torch.equal(table, theirs.prompt_encoder["default"].embedding.weight)
    ids = ByT5Tokenizer()(text)["input_ids"]
    assert len(ids) == 10 and table.shape == (26, 32)
    assert torch.equal(table[10], base.get_input_embeddings().weight[ids[0]])


@pytest.mark.parametrize(
    ("arch", "task"),
    [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS"), ("bert", "TOKEN_CLS")],
)
def test_training_lowers_loss_and_leaves_base_untouched(arch, task):
    losses, changed = train_steps(arch, task, METHOD, num_virtual_tokens=4)
    assert losses[-1] < losses[0] - 0.1, losses
    assert changed == []


def test_token_cls_logits_align_with_the_tokens():
    model = wrap(
        tiny_model("bert", "TOKEN_CLS"), "TOKEN_CLS", METHOD, get_method(METHOD).Config(num_virtual_tokens=5)
    )
    ids = torch.randint(4, 100, (2, 9))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids % 3)
    assert out.logits.shape == (2, 9, 3) and torch.isfinite(out.loss)


def test_decoder_classifier_reads_the_last_real_token_of_a_padded_row():
    """A right-padded row classifies as it does alone (decoder-only heads find the last token from the mask)."""
    model = wrap(
        tiny_model("llama", "SEQ_CLS"), "SEQ_CLS", METHOD, get_method(METHOD).Config(num_virtual_tokens=3)
    )
    model.eval()
    ids = torch.randint(4, 100, (1, 6))
    alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    padded = torch.cat((ids, torch.zeros(1, 3, dtype=torch.long)), dim=1)
    mask = torch.cat((torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)), dim=1)
    both = model(input_ids=torch.cat((padded, padded)), attention_mask=torch.cat((mask, mask))).logits
    assert (both[0] - alone[0]).abs().max() <= 1e-5


def test_merge_is_refused(tmp_path, tiny_dir):
    path = tiny_dir("llama", "CAUSAL_LM")
    from transformers import AutoModelForCausalLM, ByT5Tokenizer

    model = wrap(AutoModelForCausalLM.from_pretrained(path), "CAUSAL_LM", METHOD, get_method(METHOD).Config())
    save_adapter(model, tmp_path / "adapter", base_model=str(path), tokenizer=ByT5Tokenizer())
    result = run_cli("merge", "--adapter", str(tmp_path / "adapter"))
    assert result.returncode == 2
    assert (
        "method 'prompt_tuning' adds modules of its own and cannot be folded into the base weights"
        in result.stderr
    )
    assert not (tmp_path / "adapter-merged").exists()


RECIPE = """
model: {{name_or_path: bigscience/bloomz-560m, task_type: {task}}}
method: {{name: prompt_tuning, num_virtual_tokens: 8, {extra}}}
data: {{train_file: train.csv, {data}}}
"""


@pytest.mark.parametrize(
    ("task", "extra", "data", "message"),
    [
        (
            "CAUSAL_LM",
            "num_transformer_submodules: 2",
            "",
            "num_transformer_submodules=2 means separate encoder and decoder prompts",
        ),
        (
            "CAUSAL_LM",
            "prompt_tuning_init: TEXT",
            "",
            "prompt_tuning_init TEXT needs prompt_tuning_init_text",
        ),
        ("CAUSAL_LM", "prompt_tuning_init: WORDS", "", "Input should be 'RANDOM', 'TEXT' or 'SAMPLE_VOCAB'"),
    ],
)
def test_validate_refuses_what_makes_no_sense(tmp_path, task, extra, data, message):
    recipe = write_recipe(tmp_path, RECIPE.format(task=task, extra=extra, data=data))
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2, result.stdout
    assert message in result.stderr


@pytest.mark.slow
def test_offline_twin_learns_on_smollm2(tmp_path):
    """SmolLM2-135M on 16 twitter_complaints rows, 8 text-initialised virtual tokens, 2 epochs."""
    train = shared_data("raft_twitter_complaints", "train.csv")
    epochs = run_twin(
        "recipes/offline/prompt_tuning_smollm2_twitter.yaml", tmp_path / "out", f"data.train_file={train}"
    )
    assert len(epochs) == 2 and epochs[1]["eval_loss"] < epochs[0]["eval_loss"]
    assert epochs[1]["train_epoch_loss"] < epochs[0]["train_epoch_loss"]
    assert read_adapter(tmp_path / "out")[1]["prompt_embeddings"].shape == (8, 576)
