"""Mixed-adapter batches: one forward where each row names its adapter (or None: the base) equals the rows
run separately, for LoRA layers and for modules_to_save heads, in forward passes and in generate."""

from __future__ import annotations

import pytest
import torch
from adapter_kit import logits, save_lm, save_lora

import peftrun
from peftrun.errors import PeftrunError
from peftrun.generation import GenerationOptions, generate_texts
from peftrun.methods.layers import rows_for_batch


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_causal")
    base = save_lm(root / "base")
    a = save_lora(base, root / "a", seed=1)
    b = save_lora(base, root / "b", seed=2, r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    return peftrun.load(adapters={"a": a, "b": b}, device="cpu")


def one_row_each(model, batch, names):
    rows = []
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        if name is None:
            with model.disable_adapters():
                rows.append(logits(model, row))
        else:
            model.set_adapter(name)
            rows.append(logits(model, row))
    model.set_adapter("a")
    return torch.cat(rows)


def test_lora_mixed_batch_equals_rows_run_separately(causal):
    names = ["a", "b", None, "a", "b"]
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, 384, (5, 9), generator=gen)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with causal.row_adapters(names):
        mixed = logits(causal, batch)
    separate = one_row_each(causal, batch, names)
    assert (mixed - separate).abs().max().item() <= 1e-5
    # and the rows really differ by adapter: the same input through a, b and the base gives three answers
    same = {k: v[:1].repeat(3, 1) for k, v in batch.items()}
    with causal.row_adapters(["a", "b", None]):
        out = logits(causal, same)
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[0] - out[2]).abs().max() > 1e-3
    # after the block every layer is back to the active adapter alone
    assert all(layer.row_adapters is None for layer in causal.adapter_modules())


def test_mixed_generate_equals_each_row_alone(causal):
    tok = causal.tokenizer
    prompts = ["abcdef", "uvwxyz", "klmnop"]  # one length: no padding, so rows are comparable bit for bit
    names = ["b", None, "a"]
    options = GenerationOptions(max_new_tokens=6)
    mixed = generate_texts(causal, tok, prompts, names, options)
    alone = [generate_texts(causal, tok, [p], [n], options)[0] for p, n in zip(prompts, names)]
    assert mixed == alone
    assert causal.active_adapter == "a" and not causal._disabled


def test_rows_repeat_for_beams_and_refuse_other_sizes():
    assert rows_for_batch(["a", None], 4) == ["a", "a", None, None]
    assert rows_for_batch(["a", None], 2) == ["a", None]
    with pytest.raises(PeftrunError, match="3 rows was given adapter names for 2"):
        rows_for_batch(["a", None], 3)


def test_unknown_adapter_name_in_a_mixed_batch(causal):
    with pytest.raises(PeftrunError, match="no adapter named"), causal.row_adapters(["a", "zz"]):
        pass


def test_seq2seq_mixed_beam_search_equals_rows_alone(tmp_path):
    base = save_lm(tmp_path / "t5", "t5", "SEQ_2_SEQ_LM")
    a = save_lora(base, tmp_path / "a", "SEQ_2_SEQ_LM", seed=3)
    b = save_lora(base, tmp_path / "b", "SEQ_2_SEQ_LM", seed=4)
    model = peftrun.load(adapters={"a": a, "b": b}, device="cpu")
    prompts, names = ["translate", "summarise", "questions"], ["a", None, "b"]
    # beam search runs the encoder on 3 rows and the decoder on 3 x 2: both see their own adapters
    options = GenerationOptions(max_new_tokens=5, num_beams=2)
    mixed = generate_texts(model, model.tokenizer, prompts, names, options)
    alone = [generate_texts(model, model.tokenizer, [p], [n], options)[0] for p, n in zip(prompts, names)]
    assert mixed == alone


def test_modules_to_save_heads_per_row(tmp_path):
    base = save_lm(tmp_path / "bert", "bert", "SEQ_CLS")
    a = save_lora(base, tmp_path / "a", "SEQ_CLS", seed=5)
    b = save_lora(base, tmp_path / "b", "SEQ_CLS", seed=6)
    model = peftrun.load(adapters={"a": a, "b": b}, device="cpu")
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(3, 128, (4, 7), generator=gen)}
    names = ["b", "a", None, "b"]
    with model.row_adapters(names):
        mixed = logits(model, batch)
    separate = one_row_each(model, batch, names)
    assert mixed.shape == (4, 3)
    assert (mixed - separate).abs().max().item() <= 1e-5
    # each adapter has its own head: the same row through a and b gives different class scores
    with model.row_adapters(["a", "b"]):
        out = logits(model, {"input_ids": batch["input_ids"][:1].repeat(2, 1)})
    assert (out[0] - out[1]).abs().max() > 1e-2
