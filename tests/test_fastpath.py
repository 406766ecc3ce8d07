"""The LoRA fast path against the plain path: outputs and gradients with the same dropout mask; the mask's
hash against its reference and its statistics; what it saves for the backward; length-grouped batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_batch, tiny_model, train_losses
from tiny_text import one_thread  # noqa: F401  (a fixture)
from torch import nn

from peftrun.adapted import wrap
from peftrun.batching import LengthGroupedSampler
from peftrun.methods import lora_kernels as K
from peftrun.methods.lora import LoraConfig, LoraLayer

KEYS = (2 * 123456789 + 1, 987654321)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, relative to b's largest magnitude where that exceeds one (fp32 rounding)."""
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


# ------------------------------------------------------------------ the mask


@pytest.mark.parametrize("shape", [(3, 5), (37, 53), (1, 1000)])
def test_mask_matches_its_reference_hash(shape):
    rows, cols = shape
    keys = (2 * 0x7FFFFFFF + 1, (1 << 31) - 5)  # large keys: every product wraps around 2^32
    mult = K.dropout_multiplier(rows, cols, 0.3, keys)
    ref = torch.tensor([K.reference_multiplier(i, 0.3, keys) for i in range(rows * cols)]).view(rows, cols)
    assert mult.dtype == torch.float32
    assert torch.equal(mult, ref)
    assert all(v == 0.0 or v == pytest.approx(1 / 0.7) for v in mult.unique().tolist())


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_keep_rate_and_independence(p):
    rows, cols = 256, 384
    n = rows * cols
    torch.manual_seed(0)
    masks = [(K.dropout_multiplier(rows, cols, p, K.draw_keys()) > 0).flatten().float() for _ in range(4)]
    for m in masks:
        # the keep rate within 4.5 standard deviations of a Bernoulli(1 - p) sample
        assert abs(m.mean().item() - (1 - p)) < 4.5 * math.sqrt(p * (1 - p) / n)
    bound = 4.5 / math.sqrt(n)  # |correlation| of independent masks, 4.5 sigma

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    for lag in (1, cols, 1 << 12, 1 << 15):
        assert abs(corr(masks[0][:-lag], masks[0][lag:])) < bound
    assert abs(corr(masks[0], masks[1])) < bound


@pytest.mark.parametrize("p", [0.02, 0.1, 0.25])
def test_dropped_positions_match_their_reference(p):
    """On CPU up to POSITIONS_MAX_P the mask is drawn as the positions of the dropped elements."""
    keys = (2 * 0x7FFFFFFF + 1, (1 << 31) - 5)
    assert K.by_positions(torch.device("cpu"), 37 * 53, p) and not K.by_positions(torch.device("meta"), 10, p)
    positions = K.dropped_positions(37 * 53, p, keys)
    assert positions.tolist() == K.reference_dropped(37 * 53, p, keys)
    mult = K.dropout_multiplier(37, 53, p, keys)
    assert (mult.flatten() == 0).nonzero().squeeze(1).tolist() == positions.tolist()
    assert set(mult.unique().tolist()) == {0.0, torch.tensor(1 / (1 - p)).item()}
    assert K.dropped_positions(5, 0.2, keys).tolist() == K.reference_dropped(5, 0.2, keys)


def test_dropped_positions_draw_more_gaps_where_the_first_batch_falls_short(monkeypatch):
    keys = (2 * 987654321 + 1, 12345)
    expected = K.reference_dropped(2000, 0.1, keys)
    monkeypatch.setattr(K, "_SIGMAS", -3.0)  # a first batch of gaps well short of the 2000 elements
    monkeypatch.setattr(K, "_EXTRA_GAPS", 0)
    assert K.dropped_positions(2000, 0.1, keys).tolist() == expected and len(expected) > 150


def test_positions_and_dense_masks_keep_every_element_alike():
    """Over many keys each element is dropped with probability p in both forms, and the dense one (GPUs, p
    above POSITIONS_MAX_P) is what the positions form would be in distribution."""
    torch.manual_seed(1)
    rows, cols, p, n = 4, 25, 0.1, 4000
    for draw in (lambda k: K.dropout_multiplier(rows, cols, p, k), lambda k: K._multiplier(K.dropout_keep(rows, cols, p, k), p)):
        dropped = torch.stack([(draw(K.draw_keys()) == 0).flatten().float() for _ in range(n)])
        rate = dropped.mean(0)  # per element, over n independent masks
        assert (rate - p).abs().max() < 4.5 * math.sqrt(p * (1 - p) / n) * 1.5
        counts = dropped.sum(1)  # dropped per mask: Binomial(100, p)
        assert abs(counts.mean().item() - rows * cols * p) < 0.2 and abs(counts.var().item() - rows * cols * p * (1 - p)) < 1.0


def test_mask_is_a_function_of_keys_and_shape():
    a = K.dropout_multiplier(64, 96, 0.1, KEYS)
    assert torch.equal(a, K.dropout_multiplier(64, 96, 0.1, KEYS))
    assert not torch.equal(a, K.dropout_multiplier(64, 96, 0.1, (KEYS[0] + 2, KEYS[1])))
    torch.manual_seed(3)
    first = K.draw_keys()
    torch.manual_seed(3)
    assert K.draw_keys() == first and first[0] % 2 == 1


# ------------------------------------------------------------------ the functions against plain autograd


def _plain(x, weight, bias, a, b, s, mult):
    xd = x if mult is None else x * mult.view(x.shape)
    return F.linear(x, weight, bias) + F.linear(F.linear(xd, a), b) * s


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_linear_equals_plain_path(p, with_bias):
    torch.manual_seed(0)
    n_in, n_out, r = 24, 40, 4
    x0 = torch.randn(3, 7, n_in)
    # magnitudes of a trained layer: outputs of order one, where 1e-5 is fp32's rounding and no more
    weight, bias = torch.randn(n_out, n_in) / n_in**0.5, (torch.randn(n_out) if with_bias else None)
    a0, b0 = torch.randn(r, n_in) / n_in**0.5, torch.randn(n_out, r) / r**0.5
    grad = torch.randn(3, 7, n_out)
    mult = K.dropout_multiplier(21, n_in, p, KEYS) if p else None

    x, a, b = _leaves(x0, a0, b0)
    fast = K.lora_linear(x, weight, bias, a, b, 1.7, p, KEYS if p else None)
    fast.backward(grad)
    xr, ar, br = _leaves(x0, a0, b0)
    ref = _plain(xr, weight, bias, ar, br, 1.7, mult)
    ref.backward(grad)
    assert max_diff(fast, ref) <= 1e-5
    for mine, theirs in ((x, xr), (a, ar), (b, br)):
        assert max_diff(mine.grad, theirs.grad) <= 1e-5
    with torch.no_grad():  # the inference branch computes the same
        assert max_diff(K.lora_linear(x0, weight, bias, a0, b0, 1.7, p, KEYS if p else None), ref) <= 1e-5


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_update_equals_plain_path(p):
    torch.manual_seed(1)
    x0, a0, b0 = torch.randn(5, 16), torch.randn(2, 16) / 4, torch.randn(12, 2) / 2
    result0, grad = torch.randn(5, 12), torch.randn(5, 12)
    mult = K.dropout_multiplier(5, 16, p, KEYS) if p else None
    x, a, b, result = _leaves(x0, a0, b0, result0)
    out = K.lora_update(x, result, a, b, 0.5, p, KEYS if p else None)
    out.backward(grad)
    xr, ar, br, rr = _leaves(x0, a0, b0, result0)
    ref = rr + F.linear(F.linear(xr if mult is None else xr * mult, ar), br) * 0.5
    ref.backward(grad)
    assert max_diff(out, ref) <= 1e-5
    for mine, theirs in ((x, xr), (a, ar), (b, br), (result, rr)):
        assert max_diff(mine.grad, theirs.grad) <= 1e-5


def test_lora_update_keeps_the_result_dtype_without_saving_casts():
    """A bf16 base output with fp32 adapters: the update is cast at the end, as the plain path does."""
    torch.manual_seed(2)
    x0 = torch.randn(6, 16).to(torch.bfloat16)
    a0, b0, result0 = torch.randn(4, 16), torch.randn(8, 4), torch.randn(6, 8).to(torch.bfloat16)
    x, a, b = _leaves(x0, a0, b0)
    out = K.lora_update(x, result0, a, b, 2.0)
    out.float().sum().backward()
    xr, ar, br = _leaves(x0, a0, b0)
    ref = result0 + (F.linear(F.linear(xr.float(), ar), br) * 2.0).to(torch.bfloat16)
    ref.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    assert max_diff(a.grad, ar.grad) <= 1e-4 and max_diff(b.grad, br.grad) <= 1e-4


# ------------------------------------------------------------------ LoraLayer dispatch, whole models


def _layer(base: nn.Module, p: float, fast: bool, **extra) -> LoraLayer:
    torch.manual_seed(0)
    layer = LoraLayer(base, "q")
    layer.add_adapter(
        "default", LoraConfig(r=4, lora_alpha=8, lora_dropout=p, init_lora_weights=False, **extra)
    )
    layer.fast_path = fast
    return layer


def test_layer_with_dropout_uses_the_mask_the_keys_give(monkeypatch):
    monkeypatch.setattr(K, "draw_keys", lambda: KEYS)
    base = nn.Linear(12, 10).requires_grad_(False)
    layer = _layer(base, 0.25, fast=True).train()
    x = torch.randn(2, 5, 12, requires_grad=True)
    out = layer(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = _plain(x, base.weight, base.bias, a, b, 2.0, K.dropout_multiplier(10, 12, 0.25, KEYS))
    assert max_diff(out, ref) <= 1e-5
    layer.eval()  # no dropout in eval mode: the fast path then equals the plain one exactly
    assert max_diff(layer(x), _layer(base, 0.25, fast=False).eval()(x)) <= 1e-6


@pytest.mark.parametrize(
    "extra, base",
    [({"use_dora": True}, nn.Linear(12, 10)), ({}, nn.Linear(12, 10).to(torch.float64))],
    ids=["dora", "float64-base"],
)
def test_layers_the_fast_path_does_not_fit_still_compute_the_plain_result(extra, base):
    base.requires_grad_(False)
    x = torch.randn(3, 12, dtype=base.weight.dtype)
    fast, plain = _layer(base, 0.0, True, **extra), _layer(base, 0.0, False, **extra)
    assert max_diff(fast(x).double(), plain(x).double()) <= 1e-6


def test_autocast_runs_the_plain_path():
    base = nn.Linear(12, 10).requires_grad_(False)
    x = torch.randn(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _layer(base, 0.0, True)(x)
        ref = _layer(base, 0.0, False)(x)
    assert torch.equal(out, ref)


MODELS = [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS"), ("gpt2", "CAUSAL_LM")]


@pytest.mark.parametrize("arch, task", MODELS)
def test_models_train_the_same_on_both_paths(arch, task):
    """Loss and every trainable gradient, dropout 0, fast path against plain (gpt2's Conv1D: LoraUpdate)."""
    grads = {}
    for fast in (True, False):
        model = wrap(
            tiny_model(arch, task), task, "lora", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
        )
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.fast_path = fast
        model.train()
        batch = tiny_batch(model.model, task)
        batch["labels"] = batch["input_ids"] if task != "SEQ_CLS" else torch.tensor([0, 2])
        if task == "SEQ_2_SEQ_LM":
            batch["labels"] = batch.pop("decoder_input_ids")
        torch.manual_seed(5)  # the base model's own dropout draws the same masks on both paths
        loss = model(**batch).loss
        loss.backward()
        grads[fast] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert abs(grads[True][0] - grads[False][0]).item() <= 1e-5
    assert grads[True][1].keys() == grads[False][1].keys()
    for name, g in grads[True][1].items():
        assert max_diff(g, grads[False][1][name]) <= 1e-5, name


def test_mixed_adapter_batches_and_merge_agree_with_the_plain_path():
    torch.manual_seed(0)
    model = wrap(
        tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", "lora", LoraConfig(r=4, init_lora_weights=False)
    )
    batch = tiny_batch(model.model, "CAUSAL_LM", batch=3)
    with torch.no_grad():
        unmerged = model(**batch).logits
        with model.row_adapters(["default", None, "default"]):
            mixed = model(**batch).logits
        LoraLayer.fast_path = False
        try:
            plain = model(**batch).logits
        finally:
            LoraLayer.fast_path = K.ENABLED
        model.merge()
        merged = model(**batch).logits
    assert max_diff(unmerged, plain) <= 1e-5
    assert max_diff(unmerged, merged) <= 1e-5
    assert max_diff(mixed[[0, 2]], unmerged[[0, 2]]) <= 1e-5


def _saved_activation_bytes(model_fn) -> int:
    """Bytes of distinct non-parameter tensors autograd saves during model_fn()."""
    storages: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model_fn()
    return sum(storages.values())


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_q_and_v_keep_one_copy_of_their_input(p, monkeypatch):
    """q and v read the same x: the fast path keeps x once, and h (r×N) and with dropout the mask each (on
    CPU at p <= 0.25 the dropped positions, 4 bytes each: 0.4 bytes an element at p = 0.1; else one byte an
    element); the plain path keeps x's cast and dropped-out copies and masks per layer."""
    monkeypatch.setattr(K, "draw_keys", lambda: KEYS)
    n_tokens, hidden, r = 64, 48, 4
    q, v = nn.Linear(hidden, hidden).requires_grad_(False), nn.Linear(hidden, 16).requires_grad_(False)
    x = torch.randn(n_tokens, hidden, requires_grad=True)
    saved = {}
    for fast in (True, False):
        lq, lv = _layer(q, p, fast).train(), _layer(v, p, fast).train()
        saved[fast] = _saved_activation_bytes(lambda lq=lq, lv=lv: (lq(x) + lv(x).sum()).sum())
    x_bytes = n_tokens * hidden * 4
    mask_bytes = n_tokens * hidden if p else 0
    if 0 < p <= K.POSITIONS_MAX_P:
        mask_bytes = 4 * len(K.dropped_positions(n_tokens * hidden, p, KEYS))
        assert mask_bytes < 0.6 * n_tokens * hidden
    assert saved[True] == x_bytes + 2 * r * n_tokens * 4 + 2 * mask_bytes
    if p:
        assert saved[False] >= 2 * x_bytes + 2 * n_tokens * hidden  # dropped-out copies and bool masks


# ------------------------------------------------------------------ length-grouped batches


def test_length_grouped_sampler_is_a_seeded_permutation_of_similar_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 64, (1000,), generator=g).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=1, mega=10)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    assert order == list(sampler)  # a function of (seed, epoch)
    sampler.set_epoch(1)
    assert sorted(list(sampler)) == list(range(1000)) and list(sampler) != order

    def padded(idx):
        return sum(16 * max(lengths[i] for i in idx[s : s + 16]) for s in range(0, len(idx), 16))

    shuffled = torch.randperm(1000, generator=g).tolist()
    # grouping cuts the padded tokens to about half of a plain shuffle's here
    assert padded(order) < 0.7 * padded(shuffled)
    # every batch but the last is full, and the last holds the remainder
    assert [len(b) for b in sampler.batches()] == [16] * 62 + [8]


def test_fast_path_learns_like_peft():
    """tests/methods/test_lora.py's loss curve (20 AdamW steps at lr 3e-2, all-linear, no dropout) on the
    fused path: the same curve as peft's to 1e-3 (per step the paths agree to 1e-5; the steps compound it)."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    theirs = peft.get_peft_model(
        tiny_model("llama", "CAUSAL_LM"),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    ours = wrap(
        tiny_model("llama", "CAUSAL_LM"),
        "CAUSAL_LM",
        "lora",
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    ours.load_adapter_state_dict(get_peft_model_state_dict(theirs))
    assert all(m.fast_path for m in ours.modules() if isinstance(m, LoraLayer))
    ours.chunked_loss = False  # transformers' loss, as peft's; tests/test_lm_loss.py holds the chunked one
    batch = tiny_batch(ours.model, "CAUSAL_LM", batch=4, length=16)
    batch["labels"] = batch["input_ids"]
    curves = [train_losses(model, batch, lr=3e-2, steps=20) for model in (ours, theirs)]
    assert curves[0] == pytest.approx(curves[1], rel=1e-3)
    assert curves[0][-1] < 0.95 * curves[0][0]


# ------------------------------------------------------------------ packing


def test_packed_rows_compute_what_each_example_computes_alone():
    """Per-token logits and the summed loss of a packed batch equal those of its examples run one by one."""
    from peftrun.batching import PackedCollator, pack_rows

    torch.manual_seed(0)
    model = tiny_model("llama", "CAUSAL_LM")
    model.config.use_cache = False
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in (5, 9, 3, 12, 7, 4):
        ids = torch.randint(4, 128, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    packed = pack_rows(rows, max_length=16)
    assert sorted(len(p["input_ids"]) for p in packed) == [
        8,
        16,
        16,
    ]  # first fit decreasing: 12+4 | 9+7 | 5+3
    batch = PackedCollator(pad_token_id=0)(packed)
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        total = 0.0
        for row_i, p in enumerate(packed):
            starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
            for s, e in zip(starts, starts[1:] + [len(p["position_ids"])]):
                alone = model(input_ids=torch.tensor([p["input_ids"][s:e]])).logits[0]
                assert max_diff(logits[row_i, s:e], alone) <= 1e-5
        for r in rows:  # the unpacked loss terms, summed
            out = model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]]))
            total += out.loss.item() * sum(lab != -100 for lab in r["labels"][1:])
        out = model(**batch)
        n_targets = (batch["labels"][:, 1:] != -100).sum().item()
    assert n_targets == sum(sum(lab != -100 for lab in r["labels"][1:]) for r in rows)
    assert out.loss.item() * n_targets == pytest.approx(total, rel=1e-5)


def test_packing_is_refused_where_it_cannot_hold():
    from peftrun.batching import check_packing
    from peftrun.errors import PeftrunError
    from peftrun.methods import get_method

    with pytest.raises(PeftrunError, match="causal-LM"):
        check_packing("SEQ_CLS", get_method("lora"))
    check_packing("CAUSAL_LM", get_method("lora"))
    prompt = next(
        (
            m
            for m in ("prompt_tuning", "prefix_tuning")
            if m in __import__("peftrun.methods").methods.method_names()
        ),
        None,
    )
    if prompt:
        with pytest.raises(PeftrunError, match="virtual tokens"):
            check_packing("CAUSAL_LM", get_method(prompt))


@pytest.mark.usefixtures("one_thread")
def test_packed_training_through_the_loop_learns(tmp_path):
    """data.packing in a recipe: fewer, position-carrying batches, and the adapter learns as unpacked would."""
    import json
    import random

    from tiny_text import save_tiny_with_tokenizer

    from peftrun.predict import run_eval
    from peftrun.recipe import recipe_from_dict
    from peftrun.training.build import build, make_loaders
    from peftrun.training.loop import train

    words = {"positive": ["great", "good", "nice"], "negative": ["awful", "bad", "sad"]}
    fill = ["the", "movie", "was", "really", "a", "plot", "very", "film"]
    model_dir = tmp_path / "llama"
    save_tiny_with_tokenizer(
        model_dir,
        "llama",
        "CAUSAL_LM",
        [" ".join(sum(words.values(), fill + list(words)))],
        initializer_range=0.5,
    )
    rng = random.Random(0)
    rows = []
    for i in range(96):
        label = "positive" if i % 2 else "negative"
        text = " ".join(rng.sample(fill, rng.randint(1, 6)) + [rng.choice(words[label])])
        rows.append({"text": text, "label": label})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def recipe(packing: bool):
        return recipe_from_dict(
            {
                "model": {"name_or_path": str(model_dir), "task_type": "CAUSAL_LM"},
                "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                "data": {
                    "train_file": str(tmp_path / "train.jsonl"),
                    "eval_fraction": 0.25,
                    "max_length": 32,
                    "packing": packing,
                },
                "training": {
                    "num_epochs": 6,
                    "learning_rate": 1e-2,
                    "batch_size": 4,
                    "progress_bar": False,
                    "seed": 0,
                    "eval_each_epoch": False,
                },
                "output_dir": str(tmp_path / f"out-{packing}"),
            }
        )

    loaders = {}
    for packing in (True, False):
        r = recipe(packing)
        tokenizer, splits, label_names, _ = build(r)
        loaders[packing] = make_loaders(r, tokenizer, splits, label_names)[0]
    batch = next(iter(loaders[True]))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert len(loaders[True]) < len(loaders[False]) / 2
    base = run_eval(recipe(True), None).metrics["eval_loss"]
    train(recipe(True))
    trained = run_eval(recipe(True), tmp_path / "out-True").metrics["eval_loss"]
    assert trained < 0.5 * base, (base, trained)
