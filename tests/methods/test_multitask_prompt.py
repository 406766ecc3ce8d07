"""Multitask prompt tuning against the peft oracle: per-task factors, source -> target initialisation,
checkpoints both ways, generation with task ids, training, and the recipe's task column."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import REPO, run_cli, shared_data
from soft_prompts import (
    FAMILIES,
    config_differences,
    counts,
    generations,
    oracle_batch,
    ours_config,
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
from peftrun.io.peft_format import read_adapter, save_adapter
from peftrun.recipe import load_recipe

METHOD = "multitask_prompt_tuning"
KW = dict(num_virtual_tokens=4, num_tasks=3, num_ranks=2)


@pytest.mark.parametrize(("arch", "task"), FAMILIES)
def test_parameter_counts_equal_peft(arch, task):
    ours, theirs = counts(arch, task, METHOD, **KW)
    assert ours == theirs
    if task == "CAUSAL_LM":  # P* (n x d) + u (tasks x n x r) + v (tasks x r x d)
        assert ours[0] == 4 * 32 + 3 * 4 * 2 + 3 * 2 * 32 == 344


@pytest.mark.parametrize(("arch", "task"), FAMILIES)
def test_peftrun_adapter_loads_in_peft(tmp_path, tiny_dir, arch, task):
    diff, our_keys, their_keys = ours_to_peft(tmp_path, tiny_dir(arch, task), task, METHOD, **KW)
    assert our_keys == their_keys
    rows = 8 if task == "SEQ_2_SEQ_LM" else 4
    assert our_keys["prefix_task_cols"] == (3, rows, 2) and our_keys["prefix_task_rows"] == (3, 2, 32)
    assert our_keys["prompt_embeddings"] == (rows, 32)
    assert diff <= 1e-5


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("roberta", "SEQ_CLS")]
)
def test_peft_adapter_loads_in_peftrun(tmp_path, tiny_dir, arch, task):
    assert peft_to_ours(tmp_path, tiny_dir(arch, task), task, METHOD, **KW) <= 1e-5


def test_each_task_gets_its_own_prompt():
    model = wrap(tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", METHOD, ours_config(METHOD, **KW)).eval()
    batch = oracle_batch(model.model, "CAUSAL_LM")
    batch["input_ids"] = batch["input_ids"][:1].repeat(3, 1)
    batch["attention_mask"] = batch["attention_mask"][:1].repeat(3, 1)
    with torch.no_grad():
        logits = model(**batch, task_ids=torch.tensor([0, 1, 0])).logits
    assert (logits[0] - logits[2]).abs().max() <= 1e-6
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    with pytest.raises(PeftrunError, match="needs each row's task id"):
        model(**batch)
    with pytest.raises(PeftrunError, match="task ids run from 0 to 2"):
        model(**batch, task_ids=torch.tensor([0, 1, 3]))


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("bloom", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")]
)
def test_greedy_generation_matches_peft(tmp_path, tiny_dir, arch, task):
    # one transformer submodule on t5: peft's seq2seq forward with decoder inputs needs it
    kw = {**KW, "num_transformer_submodules": 1} if task == "SEQ_2_SEQ_LM" else KW
    mine, oracle, reference, _ = generations(tmp_path, tiny_dir(arch, task), task, METHOD, **kw)
    assert torch.equal(mine, reference)
    if arch in ("bloom", "t5"):  # where peft's cached generate agrees with its forward
        assert torch.equal(mine, oracle)


# ------------------------------------------------------------------ source -> target


@pytest.fixture
def source_adapter(tmp_path, tiny_dir):
    """A 3-task source adapter with distinct factors per task, saved as peft would."""
    path = tiny_dir("llama", "CAUSAL_LM")
    source = wrap(tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", METHOD, ours_config(METHOD, **KW))
    return save_adapter(source, tmp_path / "source", base_model=str(path)), source.prompt_encoders["default"]


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_target_initialisation_matches_peft(source_adapter, init):
    peft = pytest.importorskip("peft")
    folder, source = source_adapter
    file = str(folder / "adapter_model.safetensors")
    kw = dict(
        num_virtual_tokens=4, num_tasks=1, num_ranks=2, prompt_tuning_init=init, prompt_tuning_init_task=2
    )
    torch.manual_seed(0)
    ours = wrap(
        tiny_model("llama", "CAUSAL_LM"),
        "CAUSAL_LM",
        METHOD,
        ours_config(METHOD, prompt_tuning_init_state_dict_path=str(folder), **kw),
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_model("llama", "CAUSAL_LM"),
            peft.MultitaskPromptTuningConfig(
                task_type="CAUSAL_LM", prompt_tuning_init_state_dict_path=file, **kw
            ),
        )
    mine, oracle = ours.prompt_encoders["default"], theirs.prompt_encoder["default"]
    assert torch.equal(mine.embedding.weight, source.embedding.weight)
    assert torch.equal(mine.embedding.weight, oracle.embedding.weight)
    assert torch.equal(mine.prefix_task_cols, oracle.prefix_task_cols)
    assert torch.equal(mine.prefix_task_rows, oracle.prefix_task_rows)
    if init == "EXACT_SOURCE_TASK":
        assert torch.equal(mine.prefix_task_rows[0], source.prefix_task_rows[2])
    elif init == "AVERAGE_SOURCE_TASKS":
        assert torch.allclose(mine.prefix_task_cols[0], source.prefix_task_cols.mean(0))


def test_several_target_tasks_all_start_from_the_source_average(source_adapter):
    folder, source = source_adapter
    config = ours_config(
        METHOD,
        num_virtual_tokens=4,
        num_tasks=2,
        num_ranks=2,
        prompt_tuning_init="AVERAGE_SOURCE_TASKS",
        prompt_tuning_init_state_dict_path=str(folder),
    )
    encoder = wrap(tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", METHOD, config).prompt_encoders["default"]
    assert encoder.prefix_task_rows.shape == (2, 2, 32)
    for k in range(2):
        assert torch.allclose(encoder.prefix_task_rows[k], source.prefix_task_rows.mean(0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(prompt_tuning_init_state_dict_path="missing/adapter"), "file not found"),
        (dict(num_ranks=3), "source task factors (3, 4, 2)/(3, 2, 32) do not fit"),
        (
            dict(prompt_tuning_init="EXACT_SOURCE_TASK", prompt_tuning_init_task=5),
            "the source has tasks 0..2",
        ),
    ],
)
def test_bad_sources_are_refused(source_adapter, change, message):
    folder, _ = source_adapter
    kw = dict(
        num_virtual_tokens=4,
        num_tasks=1,
        num_ranks=2,
        prompt_tuning_init="AVERAGE_SOURCE_TASKS",
        prompt_tuning_init_state_dict_path=str(folder),
    )
    with pytest.raises(PeftrunError, match=message.replace("(", r"\(").replace(")", r"\)")):
        wrap(tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", METHOD, ours_config(METHOD, **{**kw, **change}))


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS")]
)
def test_training_lowers_loss_and_leaves_base_untouched(arch, task):
    losses, changed = train_steps(arch, task, METHOD, **KW)
    assert losses[-1] < losses[0] - 0.1, losses
    assert changed == []


# ------------------------------------------------------------------ recipe and data


def test_task_column_becomes_task_ids_in_batches():
    import datasets
    from transformers import ByT5Tokenizer

    from peftrun.data import Collator, model_inputs, tokenize_split
    from peftrun.recipe import DataSection

    cfg = DataSection(
        train_file="x.csv",
        text_column="text",
        label_column="answer",
        task_column="task",
        task_names=["sentiment", "subject"],
    )
    ds = datasets.Dataset.from_dict(
        {
            "text": ["a kettle", "bad tent", "ok"],
            "answer": ["kettle", "negative", "x"],
            "task": ["subject", "sentiment", "subject"],
        }
    )
    rows = tokenize_split(ds, cfg, ByT5Tokenizer(), "SEQ_2_SEQ_LM", None, for_eval=False)
    batch = Collator(0, "SEQ_2_SEQ_LM")(list(rows))
    assert batch["task_ids"].tolist() == [1, 0, 1]
    assert model_inputs(batch)["task_ids"].tolist() == [1, 0, 1]
    bad = datasets.Dataset.from_dict({"text": ["a"], "answer": ["b"], "task": ["translation"]})
    with pytest.raises(PeftrunError, match="task 'translation' is not one of"):
        tokenize_split(bad, cfg, ByT5Tokenizer(), "SEQ_2_SEQ_LM", None, for_eval=False)


RECIPE = """
model: {{name_or_path: bigscience/mt0-large, task_type: SEQ_2_SEQ_LM}}
method: {{name: {method}, num_virtual_tokens: 20, {extra}}}
data: {{train_file: train.csv, {data}}}
"""


@pytest.mark.parametrize(
    ("method", "extra", "data", "message"),
    [
        (METHOD, "num_tasks: 3", "", "multitask prompt tuning over 3 tasks needs each row's task"),
        ("prompt_tuning", "", "task_column: task", "data.task_column gives each row a task id"),
        (
            METHOD,
            "prompt_tuning_init: AVERAGE_SOURCE_TASKS",
            "",
            "prompt_tuning_init AVERAGE_SOURCE_TASKS needs prompt_tuning_init_state_dict_path",
        ),
        (
            METHOD,
            "num_tasks: 2",
            "task_column: task, task_names: [a, b, c]",
            "data.task_names lists 3 task(s)",
        ),
    ],
)
def test_validate_refuses_what_makes_no_sense(tmp_path, method, extra, data, message):
    recipe = write_recipe(tmp_path, RECIPE.format(method=method, extra=extra, data=data))
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2, result.stdout
    assert message in result.stderr


@pytest.mark.parametrize(
    ("recipe", "line"),
    [
        (
            "bloomz_560m_multitask_prompt_source.yaml",  # P* 16 x 1024 + 2 tasks x (16 x 1 + 1 x 1024)
            "trainable params: 18,464 || all params: 559,233,056 || trainable%: 0.0033",
        ),
        (
            "bloomz_560m_multitask_prompt_target.yaml",
            "trainable params: 17,424 || all params: 559,232,016 || trainable%: 0.0031",
        ),
    ],
)
def test_recipe_params_lines(recipe, line):
    assert params_line(REPO / "recipes" / recipe) == line


@pytest.mark.parametrize("recipe", recipe_paths(METHOD), ids=lambda p: p.name)
def test_recipes_validate(recipe):
    assert load_recipe(recipe).method.name == METHOD


STAGE = """
model: {{name_or_path: "{model}", task_type: SEQ_2_SEQ_LM, tokenizer: byt5}}
method:
  name: multitask_prompt_tuning
  num_virtual_tokens: 4
  num_transformer_submodules: 1
  num_ranks: 2
  {method}
data:
  {data}
  max_length: 128
  target_max_length: 8
  max_train_samples: 16
  max_eval_samples: 4
training: {{num_epochs: 1, batch_size: 8, learning_rate: 0.05, progress_bar: false}}
output_dir: "{out}"
"""


def test_source_then_target_through_the_cli(tmp_path, tiny_dir):
    """Stage 1 trains two tasks named in a column; stage 2 starts a new task from stage 1's adapter."""
    from safetensors.torch import load_file

    model = tiny_dir("t5", "SEQ_2_SEQ_LM")
    source = tmp_path / "source"
    recipe = tmp_path / "source.yaml"
    recipe.write_text(
        STAGE.format(
            model=model,
            out=source,
            method="num_tasks: 2",
            data="path: data/multitask_reviews\n  template: '{question} {text}'\n  label_column: answer\n"
            "  task_column: task\n  task_names: [sentiment, subject]",
        )
    )
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eval_loss=" in result.stdout and "accuracy=" in result.stdout  # eval generates with task ids
    weights = load_file(str(source / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "prompt_embeddings": (4, 32),
        "prefix_task_cols": (2, 4, 2),
        "prefix_task_rows": (2, 2, 32),
    }

    target = tmp_path / "target"
    recipe = tmp_path / "target.yaml"
    recipe.write_text(
        STAGE.format(
            model=model,
            out=target,
            method=f"num_tasks: 1\n  prompt_tuning_init: AVERAGE_SOURCE_TASKS\n"
            f"  prompt_tuning_init_state_dict_path: '{source}'",
            data="path: data/quickstart",
        )
    )
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    tuned = load_file(str(target / "adapter_model.safetensors"))
    assert tuned["prefix_task_rows"].shape == (1, 2, 32)
    # started from the source's shared prompt, then trained: near it, not equal to it
    moved = (tuned["prompt_embeddings"] - weights["prompt_embeddings"]).abs().max().item()
    assert 0 < moved < 1.0


@pytest.mark.slow
def test_offline_twins_source_then_target_on_smollm2(tmp_path):
    """Two review tasks (source), then twitter_complaints initialised from the source's average."""
    train = shared_data("raft_twitter_complaints", "train.csv")
    source = tmp_path / "source"
    first = run_twin("recipes/offline/multitask_prompt_smollm2_source.yaml", source)
    assert len(first) == 1 and first[0]["eval_loss"] < first[0]["train_epoch_loss"]
    epochs = run_twin(
        "recipes/offline/multitask_prompt_smollm2_target.yaml",
        tmp_path / "target",
        f"data.train_file={train}",
        f"method.prompt_tuning_init_state_dict_path={source}",
    )
    assert len(epochs) == 2 and epochs[1]["eval_loss"] < epochs[0]["eval_loss"]
    assert read_adapter(tmp_path / "target")[1]["prefix_task_rows"].shape == (1, 1, 576)


@pytest.mark.parametrize(
    ("arch", "task"), [("t5", "SEQ_2_SEQ_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")]
)
def test_adapter_config_matches_peft(tmp_path, arch, task):
    differ, extra = config_differences(
        tmp_path, arch, task, METHOD, **dict(num_virtual_tokens=6, num_tasks=2, num_ranks=3)
    )
    assert differ == {}
    assert extra == set()
