"""Every combination name peft's add_weighted_adapter has gives peft's result (peft installed as the oracle):
the same tensors (the same products B A for the SVD names, whose factors are defined up to sign), the same
logits, to 1e-5; DARE, which draws at random, gives peft's very draws when both start from one seed."""

from __future__ import annotations

import pytest
import torch
from adapter_kit import load_base, logits, save_lm, save_lora
from safetensors.torch import load_file

import peftrun
from peftrun.combination import PEFT_METHODS, keep_random

peft = pytest.importorskip("peft")
PREFIX = "base_model.model."
TOL = 1e-5


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine_peft")
    base = save_lm(root / "base")
    adapters = {
        # a, c: one rank (4) on q, v, other scalings; b: rank 2, rsLoRA, on q, v, k
        "a": save_lora(base, root / "a", seed=1),
        "c": save_lora(base, root / "c", seed=3, lora_alpha=16),
        "b": save_lora(
            base, root / "b", seed=2, r=2, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "k_proj"]
        ),
    }
    models = {}
    for pair in (("a", "c"), ("a", "b")):
        model = peft.PeftModel.from_pretrained(load_base(base, "CAUSAL_LM"), str(adapters[pair[0]]), adapter_name=pair[0])
        model.load_adapter(str(adapters[pair[1]]), adapter_name=pair[1])
        models[pair] = model.eval()
    return {"root": root, "base": base, "adapters": adapters, "models": models}


def batch():
    ids = torch.randint(3, 384, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def theirs(kit, pair, weights, name, method, seed=None, **kwargs):
    """peft's combined adapter `name`: its tensors (peftrun's keys) and logits. With a seed, torch's global
    generator is seeded just as peft starts combining (after it has built the new adapter's layers)."""
    model = kit["models"][pair]
    if name not in model.peft_config:
        lora = model.base_model
        inject = lora.inject_adapter
        if seed is not None:

            def seeded(*args, **kw):
                out = inject(*args, **kw)
                torch.manual_seed(seed)
                return out

            lora.inject_adapter = seeded
        try:
            model.add_weighted_adapter(list(pair), weights, name, combination_type=method, **kwargs)
        finally:
            lora.__dict__.pop("inject_adapter", None)
    model.set_adapter(name)
    state = peft.get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach() for k, v in state.items()}, logits(model, batch())


def ours(kit, pair, weights, name, method, **kwargs):
    parts = [(kit["adapters"][k], w) for k, w in zip(pair, weights)]
    result = peftrun.combine(parts, kit["root"] / name, method=method, **kwargs)
    model = peftrun.load(adapters=result.folder, device="cpu")
    return load_file(str(result.folder / "adapter_model.safetensors")), logits(model, batch()), result


def products(state):
    return {
        k.removesuffix(".lora_A.weight"): state[k.replace("lora_A", "lora_B")] @ v
        for k, v in state.items()
        if k.endswith(".lora_A.weight")
    }


def max_diff(x, y):
    assert sorted(x) == sorted(y)
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


CASES = [
    # (method, pair, weights, peft kwargs / peftrun kwargs)
    ("linear", ("a", "c"), [0.7, -0.4], {}, {}),
    ("cat", ("a", "b"), [0.7, -0.3], {}, {}),
    ("svd", ("a", "b"), [0.7, -0.3], {"svd_rank": 3}, {"rank": 3}),
    ("svd", ("a", "c"), [0.6, 0.5], {"svd_clamp": 0.9}, {"svd_clamp": 0.9}),
    ("ties", ("a", "c"), [0.7, -0.4], {"density": 0.3}, {"density": 0.3}),
    (
        "ties",
        ("a", "c"),
        [1.0, 0.5],
        {"density": 0.5, "majority_sign_method": "frequency"},
        {"density": 0.5, "majority_sign_method": "frequency"},
    ),
    ("ties_svd", ("a", "b"), [0.7, -0.3], {"density": 0.4, "svd_rank": 3}, {"density": 0.4, "rank": 3}),
    ("magnitude_prune", ("a", "c"), [0.7, 0.4], {"density": 0.3}, {"density": 0.3}),
    ("magnitude_prune_svd", ("a", "b"), [0.7, 0.3], {"density": 0.6}, {"density": 0.6}),
]


@pytest.mark.parametrize("method, pair, weights, peft_kw, our_kw", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_deterministic_names_give_peft_result(kit, method, pair, weights, peft_kw, our_kw):
    name = f"{method}_{len([k for k in peft_kw])}_{'_'.join(pair)}"
    their_state, their_logits = theirs(kit, pair, weights, name, method, **peft_kw)
    our_state, our_logits, result = ours(kit, pair, weights, name, method, **our_kw)
    if method.endswith("svd"):  # U, V are defined up to sign: compare the products
        diff = max_diff(products(our_state), products(their_state))
    else:
        diff = max_diff(our_state, their_state)
    print(f"{method}: tensors {diff:.2e}, logits {(our_logits - their_logits).abs().max().item():.2e}")
    assert diff <= TOL
    assert (our_logits - their_logits).abs().max().item() <= TOL
    config = (result.folder / "adapter_config.json").read_text()
    r = kit["models"][pair].peft_config[name].r
    assert f'"r": {r},' in config and f'"lora_alpha": {r},' in config


DARE = [
    ("dare_linear", {}),
    ("dare_ties", {}),
    ("dare_ties", {"majority_sign_method": "frequency"}),
    ("dare_linear_svd", {"svd_rank": 3}),
    ("dare_ties_svd", {}),
]


@pytest.mark.parametrize("method, extra", DARE, ids=lambda v: v if isinstance(v, str) else None)
def test_dare_gives_peft_draws_from_one_seed(kit, method, extra):
    pair, weights = ("a", "c"), [0.7, -0.4]
    name = f"{method}_{len(extra)}"
    their_state, their_logits = theirs(kit, pair, weights, name, method, seed=11, density=0.4, **extra)
    our_kw = {("rank" if k == "svd_rank" else k): v for k, v in extra.items()}
    our_state, our_logits, _ = ours(kit, pair, weights, name, method, density=0.4, seed=11, **our_kw)
    if method.endswith("svd"):
        diff = max_diff(products(our_state), products(their_state))
    else:
        diff = max_diff(our_state, their_state)
    print(f"{method}: tensors {diff:.2e}, logits {(our_logits - their_logits).abs().max().item():.2e}")
    assert diff <= TOL
    assert (our_logits - their_logits).abs().max().item() <= TOL
    # another seed, another draw
    other_state, _, _ = ours(kit, pair, weights, name + "_s12", method, density=0.4, seed=12, **our_kw)
    assert max_diff(products(other_state), products(our_state)) > 1e-3


def test_dare_keeps_with_probability_density_and_rescales_as_peft():
    from peft.utils.merge_utils import prune

    t = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    ours_ = keep_random(t, 0.3, torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    assert torch.equal(ours_, prune(t, 0.3, method="random", rescale=True))
    kept = ours_ != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # 60000 draws: 4 standard deviations is 0.0075
    assert torch.allclose(ours_[kept], t[kept] / 0.3)
    assert keep_random(t, 1.0, torch.Generator()) is t  # density 1: nothing dropped, nothing drawn


def test_every_peft_name_is_covered():
    covered = {c[0] for c in CASES} | {d[0] for d in DARE}
    assert covered == set(PEFT_METHODS)


def test_cli_takes_peft_names_and_records_the_method(kit, tmp_path):
    import json

    from conftest import run_cli

    a, c = kit["adapters"]["a"], kit["adapters"]["c"]
    out = tmp_path / "ties_svd"
    proc = run_cli(
        "combine", "--adapter", f"{a}:0.7", "--adapter", f"{c}:-0.4", "--method", "ties_svd", "--density", "0.3",
        "--rank", "3", "--majority-sign", "frequency", "--svd-clamp", "0.95", "--output", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    provenance = json.loads((out / "combine.json").read_text())
    assert provenance["method"] == "ties_svd" and provenance["meaning"] == "peft add_weighted_adapter"
    assert provenance["majority_sign_method"] == "frequency" and provenance["svd_clamp"] == 0.95
    their_state, their_logits = theirs(
        kit, ("a", "c"), [0.7, -0.4], "cli_ties_svd", "ties_svd",
        density=0.3, svd_rank=3, majority_sign_method="frequency", svd_clamp=0.95,
    )  # fmt: skip
    assert max_diff(products(load_file(str(out / "adapter_model.safetensors"))), products(their_state)) <= TOL
    bad = run_cli("combine", "--adapter", f"{a}:1", "--method", "ties", "--rank", "2", "--output", str(tmp_path / "x"))
    assert bad.returncode == 2 and "sets the rank itself" in bad.stderr
