"""AdaLoRA: counts and checkpoints against peft, the rank allocator step for step, merge, learning, recipes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file
from tiny import tiny_batch, tiny_model

from peftrun.adapted import wrap
from peftrun.errors import PeftrunError
from peftrun.io.loading import load_adapted
from peftrun.io.peft_format import save_adapter
from peftrun.merge import merge
from peftrun.methods import get_method
from peftrun.methods.adalora import AdaLoraConfig, AdaLoraLayer, budget_schedule, orthogonal_regulariser
from peftrun.recipe import ModelSection, load_recipe

METHOD = get_method("adalora")
NO_DROPOUT = {
    "roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "llama": {},
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "t5": dict(dropout_rate=0.0),
    "bloom": {},
}
FAMILIES = [
    ("roberta", "SEQ_CLS"),
    ("t5", "SEQ_2_SEQ_LM"),
    ("gpt2", "CAUSAL_LM"),
    ("llama", "CAUSAL_LM"),
    ("bert", "TOKEN_CLS"),
    ("bloom", "CAUSAL_LM"),
]
SCHEDULE = dict(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2)


def peft_pair(arch: str, task: str, **kw):
    """The same tiny base adapted by peft and by peftrun, with the same adapter tensors."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    theirs = peft.get_peft_model(
        tiny_model(arch, task, **NO_DROPOUT[arch]), peft.AdaLoraConfig(task_type=task, **kw)
    )
    ours = wrap(tiny_model(arch, task, **NO_DROPOUT[arch]), task, "adalora", AdaLoraConfig(**kw))
    ours.load_adapter_state_dict(get_peft_model_state_dict(theirs))
    return theirs, ours


def labelled_batch(model, task: str, seed: int):
    batch = tiny_batch(model, task, batch=4, seed=seed)
    if task == "SEQ_CLS":
        batch["labels"] = torch.tensor([0, 1, 2, 1])
    elif task == "SEQ_2_SEQ_LM":
        batch["labels"] = batch["decoder_input_ids"].clone()
    else:
        batch["labels"] = batch["input_ids"].clone()
    return batch


def base_tensors(peft_model) -> dict[str, torch.Tensor]:
    trainable = {id(p) for p in peft_model.parameters() if p.requires_grad}
    return {n: p.detach().clone() for n, p in peft_model.model.named_parameters() if id(p) not in trainable}


# ------------------------------------------------------------------ counts and the peft oracle


@pytest.mark.parametrize("arch,task", FAMILIES)
def test_counts_and_outputs_match_peft(arch, task):
    theirs, ours = peft_pair(arch, task, init_r=6, target_r=2, total_step=10, init_lora_weights=False)
    expected = (
        sum(p.numel() for p in theirs.parameters() if p.requires_grad),
        sum(p.numel() for p in theirs.parameters()),
    )
    assert ours.parameter_counts() == expected
    batch = tiny_batch(ours.model, task)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        out, ref = ours(**batch).logits, theirs(**batch).logits
        with ours.disable_adapters():
            base = ours(**batch).logits
    assert (out - base).abs().max() > 1e-3  # the update is not zero, so the comparison means something
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_roberta_count_by_hand():
    """init_r=6 on query/key/value/attention.output.dense (32x32), intermediate (32->64), output (64->32)."""
    ours = wrap(
        tiny_model("roberta", "SEQ_CLS"),
        "SEQ_CLS",
        "adalora",
        AdaLoraConfig(init_r=6, target_r=2, total_step=10),
    )
    square = 6 * 32 + 6 + 32 * 6
    per_layer = 4 * square + 2 * (6 * 32 + 6 + 64 * 6)
    head = 32 * 32 + 32 + 3 * 32 + 3
    assert ours.parameter_counts()[0] == 2 * per_layer + head == 6603


def test_params_line_for_the_mrpc_recipe():
    res = run_cli("params", "recipes/roberta_large_mrpc_adalora.yaml")
    assert res.returncode == 0, res.stderr
    # 24 layers of roberta-large, init_r=12: q, k, v, attention.output.dense (1024x1024) and the feed-forward pair
    per_layer = 4 * (12 * 1024 + 12 + 1024 * 12) + 2 * (12 * 1024 + 12 + 4096 * 12)
    trainable = 24 * per_layer + (1024 * 1024 + 1024 + 2 * 1024 + 2)
    assert trainable == 6_361_794
    assert (
        res.stdout.strip() == "trainable params: 6,361,794 || all params: 361,723,732 || trainable%: 1.7587"
    )


# ------------------------------------------------------------------ the rank allocator


def test_budget_schedule_values():
    kw = dict(init_budget=72, target_budget=24, tinit=2, tfinal=3, total_step=12, deltaT=2)
    assert budget_schedule(1, **kw) == (72, False)
    assert budget_schedule(2, **kw) == (72, False)
    assert budget_schedule(3, **kw) == (54, False)  # 24 + 48 (6/7)^3 = 54.2
    assert budget_schedule(4, **kw) == (41, True)  # 24 + 48 (5/7)^3 = 41.5
    assert budget_schedule(8, **kw) == (24, True)  # 24 + 48 (1/7)^3 = 24.1
    assert budget_schedule(9, **kw) == (24, False)
    assert budget_schedule(10, **kw) == (24, True)


def train_lockstep(theirs, ours, task: str, steps: int):
    """Same SGD steps on both; peft's update_and_allocate and our after_step in the same place."""
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    theirs.train(), ours.train()
    patterns = []
    for step in range(1, steps + 1):
        batch = labelled_batch(ours.model, task, seed=step)
        theirs(**batch).loss.backward()  # peft adds the orthogonal regulariser inside forward
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()
        loss = ours(**batch).loss + METHOD.extra_loss(ours, "default")
        loss.backward()
        opt_ours.step()
        METHOD.after_step(ours, "default", step, steps)
        opt_ours.zero_grad()
        reference = theirs.peft_config["default"].rank_pattern
        patterns.append(
            (ours.config.rank_pattern, {k.replace(".default", ""): v for k, v in (reference or {}).items()})
        )
    return patterns


def test_allocator_matches_peft_step_for_step_and_meets_the_budget():
    theirs, ours = peft_pair("roberta", "SEQ_CLS", **SCHEDULE)
    patterns = train_lockstep(theirs, ours, "SEQ_CLS", SCHEDULE["total_step"])
    assert patterns[0] == (None, {}) and patterns[1] == (None, {})  # tinit: no masking yet
    for mine, reference in patterns[3:]:
        assert mine == reference
    final = ours.config.rank_pattern
    layers = [m for m in ours.model.modules() if isinstance(m, AdaLoraLayer)]
    assert len(layers) == 12 and len(final) == 12
    kept = sum(sum(flags) for flags in final.values())
    assert kept == SCHEDULE["target_r"] * 12 == 24
    nonzero = sum(int((layer.lora_E["default"] != 0).sum()) for layer in layers)
    assert nonzero == 24
    assert len({sum(flags) for flags in final.values()}) > 1  # the budget moved between layers
    assert ours.config.total_step == 12


def test_total_step_comes_from_the_loop_and_a_bad_schedule_is_refused():
    ours = wrap(
        tiny_model("llama", "CAUSAL_LM"),
        "CAUSAL_LM",
        "adalora",
        AdaLoraConfig(init_r=4, target_r=2, tinit=3, tfinal=3),
    )
    batch = labelled_batch(ours.model, "CAUSAL_LM", seed=0)
    ours(**batch).loss.backward()
    METHOD.after_step(ours, "default", 1, 50)
    assert ours.config.total_step == 50
    ours.config.total_step = None
    with pytest.raises(PeftrunError, match="tinit"):
        METHOD.after_step(ours, "default", 1, 6)


def test_orthogonal_regulariser_hand_made():
    config = AdaLoraConfig(
        init_r=2,
        target_r=1,
        total_step=10,
        target_modules=r"model\.layers\.0\.self_attn\.q_proj",
        orth_reg_weight=0.5,
    )
    ours = wrap(tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", "adalora", config)
    layer = ours.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A["default"].zero_()
        layer.lora_A["default"][0, 0], layer.lora_A["default"][1, 1] = 1.0, 2.0  # Q Q^T - I = diag(0, 3)
        layer.lora_B["default"].zero_()
        layer.lora_B["default"][0, 0], layer.lora_B["default"][1, 1] = 1.0, 1.0  # P^T P - I = 0
    assert orthogonal_regulariser(ours, "default").item() == pytest.approx(1.5)  # mean of 3 and 0
    assert METHOD.extra_loss(ours, "default").item() == pytest.approx(0.75)


# ------------------------------------------------------------------ checkpoints both ways


def test_pruned_peftrun_adapter_loads_in_peft(tmp_path, tiny_dir):
    peft = pytest.importorskip("peft")
    theirs, ours = peft_pair("roberta", "SEQ_CLS", **SCHEDULE)
    train_lockstep(theirs, ours, "SEQ_CLS", SCHEDULE["total_step"])
    base_dir = tiny_dir("roberta", "SEQ_CLS")
    save_adapter(ours, tmp_path / "ours", base_model=str(base_dir))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 12
    assert config["rank_pattern"] == ours.config.rank_pattern
    state = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    key = "base_model.model.roberta.encoder.layer.0.attention.self.query"
    kept = sum(config["rank_pattern"]["roberta.encoder.layer.0.attention.self.query.lora_E"])
    assert state[f"{key}.lora_A"].shape == (kept, 32) and state[f"{key}.lora_B"].shape == (32, kept)
    assert state[f"{key}.lora_E"].shape == (kept, 1)

    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, **NO_DROPOUT["roberta"])
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    ours.eval()
    batch = tiny_batch(ours.model, "SEQ_CLS")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=0)


def test_pruned_peft_adapter_loads_in_peftrun(tmp_path, tiny_dir):
    base_dir = tiny_dir("llama", "CAUSAL_LM")
    theirs, ours = peft_pair("llama", "CAUSAL_LM", **SCHEDULE, init_lora_weights=False)  # a large update
    train_lockstep(theirs, ours, "CAUSAL_LM", SCHEDULE["total_step"])
    theirs.save_pretrained(tmp_path / "theirs")
    section = ModelSection(name_or_path=str(base_dir), task_type="CAUSAL_LM", tokenizer="byt5")
    loaded, _ = load_adapted(tmp_path / "theirs", model_section=section)
    loaded.eval(), theirs.eval()
    layers = [m for m in loaded.model.modules() if isinstance(m, AdaLoraLayer)]
    assert sum(layer.lora_A["default"].shape[0] for layer in layers) == 2 * len(layers)  # pruned shapes
    batch = tiny_batch(loaded.model, "CAUSAL_LM")
    with torch.no_grad():
        out, ref = loaded(**batch).logits, theirs(**batch).logits
        with theirs.disable_adapter():
            base = theirs(**batch).logits
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # and it saves back to the same pattern and shapes
    save_adapter(loaded, tmp_path / "again", base_model=str(base_dir))
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    first = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert again["rank_pattern"] == first["rank_pattern"]
    a, b = (
        load_file(tmp_path / "again" / "adapter_model.safetensors"),
        load_file(tmp_path / "theirs" / "adapter_model.safetensors"),
    )
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_training_loop_fills_total_step_prunes_and_saves_for_peft(tmp_path):
    """The real loop (tiny BERT, byte tokenizer): after_step/extra_loss hooks, the saved pattern, peft loads it."""
    peft = pytest.importorskip("peft")
    from tinyrun import tiny_model_dir, tiny_recipe_dict, write_recipe, write_rows

    from peftrun.training.loop import train

    model_dir = tiny_model_dir(tmp_path)
    write_rows(tmp_path / "data" / "train.csv")
    recipe = tiny_recipe_dict(
        model_dir, tmp_path / "data", tmp_path / "out", num_epochs=2, eval_each_epoch=False
    )
    recipe["method"] = {
        "name": "adalora",
        "init_r": 4,
        "target_r": 2,
        "tinit": 2,
        "tfinal": 3,
        "lora_alpha": 16,
    }
    train(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)))
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["total_step"] == 18  # 36 training rows / batch 4 = 9 steps, 2 epochs
    pattern = config["rank_pattern"]
    assert len(pattern) == 4 and all(len(flags) == 4 for flags in pattern.values())  # query, value x 2 layers
    assert sum(sum(flags) for flags in pattern.values()) == 2 * 4
    state = load_file(out / "adapter_model.safetensors")
    for key, flags in pattern.items():
        assert state[f"base_model.model.{key}"].shape == (sum(flags), 1)

    loaded, _ = load_adapted(out)
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    loaded.eval()
    ids = torch.randint(4, 300, (2, 9))
    with torch.no_grad():
        out_ours, out_theirs = loaded(input_ids=ids).logits, theirs(input_ids=ids).logits
        with loaded.disable_adapters():
            assert (loaded(input_ids=ids).logits - out_ours).abs().max() > 1e-4
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=0)

    # `peftrun merge` folds the pruned adapter in: a plain model with the same outputs
    folder, diff = merge(out, tmp_path / "merged")
    assert diff <= 1e-5
    merged = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, out_ours, atol=1e-5, rtol=0)

    # a full-size model (built without the rank_pattern) refuses the pruned tensors with the reason
    fresh = wrap(
        AutoModelForSequenceClassification.from_pretrained(model_dir),
        "SEQ_CLS",
        "adalora",
        AdaLoraConfig(init_r=4, target_r=2, lora_alpha=16),
    )
    with pytest.raises(PeftrunError, match="pruned to its rank_pattern"):
        fresh.load_adapter_state_dict(state)


# ------------------------------------------------------------------ learning and merging


def test_learns_with_frozen_base_and_merges():
    task = "SEQ_2_SEQ_LM"  # tiny T5: AdaLoRA on q, k, v, o, wi, wo of every block
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=40, tinit=5, tfinal=10, deltaT=2, lora_alpha=16)
    ours = wrap(tiny_model("t5", task, **NO_DROPOUT["t5"]), task, "adalora", config)
    before = base_tensors(ours)
    batch = labelled_batch(ours.model, task, seed=3)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=5e-2)
    ours.train()
    losses = []
    for step in range(1, 41):
        loss = ours(**batch).loss
        losses.append(loss.item())
        (loss + METHOD.extra_loss(ours, "default")).backward()
        opt.step()
        METHOD.after_step(ours, "default", step, 40)
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses
    assert sum(sum(flags) for flags in ours.config.rank_pattern.values()) == 2 * len(ours.config.rank_pattern)
    after = base_tensors(ours)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    ours.eval()
    probe = tiny_batch(ours.model, task)
    with torch.no_grad():
        unmerged = ours(**probe).logits
        with ours.disable_adapters():
            base = ours(**probe).logits
        ours.merge()
        merged = ours(**probe).logits
        ours.unmerge()
        restored = base_tensors(ours)
    assert (unmerged - base).abs().max() > 1e-2  # the pruned adapter does change the output
    assert (merged - unmerged).abs().max() <= 1e-5
    assert all(torch.equal(before[k], restored[k]) for k in before)


# ------------------------------------------------------------------ recipes


@pytest.mark.parametrize(
    "setting,message",
    [
        ("method.target_r=20", "target_r (20) must not exceed init_r (12)"),
        ("method.total_step=600", "tinit (200) must be below total_step - tfinal"),
        ("method.use_dora=true", "no DoRA variant"),
    ],
)
def test_inconsistent_configs_are_refused(setting, message):
    with pytest.raises(PeftrunError, match=re.escape(message)):
        load_recipe(REPO / "recipes/roberta_large_mrpc_adalora.yaml", [setting])


def test_validate_exit_code():
    res = run_cli("validate", "recipes/roberta_large_mrpc_adalora.yaml", "--set", "method.target_r=20")
    assert res.returncode == 2
    assert (
        "roberta_large_mrpc_adalora.yaml:" in res.stderr
        and "target_r (20) must not exceed init_r (12)" in res.stderr
    )
    assert run_cli("validate", "recipes/roberta_large_mrpc_adalora.yaml").returncode == 0


@pytest.mark.slow
def test_offline_recipe_learns_saves_the_rank_pattern_and_loads_in_peft(tmp_path, minilm_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    recipe = str(REPO / "recipes/offline/quickstart_adalora.yaml")
    res = run_cli(
        "train", recipe, "--set", f"output_dir={out}", "--set", "training.progress_bar=false", timeout=1800
    )
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "accuracy" in r][-1]["accuracy"] >= 0.9
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["total_step"] == 60  # 3 epochs x 20 batches, from the loop
    assert len(config["rank_pattern"]) == 12  # query and value in 6 layers
    assert sum(sum(flags) for flags in config["rank_pattern"].values()) == 4 * 12
    loaded, _ = load_adapted(out)
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    loaded.eval()
    ids = torch.randint(1000, 2000, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0
        )
