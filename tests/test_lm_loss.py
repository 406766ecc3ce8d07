"""The chunked causal-LM loss (peftrun.lm_loss) equals transformers' loss and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftrun import lm_loss
from peftrun.adapted import wrap
from peftrun.methods.lora import LoraConfig
from tests.tiny import ARCH_CONFIGS, tiny_model


def lora_model(model_type: str):
    model = wrap(
        tiny_model(model_type, "CAUSAL_LM"),
        "CAUSAL_LM",
        "lora",
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    with torch.no_grad():  # B away from zero, so that the gradients of A are not all zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def batch(prompt_masked: bool = True, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    if prompt_masked:
        labels[:, :4] = -100  # the prompt part is not trained on
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, inputs, chunked: bool):
    model.chunked_loss = chunked
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks in both runs (gpt2, opt and phi train with dropout)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("model_type", sorted(lm_loss.MODEL_TYPES))
def test_chunked_loss_equals_transformers_loss_and_gradients(model_type, monkeypatch):
    assert model_type in ARCH_CONFIGS, "every listed model type is checked here"
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 128 * 5)  # five rows a chunk: several chunks per batch
    monkeypatch.setattr(lm_loss, "MIN_CHUNK_ROWS", 1)
    model = lora_model(model_type)
    inputs = batch()
    assert lm_loss.applies(model.model, inputs)
    plain, plain_grads = loss_and_grads(model, inputs, chunked=False)
    chunked, chunked_grads = loss_and_grads(model, inputs, chunked=True)
    assert plain.logits is not None and chunked.logits is None  # the full logits are never built
    assert abs(chunked.loss.item() - plain.loss.item()) <= 1e-6 * max(1.0, plain.loss.item())
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) > 4
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        assert (chunked_grads[name] - grad).abs().max().item() <= 1e-5, name


def test_num_items_in_batch_and_unmasked_labels_match_transformers():
    model = lora_model("llama")
    inputs = {**batch(prompt_masked=False), "num_items_in_batch": torch.tensor(17)}
    plain, plain_grads = loss_and_grads(model, inputs, chunked=False)
    chunked, chunked_grads = loss_and_grads(model, inputs, chunked=True)
    assert abs(chunked.loss.item() - plain.loss.item()) <= 1e-6 * plain.loss.item()
    for name, grad in plain_grads.items():
        assert (chunked_grads[name] - grad).abs().max().item() <= 1e-5, name


def test_trainable_head_with_bias_gets_the_same_gradients():
    torch.manual_seed(0)
    head = nn.Linear(16, 50)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    targets[0, :3] = -100
    reference = nn.functional.cross_entropy(
        head(hidden).flatten(0, 1).float(), targets.flatten(), ignore_index=-100
    )
    ref = torch.autograd.grad(reference * 3.0, (hidden, head.weight, head.bias))
    loss = lm_loss.chunked_loss(hidden, head, targets)
    got = torch.autograd.grad(loss * 3.0, (hidden, head.weight, head.bias))
    assert abs(loss.item() - reference.item()) <= 1e-6
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() <= 1e-6


def test_bf16_base_matches_transformers_in_bf16():
    model = lora_model("llama")
    model.model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters stay fp32 over a bf16 base, as peftrun trains them
    inputs = batch()
    plain, plain_grads = loss_and_grads(model, inputs, chunked=False)
    chunked, chunked_grads = loss_and_grads(model, inputs, chunked=True)
    assert abs(chunked.loss.item() - plain.loss.item()) <= 2e-2
    for name, grad in plain_grads.items():
        scale = grad.abs().max().item()
        assert (chunked_grads[name] - grad).abs().max().item() <= 2e-2 * scale, name


def test_autocast_bf16_matches_transformers_under_autocast():
    """training.mixed_precision: bf16 runs the forward under CPU autocast: the head's matmul in bf16."""
    model = lora_model("llama")
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_grads(model, inputs, chunked=False)
        chunked, chunked_grads = loss_and_grads(model, inputs, chunked=True)
    assert chunked.loss.dtype == torch.float32
    assert abs(chunked.loss.item() - plain.loss.item()) <= 1e-3 * plain.loss.item()
    for name, grad in plain_grads.items():
        assert chunked_grads[name].dtype == grad.dtype == torch.float32
        assert (chunked_grads[name] - grad).abs().max().item() <= 2e-2 * grad.abs().max().item(), name


def test_the_model_runs_as_it_is_where_the_chunked_loss_does_not_apply():
    model = lora_model("llama")
    inputs = batch()
    model.eval()
    assert model(**inputs).logits is not None  # eval: logits for metrics
    model.train()
    with torch.no_grad():
        assert model(**inputs).logits is not None
    assert model(input_ids=inputs["input_ids"]).loss is None  # no labels, no loss
    assert not lm_loss.applies(model.model, {"labels": None})
    softcapped = tiny_model("llama", "CAUSAL_LM")
    softcapped.config.final_logit_softcapping = 30.0
    assert not lm_loss.applies(softcapped.train(), inputs)
    head_saved = wrap(
        tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", "lora", LoraConfig(r=4, modules_to_save=["lm_head"])
    )
    # a trained copy of the head (modules_to_save) is not a plain Linear
    assert not lm_loss.applies(head_saved.model.train(), inputs)


def soft_prompt_config(name: str):
    from peftrun.methods.prefix_tuning import PrefixTuningConfig
    from peftrun.methods.prompt_tuning import PromptTuningConfig

    return {"prompt_tuning": PromptTuningConfig, "prefix_tuning": PrefixTuningConfig}[name](
        num_virtual_tokens=3
    )


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_soft_prompts_take_the_chunked_loss_too(method):
    model = wrap(tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", method, soft_prompt_config(method)).train()
    inputs = batch()
    plain, plain_grads = loss_and_grads(model, inputs, chunked=False)
    chunked, chunked_grads = loss_and_grads(model, inputs, chunked=True)
    assert chunked.logits is None
    assert abs(chunked.loss.item() - plain.loss.item()) <= 1e-6 * plain.loss.item()
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0
        assert (chunked_grads[name] - grad).abs().max().item() <= 1e-5, name


def test_every_step_of_a_training_run_matches_transformers():
    """20 AdamW steps at lr 3e-2 (the curve of tests/test_fastpath.py): at each step both losses see the same
    weights, so rounding does not compound; the run follows transformers' gradients and still learns."""
    model = lora_model("llama")
    model.model.config.attention_dropout = 0.0
    inputs = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(20):
        chunked, chunked_grads = loss_and_grads(model, inputs, chunked=True)
        plain, plain_grads = loss_and_grads(model, inputs, chunked=False)
        assert abs(chunked.loss.item() - plain.loss.item()) <= 1e-6 * plain.loss.item()
        for name, grad in plain_grads.items():
            assert (chunked_grads[name] - grad).abs().max().item() <= 1e-5, name
        opt.step()
        losses.append(plain.loss.item())
    assert losses[-1] < 0.95 * losses[0]


def test_a_batch_with_no_counted_token_gives_zero_loss_and_no_gradient():
    torch.manual_seed(0)
    head = nn.Linear(16, 50)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    loss = lm_loss.chunked_loss(hidden, head, torch.full((2, 5), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().max().item() == 0.0


# ------------------------------------------------------------------ seq2seq LMs


def seq2seq_base(model_type: str):
    """A tiny model of the family with what the chunked loss must not lose made visible: an untied head where
    the real checkpoints have one (mT5/umT5: mt0, T0), a nonzero final_logits_bias (BART, mBART)."""
    from peftrun.models import untie_if_needed

    model = tiny_model(model_type, "SEQ_2_SEQ_LM")
    untie_if_needed(model, ARCH_CONFIGS[model_type].get("tie_word_embeddings", True))
    if hasattr(model, "final_logits_bias"):
        model.final_logits_bias.normal_(0, 1.0)
    return model


def seq2seq_lora(base, model_type: str = "t5", config=None):
    model = wrap(base, "SEQ_2_SEQ_LM", "lora", config or LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def seq2seq_batch(vocab: int, seed: int = 3, source: int = 11, target: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, source), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = torch.randint(4, vocab, (3, target), generator=g)
    labels[2, 4:] = -100  # a shorter target, padded
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def assert_same(plain, plain_grads, chunked, chunked_grads, count: int = 4):
    assert plain.logits is not None and chunked.logits is None  # the full logits are never built
    assert abs(chunked.loss.item() - plain.loss.item()) <= 1e-6 * max(1.0, plain.loss.item())
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) >= count
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        assert (chunked_grads[name] - grad).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("model_type", sorted(lm_loss.SEQ2SEQ_MODEL_TYPES))
def test_seq2seq_chunked_loss_equals_transformers_loss_and_gradients(model_type, monkeypatch):
    assert model_type in ARCH_CONFIGS, "every listed model type is checked here"
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", ARCH_CONFIGS[model_type]["vocab_size"] * 5)  # 5 rows a chunk
    monkeypatch.setattr(lm_loss, "MIN_CHUNK_ROWS", 1)
    model = seq2seq_lora(seq2seq_base(model_type))
    inputs = seq2seq_batch(model.model.config.vocab_size)
    assert lm_loss.applies(model.model, inputs, seq2seq=True)
    plain, plain_grads = loss_and_grads(model, inputs, chunked=False)
    chunked, chunked_grads = loss_and_grads(model, inputs, chunked=True)
    assert_same(plain, plain_grads, chunked, chunked_grads)


def test_t5_without_the_output_scaling_and_with_decoder_inputs_given():
    """T5 scales the decoder's output by d_model**-0.5 before a head tied to the embedding, not before an untied
    one (transformers 5: config.scale_decoder_outputs); decoder inputs the caller gives are kept."""
    base = tiny_model("t5", "SEQ_2_SEQ_LM", tie_word_embeddings=False)
    assert base.config.scale_decoder_outputs is False
    model = seq2seq_lora(base)
    inputs = seq2seq_batch(384)
    inputs["decoder_input_ids"] = torch.randint(4, 384, inputs["labels"].shape, generator=torch.Generator().manual_seed(9))
    inputs["decoder_attention_mask"] = (inputs["labels"] != -100).long()
    plain, plain_grads = loss_and_grads(model, inputs, chunked=False)
    chunked, chunked_grads = loss_and_grads(model, inputs, chunked=True)
    assert_same(plain, plain_grads, chunked, chunked_grads)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_seq2seq_full_fine_tuning_trains_the_tied_head_and_the_embedding_alike(model_type):
    """Every weight trainable: the head (tied to the embedding in both families) gets its gradient from the
    chunks, added to the embedding's own."""
    base = seq2seq_base(model_type).train()
    inputs = seq2seq_batch(base.config.vocab_size)

    def run(chunked: bool):
        base.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = lm_loss.seq2seq_lm_forward(base, **inputs) if chunked else base(**inputs)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in base.named_parameters() if p.grad is not None}

    assert lm_loss.applies(base, inputs, seq2seq=True)
    plain, plain_grads = run(False)
    chunked, chunked_grads = run(True)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    assert_same(plain, plain_grads, chunked, chunked_grads, count=20)


def test_bundled_t5_small_and_mt0_large_shapes(monkeypatch):
    """t5-small as bundled (random weights), and mt0-large's architecture (mT5, gated-gelu, untied head,
    its 250,112-token vocabulary) at two layers of width 64: many chunks of a large vocabulary."""
    from peftrun.models import build_from_config

    torch.manual_seed(0)
    t5 = build_from_config("t5-small", "SEQ_2_SEQ_LM")
    mt0 = build_from_config(
        "bigscience/mt0-large",
        "SEQ_2_SEQ_LM",
        overrides=dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2),
    )
    assert mt0.config.vocab_size == 250112 and mt0.lm_head.weight is not mt0.shared.weight
    for base, rows in ((t5, 64), (mt0, 8)):
        monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", base.config.vocab_size * rows)
        monkeypatch.setattr(lm_loss, "MIN_CHUNK_ROWS", 1)
        model = seq2seq_lora(base, config=LoraConfig(r=8, lora_alpha=16))
        inputs = seq2seq_batch(base.config.vocab_size, source=16, target=12)
        plain, plain_grads = loss_and_grads(model, inputs, chunked=False)
        chunked, chunked_grads = loss_and_grads(model, inputs, chunked=True)
        assert_same(plain, plain_grads, chunked, chunked_grads)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "multitask_prompt_tuning"])
def test_seq2seq_soft_prompts_take_the_chunked_loss_too(method):
    from peftrun.methods import get_method

    config = (
        soft_prompt_config(method)
        if method != "multitask_prompt_tuning"
        else get_method(method).Config(num_virtual_tokens=3, num_tasks=2)
    )
    model = wrap(tiny_model("t5", "SEQ_2_SEQ_LM"), "SEQ_2_SEQ_LM", method, config).train()
    inputs = seq2seq_batch(384)
    if method == "multitask_prompt_tuning":
        inputs["task_ids"] = torch.tensor([0, 1, 0])
    plain, plain_grads = loss_and_grads(model, inputs, chunked=False)
    chunked, chunked_grads = loss_and_grads(model, inputs, chunked=True)
    assert_same(plain, plain_grads, chunked, chunked_grads, count=1)


def test_seq2seq_runs_as_it_is_where_the_chunked_loss_does_not_apply():
    model = seq2seq_lora(seq2seq_base("t5"))
    inputs = seq2seq_batch(384)
    model.eval()
    assert model(**inputs).logits is not None  # eval: logits for metrics
    model.train()
    with torch.no_grad():
        assert model(**inputs).logits is not None
    decoder = {"decoder_input_ids": inputs["labels"].clamp(min=0)}
    assert model(input_ids=inputs["input_ids"], **decoder).loss is None  # no labels, no loss
    assert model(**inputs, return_dict=False)[0].dim() == 0  # tuples as transformers returns them
    assert not lm_loss.applies(model.model, {**inputs, "return_dict": False}, seq2seq=True)
    # a seq2seq family not checked here (pegasus), and a trained copy of the head: transformers' loss
    pegasus = tiny_model(
        "bart", "SEQ_2_SEQ_LM", model_type="pegasus", decoder_start_token_id=0
    ).train()
    assert pegasus.config.model_type == "pegasus" and not lm_loss.applies(pegasus, inputs, seq2seq=True)
    head_saved = wrap(
        tiny_model("t5", "SEQ_2_SEQ_LM"), "SEQ_2_SEQ_LM", "lora", LoraConfig(r=4, modules_to_save=["lm_head"])
    ).train()
    assert not lm_loss.applies(head_saved.model, inputs, seq2seq=True)
    assert head_saved(**inputs).logits is not None
    # a causal model type is not a seq2seq one, nor the other way round
    assert not lm_loss.applies(tiny_model("llama", "CAUSAL_LM").train(), inputs, seq2seq=True)
    assert not lm_loss.applies(model.model, inputs)


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_2_SEQ_LM"])
def test_evaluation_reads_the_loss_without_the_full_logits(task, monkeypatch):
    """peftrun.evaluate on an LM: each held-out batch's loss through the chunks (no logits built), equal to the
    loss from transformers' full logits; a plain forward in eval mode still returns logits."""
    from peftrun.evaluate import evaluate
    from peftrun.recipe import DataSection

    if task == "CAUSAL_LM":
        model, inputs = lora_model("llama"), batch()
    else:
        model = seq2seq_lora(seq2seq_base("t5"))
        inputs = seq2seq_batch(model.model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        plain = model(**inputs)
        with model.reading_loss_only():
            chunked = model(**inputs)
    assert plain.logits is not None and chunked.logits is None
    assert abs(chunked.loss.item() - plain.loss.item()) <= 1e-6 * max(1.0, plain.loss.item())
    assert model(**inputs).logits is not None and not model.loss_only  # only within the block

    name = "causal_lm_forward" if task == "CAUSAL_LM" else "seq2seq_lm_forward"
    real, outputs = getattr(lm_loss, name), []
    monkeypatch.setattr(lm_loss, name, lambda *a, **kw: outputs.append(real(*a, **kw)) or outputs[-1])
    tokenizer = type("Tokenizer", (), {"eos_token_id": 2})()
    result = evaluate(model, [inputs], task_type=task, tokenizer=tokenizer, label_names=None,
                      data_cfg=DataSection(path="unused"), generate=False)
    assert len(outputs) == 1 and outputs[0].logits is None  # the batch went through the chunks
    assert result.metrics["eval_loss"] == pytest.approx(plain.loss.item(), rel=1e-6)
