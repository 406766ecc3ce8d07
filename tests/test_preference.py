"""Preference objectives (reward, DPO, ORPO): rows -> turns -> token ids, answer log-probabilities without the
full logits, losses and metrics against trl 1.16 (the test-only oracle, as peft is), and real runs through
`peftrun train`: metrics, reload, resume after a kill, two processes.

The trl checks call trl's own trainer code: a DPOTrainer, an ORPOTrainer (trl.experimental.orpo) and a
RewardTrainer, built offline on a tiny llama / bert wrapped by peft, whose LoRA weights are *our* saved adapter
loaded with peft.PeftModel.from_pretrained; each trainer's `compute_loss` runs on a batch from trl's own
tokenisation and collator, ours on our own, and the batches, losses, gradients and logged metrics must agree.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, shared_data
from faults import fault_env
from safetensors.torch import load_file
from tiny_text import ONE_THREAD_ENV, one_thread, save_tiny_with_tokenizer  # noqa: F401  (a fixture)

from peftrun import lm_loss
from peftrun.adapted import wrap
from peftrun.io.peft_format import save_adapter
from peftrun.lm_loss import sequence_logps
from peftrun.methods.lora import LoraConfig
from peftrun.preference import (
    ASSISTANT,
    BadRows,
    PairCollator,
    pair_turns,
    render,
    tokenize_pairs,
)
from peftrun.recipe import DataSection, recipe_from_dict
from peftrun.tasks import IGNORE_INDEX
from peftrun.training.objectives import make_objective

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # fp32: every loss, metric and gradient against its oracle

WORDS = (
    "what is the capital of france paris i do not know answer in short colour sky blue it green and grass "
    "say something nice you are kind more very good no tell me about a clear helpful reply bad wrong rude "
    "cat dog tree river city music food rain sun moon stone ugly lazy noise human assistant"
).split()
CORPUS = [" ".join(WORDS)]

# three conversational pairs of different lengths (so the batch pads), in trl's message-list form
PAIRS = [
    {
        "prompt": [{"role": "user", "content": "what is the capital of france"}],
        "chosen": [{"role": "assistant", "content": "paris is the capital"}],
        "rejected": [{"role": "assistant", "content": "i do not know"}],
    },
    {
        "prompt": [
            {"role": "system", "content": "answer in short"},
            {"role": "user", "content": "what colour is the sky"},
        ],
        "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "it is green and the grass is blue"}],
    },
    {
        "prompt": [
            {"role": "user", "content": "say something nice"},
            {"role": "assistant", "content": "you are kind"},
            {"role": "user", "content": "say more"},
        ],
        "chosen": [{"role": "assistant", "content": "you are very kind and good"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    },
]


def data_cfg(**kw) -> DataSection:
    return DataSection(path="unused", format="preference", **{"max_length": 64, **kw})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama (causal LM, chat template) and a tiny bert reward model (one output), with tokenizers."""
    root = tmp_path_factory.mktemp("pref_models")
    llama_tok = save_tiny_with_tokenizer(root / "llama", "llama", "CAUSAL_LM", CORPUS)
    bert_tok = save_tiny_with_tokenizer(
        root / "bert", "bert", "SEQ_CLS", CORPUS, num_labels=1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return {"root": root, "llama": root / "llama", "llama_tok": llama_tok, "bert": root / "bert", "bert_tok": bert_tok}


def plain_tokenizer(tok):
    """The same tokenizer without its chat template: rows render in HH's plain Human:/Assistant: form."""
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain


# ================================================================== 1. row shapes, rendering, token masks


def hh_rows(n: int) -> list[dict]:
    rows = []
    with gzip.open(shared_data("hh_rlhf_harmless", "harmless_base_test.jsonl.gz"), "rt", encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


class NoTemplate:
    """A tokenizer without a chat template, as far as `render` looks."""

    chat_template = None


def test_hh_dialogue_splits_at_the_last_assistant_turn_and_renders_back_exactly():
    cfg = data_cfg()
    for row in hh_rows(5):
        prompt, chosen, rejected = pair_turns(row, cfg)
        cut = row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)
        assert chosen == row["chosen"][cut:].strip()
        assert rejected == row["rejected"][cut:].strip()
        assert row["rejected"][:cut] == row["chosen"][:cut]  # HH pairs share everything before the last answer
        assert [t["role"] for t in prompt] == ["user", "assistant"] * (len(prompt) // 2) + ["user"]
        assert "Human:" not in " ".join(t["content"] for t in prompt)

        # the plain form of a tokenizer without a chat template is HH's own text, to the character
        text, answer = render(NoTemplate(), prompt, chosen, cfg)
        assert text + answer == row["chosen"]
        text_r, answer_r = render(NoTemplate(), prompt, rejected, cfg)
        assert text_r == text and text_r + answer_r == row["rejected"]

    first = hh_rows(1)[0]  # the first real row, by content
    prompt, chosen, rejected = pair_turns(first, cfg)
    assert len(prompt) == 5
    assert prompt[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert prompt[-1] == {"role": "user", "content": "okay some of these do not have anything to do with pens"}
    assert prompt[3]["content"].startswith("Ok, I’ll give you a couple examples")
    assert "\n\n1. Draw" in prompt[3]["content"]  # paragraphs inside a turn stay in it
    assert chosen.startswith("No, sorry!  All of these involve a pen")
    assert rejected.startswith("There are lots of funny things you can do with pens")


def test_trl_rows_as_strings_and_message_lists():
    cfg = data_cfg()
    assert pair_turns({"prompt": "what is the sky", "chosen": "blue", "rejected": "green"}, cfg) == (
        [{"role": "user", "content": "what is the sky"}], "blue", "green",
    )
    for row in PAIRS:
        prompt, chosen, rejected = pair_turns(row, cfg)
        assert prompt == row["prompt"]
        assert chosen == row["chosen"][-1]["content"] and rejected == row["rejected"][-1]["content"]
    # whole dialogues as message lists that differ only in the last assistant turn (HH's shape, as messages)
    shared = PAIRS[2]["prompt"]
    row = {"chosen": shared + PAIRS[2]["chosen"], "rejected": shared + PAIRS[2]["rejected"]}
    assert pair_turns(row, cfg) == (shared, "you are very kind and good", "no")


def test_llamafactory_sharegpt_row_from_the_demo_file():
    rows = json.loads(shared_data("llamafactory_demo", "dpo_en_demo.json").read_text(encoding="utf-8"))
    cfg = data_cfg()
    multi = next(r for r in rows if len(r["conversations"]) >= 5)
    for row in (rows[0], multi):
        prompt, chosen, rejected = pair_turns(row, cfg)
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        assert prompt == [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
        assert chosen == row["chosen"]["value"] and rejected == row["rejected"]["value"]
    assert rows[0]["conversations"][0]["value"].startswith("Hi! I'd like to create a new language game")
    assert len(multi["conversations"]) % 2 == 1 and prompt[-1]["role"] == "user"


def test_chat_template_rendering_and_label_masks(models):
    tok, cfg = models["llama_tok"], data_cfg()
    prompt, answer = render(tok, PAIRS[0]["prompt"], "paris is the capital", cfg)
    assert prompt == "user : what is the capital of france </s> assistant : "
    assert answer == "paris is the capital </s> "
    with_system = render(tok, PAIRS[0]["prompt"], "x", data_cfg(system_prompt="answer in short"))[0]
    assert with_system.startswith("system : answer in short </s> user : ")

    rows = tokenize_pairs(PAIRS, cfg, tok, causal=True, bad=BadRows("error"))
    assert len(rows) == 3
    for row, pair in zip(rows, PAIRS):
        prompt_text, _ = render(tok, pair["prompt"], None, cfg)
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]  # a chat template brings its own
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            n = len(prompt_ids)
            assert ids[:n] == prompt_ids and ids[0] != tok.bos_token_id
            assert labels[:n] == [IGNORE_INDEX] * n  # -100 exactly on the prompt ...
            assert labels[n:] == ids[n:] and IGNORE_INDEX not in labels[n:]  # ... and nowhere in the answer
            assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # one EOS ends the answer
            want = tok(pair[side][-1]["content"], add_special_tokens=False)["input_ids"]
            assert ids[n:-1] == want

    # without a chat template (HH plain text): BOS starts the prompt, EOS is added after the answer
    plain = plain_tokenizer(tok)
    row = tokenize_pairs([{"prompt": "what is the sky", "chosen": "blue", "rejected": "no"}], cfg, plain,
                         causal=True, bad=BadRows("error"))[0]
    prompt_ids = plain("\n\nHuman: what is the sky\n\nAssistant:")["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id
    assert row["chosen_input_ids"] == prompt_ids + plain(" blue", add_special_tokens=False)["input_ids"] + [2]
    assert row["chosen_labels"] == [IGNORE_INDEX] * len(prompt_ids) + row["chosen_input_ids"][len(prompt_ids):]

    # the pair batch: [chosen rows..., rejected rows...], padded on the right, labels padded with -100
    batch = PairCollator(tok.pad_token_id)(rows)
    width = max(len(r[f"{s}_input_ids"]) for r in rows for s in ("chosen", "rejected"))
    assert batch["input_ids"].shape == batch["labels"].shape == (6, width)
    for i, (side, j) in enumerate([(s, j) for s in ("chosen", "rejected") for j in range(3)]):
        ids = rows[j][f"{side}_input_ids"]
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["input_ids"][i, len(ids):].eq(tok.pad_token_id).all()
        assert batch["attention_mask"][i].sum() == len(ids)
        assert batch["labels"][i, len(ids):].eq(IGNORE_INDEX).all()


def test_reward_rows_keep_the_answer_when_the_prompt_is_too_long(models):
    tok = models["bert_tok"]
    long_prompt = " ".join(["tell me about the city"] * 12)
    rows = tokenize_pairs([{"prompt": long_prompt, "chosen": "a clear helpful reply", "rejected": "no", "margin": 2}],
                          data_cfg(max_length=16), tok, causal=False, bad=BadRows("error"))
    chosen, rejected = rows[0]["chosen_input_ids"], rows[0]["rejected_input_ids"]
    assert len(chosen) == len(rejected) == 16  # truncated from the left ...
    assert chosen[0] == tok.cls_token_id and chosen[-1] == tok.sep_token_id
    assert chosen[-5:-1] == tok("a clear helpful reply", add_special_tokens=False)["input_ids"]  # ... answer kept
    assert rejected[-2] == tok.convert_tokens_to_ids("no")
    assert rows[0]["margin"] == 2.0
    assert tok.truncation_side == "right"  # the tokenizer is left as it was
    batch = PairCollator(tok.pad_token_id)(rows)
    assert "labels" not in batch and batch["margin"].tolist() == [2.0]


BAD = [
    {"prompt": "say something nice", "chosen": "you are kind", "rejected": " you are kind "},  # identical
    {"prompt": " ".join(["tell me about the city"] * 14), "chosen": "good", "rejected": "bad"},  # no room
    {"prompt": "say more", "chosen": "", "rejected": "no"},  # empty answer
]


def test_bad_rows_are_counted_and_dropped_or_refused(models):
    tok = models["llama_tok"]
    good = {"prompt": "what is the sky", "chosen": "blue", "rejected": "green"}
    bad = BadRows("drop")
    rows = tokenize_pairs([good, *BAD, good], data_cfg(max_length=48), tok, causal=True, bad=bad)
    assert len(rows) == 2
    assert dict(bad.counts) == {
        "with identical chosen and rejected answers": 1,
        "with a prompt longer than data.max_length (48 tokens)": 1,
        "with an empty answer (or dialogues that differ before the last turn)": 1,
    }
    assert bad.line("train").startswith("train: dropped 3 row(s): 1 with identical")
    from peftrun.errors import PeftrunError

    with pytest.raises(PeftrunError, match=r"row 2: with a prompt longer than data.max_length \(48 tokens\)"):
        tokenize_pairs([good, good, BAD[1]], data_cfg(max_length=48), tok, causal=True, bad=BadRows("error"))


# ================================================================== 2. sequence_logps: chunked = full logits = by hand


def lora_llama(path, seed=0, **kw):
    from transformers import AutoModelForCausalLM

    model = wrap(AutoModelForCausalLM.from_pretrained(path), "CAUSAL_LM", "lora",
                 LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # A and B away from their initial values: the adapted model differs from the base
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def logps_batch(seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (4, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 6:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # prompts
    labels[2, :] = IGNORE_INDEX  # a row with no answer token
    return {"input_ids": ids, "attention_mask": mask}, labels


def by_hand(model, inputs, labels, virtual=0):
    """sum_t log softmax(logits_t)[y_{t+1}] over labelled positions, from the model's whole logits."""
    logits = model(**inputs).logits[:, virtual:].float()
    logp = logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token = logp.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (token * mask).sum(1), mask.sum(1).float()


def run_logps(model, inputs, labels, how, weights):
    """(logps, counts, grads of sum(weights * logps) by parameter, grad of the head's input)."""
    model.zero_grad(set_to_none=True)
    hidden, calls = [], []

    def keep(module, args, output):  # the final norm's output is the head's input
        output.retain_grad()
        hidden.append(output)

    # a hook on the final norm, not on the head: a hooked head is not a plain one, and would keep its logits
    handle = model.model.model.norm.register_forward_hook(keep)
    chunks = lm_loss._ChunkedTokenLogps.apply
    try:
        if how == "hand":
            logps, counts = by_hand(model, inputs, labels, virtual=getattr(model, "_virtual", 0))
        else:
            lm_loss._ChunkedTokenLogps.apply = lambda *a: calls.append(1) or chunks(*a)
            logps, counts = sequence_logps(model, model.model, labels, chunked=how == "chunked", **inputs)
    finally:
        handle.remove()
        lm_loss._ChunkedTokenLogps.apply = chunks
    assert len(calls) == (how == "chunked")  # the chunks ran where asked, and only there
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), counts, grads, hidden[0].grad.clone()


def assert_same_logps(model, inputs, labels, monkeypatch, chunk_rows: int):
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a different incoming gradient for each row
    ref = run_logps(model, inputs, labels, "hand", weights)
    full = run_logps(model, inputs, labels, "full", weights)
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 128 * chunk_rows)  # vocabulary 128: chunk_rows tokens a chunk
    monkeypatch.setattr(lm_loss, "MIN_CHUNK_ROWS", 1)
    chunked = run_logps(model, inputs, labels, "chunked", weights)
    assert (ref[1] > 0).sum() >= 3 and ref[1][2] == 0  # the answerless row counts nothing ...
    assert ref[0][2] == 0 and chunked[0][2] == 0  # ... and scores 0
    if chunk_rows < 1000:
        assert int(ref[1].sum()) > 2 * chunk_rows  # several chunks
    for got in (full, chunked):
        assert torch.equal(got[1], ref[1])
        assert (got[0] - ref[0]).abs().max().item() <= TOL
        assert got[2].keys() == ref[2].keys() and len(ref[2]) >= 1
        for name, grad in ref[2].items():
            assert grad.abs().max() > 0, name
            assert (got[2][name] - grad).abs().max().item() <= TOL, name
        assert (got[3] - ref[3]).abs().max().item() <= TOL  # w.r.t. the hidden states the head reads
    return ref


def test_sequence_logps_chunked_equals_full_logits_and_hand_computation(models, monkeypatch):
    model = lora_llama(models["llama"]).train()
    model.model.lm_head.weight.requires_grad_(True)  # a trained head too: its gradient is recomputed in chunks
    inputs, labels = logps_batch()
    assert lm_loss.plain_head(model.model)
    ref = assert_same_logps(model, inputs, labels, monkeypatch, chunk_rows=3)
    assert ref[0][0] < -10  # real numbers: 8 answer tokens of a 128-word vocabulary
    # `within`: the sums over a subset of the labelled tokens, from the same forward (ORPO's answers)
    within = torch.zeros_like(labels, dtype=torch.bool)
    within[:, 8:] = True
    subset = labels.masked_fill(~within, IGNORE_INDEX)
    for chunked in (True, False):
        with torch.no_grad():
            logps, counts, part, part_counts = sequence_logps(model, model.model, labels, chunked=chunked,
                                                              within=within, **inputs)
            want, want_counts = by_hand(model, inputs, subset)
        assert (logps - ref[0]).abs().max() <= TOL and torch.equal(counts, ref[1])
        assert (part - want).abs().max() <= TOL and torch.equal(part_counts, want_counts)
        assert 0 < part_counts.sum() < counts.sum()
    assert len(ref[2]) == 9  # LoRA A and B of q_proj and v_proj in 2 layers, and the head
    assert_same_logps(model, inputs, labels, monkeypatch, chunk_rows=1 << 16)  # everything in one chunk


def test_sequence_logps_with_a_frozen_head_equal_by_hand(models, monkeypatch):
    # the adapter methods' case: the forward writes d logp / d h and the backward only scales it
    model = lora_llama(models["llama"]).train()
    assert not model.model.lm_head.weight.requires_grad
    inputs, labels = logps_batch()
    ref = assert_same_logps(model, inputs, labels, monkeypatch, chunk_rows=3)
    assert len(ref[2]) == 8  # LoRA A and B of q_proj and v_proj in 2 layers
    assert_same_logps(model, inputs, labels, monkeypatch, chunk_rows=1 << 16)


def test_sequence_logps_with_virtual_tokens_in_front(models, monkeypatch):
    from transformers import AutoModelForCausalLM

    from peftrun.methods.prompt_tuning import PromptTuningConfig

    model = wrap(AutoModelForCausalLM.from_pretrained(models["llama"]), "CAUSAL_LM", "prompt_tuning",
                 PromptTuningConfig(num_virtual_tokens=3)).train()
    model._virtual = 3
    inputs, labels = logps_batch()
    assert model(**inputs).logits.shape[1] == labels.shape[1] + 3
    assert_same_logps(model, inputs, labels, monkeypatch, chunk_rows=4)


# ================================================================== 3. against trl's trainers, one identical batch


def recipe_for(model_dir, objective: str, task="CAUSAL_LM", **preference):
    return recipe_from_dict({
        "model": {"name_or_path": str(model_dir), "task_type": task},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8},
        "data": {"path": "unused", "format": "preference", "max_length": 64},
        "training": {"objective": objective},
        "preference": preference,
    })


def peft_twin(ours, base_dir, folder, auto_cls):
    """peft's model with our adapter: saved by peftrun, loaded by peft.PeftModel.from_pretrained."""
    from peft import PeftModel

    save_adapter(ours, folder, base_model=str(base_dir))
    kwargs = {"num_labels": 1} if auto_cls.__name__.endswith("SequenceClassification") else {}
    twin = PeftModel.from_pretrained(auto_cls.from_pretrained(base_dir, **kwargs), str(folder), is_trainable=True)
    assert_same_weights(ours, twin)
    return twin.train()


def assert_same_weights(ours, twin):
    from peft import get_peft_model_state_dict

    mine, theirs = ours.adapter_state_dict(), get_peft_model_state_dict(twin)
    assert mine.keys() == theirs.keys() and len(mine) >= 8
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def grads_of(model, prefix=""):
    return {n[len(prefix):]: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys() and len(ours) >= 4
    for name, grad in ours.items():
        # a reward head's bias is the one exception: r(chosen) - r(rejected) cancels it
        assert grad.abs().max() > 0 or name.endswith("modules_to_save.default.bias"), name
        assert (grad - theirs[name]).abs().max().item() <= TOL, name


def ours_step(objective, model, batch):
    model.zero_grad(set_to_none=True)
    step = objective(model, batch)
    step.loss.backward()
    return step, grads_of(model)


def trl_step(trainer, model, batch):
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss, grads_of(model, "base_model.")


@pytest.fixture(scope="module")
def dpo_pair(models, tmp_path_factory):
    """Our LoRA llama (A and B random) and the folder its adapter is saved in, in peft's format."""
    ours = lora_llama(models["llama"], seed=1).train()
    folder = tmp_path_factory.mktemp("dpo_adapter") / "a"
    save_adapter(ours, folder, base_model=str(models["llama"]))
    return ours, folder


def dpo_trainer(models, folder, out, **config):
    """trl's DPOTrainer on the plain base with a peft_config: trl's "new adapter" set-up, whose reference is the
    base with the adapter disabled (a model that already holds an adapter would get a frozen copy of it as the
    reference instead). The new adapter then gets our saved weights."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from peft import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    peft_config = PeftLoraConfig.from_pretrained(str(folder))
    peft_config.inference_mode = False
    args = DPOConfig(output_dir=str(out), report_to=[], use_cpu=True, max_length=64, **config)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(models["llama"]), args=args,
                         processing_class=models["llama_tok"], train_dataset=Dataset.from_list(PAIRS),
                         peft_config=peft_config)
    twin = trainer.model
    assert list(twin.peft_config) == ["default"]
    result = set_peft_model_state_dict(twin, load_file(str(folder / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    return trainer, twin.train()


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_dpo_loss_metrics_and_gradients_equal_trl(models, dpo_pair, tmp_path, loss_type, beta):
    ours, folder = dpo_pair
    tok = models["llama_tok"]
    trainer, twin = dpo_trainer(models, folder, tmp_path, loss_type=[loss_type], beta=beta)
    assert_same_weights(ours, twin)
    # trl's tokenisation of the same rows is ours: prompt through the chat template, the answer after it
    rows = tokenize_pairs(PAIRS, data_cfg(), tok, causal=True, bad=BadRows("error"))
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    for row, ex in zip(rows, examples):
        for side in ("chosen", "rejected"):
            assert row[f"{side}_input_ids"] == ex["prompt_ids"] + ex[f"{side}_ids"]
            assert row[f"{side}_labels"] == [IGNORE_INDEX] * len(ex["prompt_ids"]) + ex[f"{side}_ids"]
    theirs_batch = trainer.data_collator(examples)
    batch = PairCollator(tok.pad_token_id)(rows)
    assert torch.equal(batch["input_ids"], theirs_batch["input_ids"])
    assert torch.equal(batch["attention_mask"], theirs_batch["attention_mask"])
    assert torch.equal(batch["labels"] != IGNORE_INDEX, theirs_batch["completion_mask"].bool())

    objective = make_objective(recipe_for(models["llama"], "dpo", beta=beta, loss_type=loss_type))
    objective.bind(ours, tok, None)
    step, our_grads = ours_step(objective, ours, batch)
    loss, their_grads = trl_step(trainer, twin, theirs_batch)
    assert abs(step.loss.item() - loss.item()) <= TOL, (step.loss.item(), loss.item())
    assert_same_grads(our_grads, their_grads)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in DPO_METRICS:
        assert abs(step.metrics[key] - logged[key]) <= TOL, (key, step.metrics[key], logged[key])
    # real numbers: the adapter moved the model, so the rewards are not all zero
    assert abs(step.metrics["rewards/margins"]) > 1e-3 and step.metrics["logps/chosen"] < -5
    if loss_type == "sigmoid":
        assert step.loss.item() != pytest.approx(math.log(2), abs=1e-4)


def test_dpo_label_smoothing_equals_trls_conservative_dpo(models, dpo_pair, tmp_path):
    """trl 1.16 applies `label_smoothing` to its robust / EXO / AOT losses, no longer to "sigmoid" (whose loss it
    leaves unsmoothed). Our sigmoid + label_smoothing is conservative DPO, -(1-e) log s(bh) - e log s(-bh): in trl
    that formula is the "aot" branch, applied after sorting the batch's log-ratios, which for a batch of one pair
    is no reordering. So: our loss on the 3-pair batch = the mean of trl's aot loss on each pair alone (and so for
    the gradients)."""
    ours, folder = dpo_pair
    tok = models["llama_tok"]
    eps, beta = 0.2, 0.3
    trainer, twin = dpo_trainer(models, folder, tmp_path, loss_type=["aot"], beta=beta, label_smoothing=eps)
    objective = make_objective(recipe_for(models["llama"], "dpo", beta=beta, label_smoothing=eps))
    objective.bind(ours, tok, None)
    rows = tokenize_pairs(PAIRS, data_cfg(), tok, causal=True, bad=BadRows("error"))
    step, our_grads = ours_step(objective, ours, PairCollator(tok.pad_token_id)(rows))
    twin.zero_grad(set_to_none=True)
    losses = []
    for i in range(len(PAIRS)):
        loss = trainer.compute_loss(twin, trainer.data_collator([trainer.train_dataset[i]])) / len(PAIRS)
        loss.backward()
        losses.append(loss.item())
    assert abs(step.loss.item() - sum(losses)) <= TOL
    assert_same_grads(our_grads, grads_of(twin, "base_model."))
    # and the smoothing does something: the unsmoothed loss differs
    plain = make_objective(recipe_for(models["llama"], "dpo", beta=beta))
    plain.bind(ours, tok, None)
    with torch.no_grad():
        assert abs(plain(ours, PairCollator(tok.pad_token_id)(rows)).loss.item() - step.loss.item()) > 1e-3


def test_orpo_loss_metrics_and_gradients_equal_trl(models, dpo_pair, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    ours, folder = dpo_pair
    twin = peft_twin(ours, models["llama"], tmp_path / "adapter", AutoModelForCausalLM)  # no reference in ORPO
    tok = models["llama_tok"]
    lam = 0.25
    args = ORPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=64, beta=lam)
    trainer = ORPOTrainer(model=twin, args=args, processing_class=tok, train_dataset=Dataset.from_list(PAIRS))
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    theirs_batch = trainer.data_collator(examples)
    # trl tokenises the rendered prompt (with a BOS) and answers itself: the same rows go through our collator
    rows = [{k: ex[k] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
            for ex in examples]
    batch = PairCollator(tok.pad_token_id)(rows)
    joined = trainer.concatenated_inputs(theirs_batch, padding_value=tok.pad_token_id)
    assert torch.equal(batch["input_ids"], joined["concatenated_input_ids"])
    assert torch.equal(batch["labels"], joined["concatenated_labels"])
    assert examples[0]["chosen_input_ids"][0] == tok.bos_token_id

    objective = make_objective(recipe_for(models["llama"], "orpo", beta=lam))
    objective.bind(ours, tok, None)
    step, our_grads = ours_step(objective, ours, batch)
    loss, their_grads = trl_step(trainer, twin, theirs_batch)
    assert abs(step.loss.item() - loss.item()) <= TOL, (step.loss.item(), loss.item())
    assert_same_grads(our_grads, their_grads)
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    for key in (*DPO_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert abs(step.metrics[key] - logged[key]) <= TOL, (key, step.metrics[key], logged[key])
    assert step.metrics["nll_loss"] > 1.0 and abs(step.metrics["log_odds_chosen"]) > 1e-3


@pytest.fixture(scope="module")
def reward_pair(models, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    ours = wrap(AutoModelForSequenceClassification.from_pretrained(models["bert"], num_labels=1), "SEQ_CLS", "lora",
                LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    assert any("classifier.modules_to_save" in n for n, p in ours.named_parameters() if p.requires_grad)
    twin = peft_twin(ours, models["bert"], tmp_path_factory.mktemp("rm_adapter") / "a",
                     AutoModelForSequenceClassification)
    return ours.train(), twin


@pytest.mark.parametrize("margins,recipe_margin", [(None, 0.0), ([0.5, 0.0, 1.5], 0.0), (None, 0.3)])
def test_reward_loss_metrics_and_gradients_equal_trl(models, reward_pair, tmp_path, margins, recipe_margin):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    ours, twin = reward_pair
    tok = models["bert_tok"]
    pairs = [dict(p, margin=m) for p, m in zip(PAIRS, margins)] if margins else PAIRS
    rows = tokenize_pairs(pairs, data_cfg(), tok, causal=False, bad=BadRows("error"))
    # trl reads them tokenised (chosen_ids / rejected_ids); a recipe-wide margin is its margin column
    column = margins or ([recipe_margin] * len(PAIRS) if recipe_margin else None)
    data = [{"chosen_ids": r["chosen_input_ids"], "rejected_ids": r["rejected_input_ids"]} for r in rows]
    if column:
        data = [dict(d, margin=m) for d, m in zip(data, column)]
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=64)
    trainer = RewardTrainer(model=twin, args=args, processing_class=tok, train_dataset=Dataset.from_list(data))
    theirs_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    batch = PairCollator(tok.pad_token_id)(rows)
    assert torch.equal(batch["input_ids"], theirs_batch["input_ids"])
    assert torch.equal(batch["attention_mask"], theirs_batch["attention_mask"])
    assert ("margin" in batch) == bool(margins) and ("margin" in theirs_batch) == bool(column)

    objective = make_objective(recipe_for(models["bert"], "reward", task="SEQ_CLS", reward_margin=recipe_margin))
    objective.bind(ours, tok, None)
    step, our_grads = ours_step(objective, ours, batch)
    loss, their_grads = trl_step(trainer, twin, theirs_batch)
    assert abs(step.loss.item() - loss.item()) <= TOL, (step.loss.item(), loss.item())
    assert_same_grads(our_grads, their_grads)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in ("accuracy", "margin"):
        assert abs(step.metrics[key] - logged[key]) <= TOL, key
    mean = (step.metrics["rewards/chosen"] + step.metrics["rewards/rejected"]) / 2
    assert abs(mean - logged["mean_reward"]) <= TOL
    assert abs(step.metrics["margin"]) > 1e-3


# ================================================================== 4-6. real runs: dpo and reward, resume, 2 processes

TOPICS = ["cat", "dog", "tree", "river", "city", "music", "food", "rain", "sun", "moon", "stone", "sky"]
BAD_WORDS = ["bad", "wrong", "rude", "ugly", "lazy", "noise", "no", "green", "grass"]
GOOD = "a clear helpful reply"
TRAIN_PAIRS, EVAL_PAIRS = 32, 8
STEPS = 16  # 32 pairs / 4 a step, 2 epochs
# a reward model reads prompt + answer truncated from the left: the long prompt is no bad row there
REWARD_PAIRS, REWARD_STEPS = 33, 18


def toy_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"tell me about the {rng.choice(TOPICS)}", "chosen": GOOD,
             "rejected": " ".join(rng.sample(BAD_WORDS, 3))} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def recipe_file(root: Path, name: str, data: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(models):
    """The toy data (chosen is always the same good answer; three bad rows at the end of train) and the
    recipes of a DPO run on the tiny llama and a reward run on the tiny bert."""
    root = models["root"]
    write_jsonl(root / "data" / "train.jsonl", toy_pairs(TRAIN_PAIRS, 0) + BAD)
    write_jsonl(root / "data" / "validation.jsonl", toy_pairs(EVAL_PAIRS, 1))
    training = {"num_epochs": 2, "batch_size": 4, "learning_rate": 0.02, "seed": 3, "logging_steps": 1,
                "progress_bar": False, "save_steps": 2, "keep_last_n": 2}
    dpo = {
        "model": {"name_or_path": str(models["llama"]), "task_type": "CAUSAL_LM"},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "data": {"path": str(root / "data"), "format": "preference", "max_length": 48},
        "training": {"objective": "dpo", **training},
        "preference": {"beta": 0.1},
        "output_dir": str(root / "dpo"),
    }
    reward = {
        "model": {"name_or_path": str(models["bert"]), "task_type": "SEQ_CLS"},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {"path": str(root / "data"), "format": "preference", "max_length": 48},
        "training": {"objective": "reward", **training, "learning_rate": 0.05},
        "output_dir": str(root / "reward"),
    }
    return {"root": root, "dpo": dpo, "reward": reward}


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if "mem" not in k.lower()} for row in rows]


@pytest.fixture(scope="module")
def dpo_run(runs):
    path = recipe_file(runs["root"], "dpo", runs["dpo"])
    proc = run_cli("train", str(path), env=ONE_THREAD_ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return path, Path(runs["dpo"]["output_dir"]), proc


def pair_logps(model, tok, recipe, split):
    """Per pair: (policy chosen, policy rejected, reference chosen, reference rejected) answer log-probs."""
    from peftrun.data import load_splits

    splits = load_splits(recipe.data, recipe.training.seed)
    rows = tokenize_pairs(getattr(splits, split), recipe.data, tok, causal=True, bad=BadRows("drop"))
    batch = PairCollator(tok.pad_token_id)(rows)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    with torch.no_grad():
        logps, _ = sequence_logps(model, model.model, batch["labels"], chunked=False, **inputs)
        with model.disable_adapters():
            ref, _ = sequence_logps(model, model.model, batch["labels"], chunked=False, **inputs)
    n = len(rows)
    return logps[:n], logps[n:], ref[:n], ref[n:]


def test_dpo_trains_logs_trl_metrics_and_the_saved_adapter_reproduces_them(dpo_run):
    from peftrun.io.loading import load_adapted
    from peftrun.recipe import load_recipe

    path, out, proc = dpo_run
    assert ("train: dropped 3 row(s): 1 with identical chosen and rejected answers, 1 with a prompt longer than "
            "data.max_length (48 tokens), 1 with an empty answer") in proc.stdout
    assert f"preference pairs: {TRAIN_PAIRS} train, {EVAL_PAIRS} eval" in proc.stdout
    rows = records(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        assert set(DPO_METRICS) <= r.keys()
    # step 1 is scored before any update: LoRA's B starts at zero, the policy is the reference
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/margins"] == 0.0 and steps[0]["rewards/accuracies"] == 0.0
    epochs = [r for r in rows if "eval_loss" in r]
    assert len(epochs) == 2
    for r in epochs:
        assert {f"eval_{k}" for k in DPO_METRICS} <= r.keys()
    margins = [r["eval_rewards/margins"] for r in epochs]
    assert 0.0 < margins[0] < margins[1]  # from 0 before training, rising
    assert epochs[-1]["eval_rewards/accuracies"] == 1.0
    assert epochs[-1]["eval_loss"] < math.log(2) - 0.05

    model, tok = load_adapted(out)
    pc, pr, rc, rr = pair_logps(model, tok, load_recipe(path), "eval")
    last, beta = epochs[-1], 0.1
    assert abs(pc.mean().item() - last["eval_logps/chosen"]) <= TOL
    assert abs(pr.mean().item() - last["eval_logps/rejected"]) <= TOL
    assert abs((beta * ((pc - rc) - (pr - rr))).mean().item() - last["eval_rewards/margins"]) <= TOL
    assert abs((beta * (pc - rc)).mean().item() - last["eval_rewards/chosen"]) <= TOL


def test_bad_rows_error_exits_2_with_one_line(runs):
    path = recipe_file(runs["root"], "dpo_strict", {**runs["dpo"], "output_dir": str(runs["root"] / "strict")})
    proc = run_cli("train", str(path), "--set", "data.bad_rows=error", env=ONE_THREAD_ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: data: row {TRAIN_PAIRS}: with identical chosen and rejected answers "
        "(hint: fix the row, or set data.bad_rows: drop)"
    ]
    assert not (runs["root"] / "strict" / "adapter_model.safetensors").exists()


def reward_scores(model, tok, recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of the eval pairs."""
    from peftrun.data import load_splits

    pairs = tokenize_pairs(load_splits(recipe.data, recipe.training.seed).eval, recipe.data, tok, causal=False,
                           bad=BadRows("drop"))
    batch = PairCollator(tok.pad_token_id)(pairs)
    with torch.no_grad():
        scores = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    return scores[: len(pairs)], scores[len(pairs):]


def test_reward_model_trains_and_reloads(runs, models):
    from transformers import AutoModelForSequenceClassification

    from peftrun.io.loading import load_adapted
    from peftrun.recipe import load_recipe

    path = recipe_file(runs["root"], "reward", runs["reward"])
    recipe = load_recipe(path)
    # before training the adapted model is the base (LoRA's B is zero; the head starts as the base's own)
    base = AutoModelForSequenceClassification.from_pretrained(models["bert"], num_labels=1)
    chosen, rejected = reward_scores(base, models["bert_tok"], recipe)
    before_accuracy, before_margin = (chosen > rejected).float().mean().item(), (chosen - rejected).mean().item()

    proc = run_cli("train", str(path), env=ONE_THREAD_ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert ("train: dropped 2 row(s): 1 with identical chosen and rejected answers, 1 with an empty answer"
            in proc.stdout)
    assert f"preference pairs: {REWARD_PAIRS} train, {EVAL_PAIRS} eval" in proc.stdout
    out = Path(runs["reward"]["output_dir"])
    rows = records(out)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == REWARD_STEPS
    assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= steps[0].keys()
    epochs = [r for r in rows if "eval_loss" in r]
    assert {"eval_accuracy", "eval_margin", "eval_rewards/chosen", "eval_rewards/rejected"} <= epochs[0].keys()
    # pairwise accuracy and margin rise from the base's
    margins = [before_margin] + [r["eval_margin"] for r in epochs]
    assert margins == sorted(margins) and margins[-1] > before_margin + 0.5, margins
    assert epochs[-1]["eval_accuracy"] == 1.0 and before_accuracy < 1.0
    assert epochs[-1]["eval_loss"] < math.log(2) - 0.2

    model, tok = load_adapted(out)
    assert model.model.config.num_labels == 1
    chosen, rejected = reward_scores(model, tok, recipe)
    assert abs((chosen - rejected).mean().item() - epochs[-1]["eval_margin"]) <= TOL
    assert (chosen > rejected).float().mean().item() == epochs[-1]["eval_accuracy"]
    assert abs(chosen.mean().item() - epochs[-1]["eval_rewards/chosen"]) <= TOL


def adapter_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) >= 8
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_dpo_resume_after_a_kill_equals_the_uninterrupted_run(runs, dpo_run):
    _, reference, _ = dpo_run
    out = runs["root"] / "dpo_killed"
    path = recipe_file(runs["root"], "dpo_killed", {**runs["dpo"], "output_dir": str(out)})
    killed = run_cli("train", str(path), env=fault_env("after_step:11:kill", ONE_THREAD_ENV))
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000008", "step-000010"]
    done = run_cli("train", str(path), "--resume", env=ONE_THREAD_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and "step-000010" in done.stdout
    assert adapter_diff(out, reference) <= 1e-6
    got, want = records(out), records(reference)
    assert [r.get("step") for r in got] == [r.get("step") for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_dpo_on_two_processes_equals_one_process(runs, dpo_run):
    from test_distributed import launch_env, peftrun_launch

    path, single, _ = dpo_run
    out = runs["root"] / "dpo_ddp"
    result = peftrun_launch(path, "distributed.num_processes=2", "training.batch_size=2", f"output_dir={out}",
                            env=launch_env(**ONE_THREAD_ENV), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    spread = [r for r in records(out) if "adapter_rank_max_diff" in r]
    assert spread == [{"step": STEPS, "ranks": 2, "adapter_rank_max_diff": 0.0}]  # both ranks end identical
    worst = adapter_diff(out, single)
    # two half-batch means against one mean: the same sums in another float32 order, carried through 16 Adam
    # steps (measured: 9.5e-7)
    assert worst <= 1e-5, worst
    last_ddp = [r for r in records(out) if "eval_loss" in r][-1]
    last_single = [r for r in records(single) if "eval_loss" in r][-1]
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen"):
        assert last_ddp[key] == pytest.approx(last_single[key], abs=1e-4), key
