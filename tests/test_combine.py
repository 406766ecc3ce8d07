"""Weighted combinations of LoRA adapters, each checked against the weighted sum of the deltas by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from adapter_kit import load_base, logits, save_lm, save_lora
from conftest import run_cli
from safetensors.torch import load_file

import peftrun
from peftrun.combination import dare_drop, elect_and_merge, ties_merge, trim_magnitude, truncate_svd
from peftrun.errors import PeftrunError

PREFIX = "base_model.model."


# ------------------------------------------------------------------ the maths on hand-made matrices


def test_ties_trims_elects_signs_and_averages_the_agreeing():
    d1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 4.0, 0.2]])
    d2 = torch.tensor([[-2.5, -3.0, 0.1], [-1.0, 2.0, 0.3]])
    # density 0.5 keeps 3 of 6 entries: the largest magnitudes
    assert torch.equal(trim_magnitude(d1, 0.5), torch.tensor([[3.0, 0, 0], [-2.0, 4.0, 0]]))
    assert torch.equal(trim_magnitude(d2, 0.5), torch.tensor([[-2.5, -3.0, 0], [0, 2.0, 0]]))
    # weights 1 and 0.5: (0,0) 3 - 1.25 > 0 keeps only +3; (1,1) both positive: mean of 4 and 1
    merged = ties_merge([d1, d2], [1.0, 0.5], density=0.5)
    assert torch.equal(merged, torch.tensor([[3.0, -1.5, 0.0], [-2.0, 2.5, 0.0]]))


def test_sign_election_uses_the_sum_not_the_count():
    # two small positives against one large negative: the sum is negative, so the negative entry wins alone
    merged = elect_and_merge([torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])])
    assert merged.item() == -5.0


def test_dare_drops_with_probability_p_and_rescales_by_one_over_one_minus_p():
    d = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    out = dare_drop(d, 0.3, torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.03
    assert torch.equal(out[kept], (d / 0.3)[kept])
    again = dare_drop(d, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert not torch.equal(out, dare_drop(d, 0.3, torch.Generator().manual_seed(2)))
    # unbiased: the mean of many draws approaches the delta itself
    small = d[:8, :8]
    gen = torch.Generator().manual_seed(3)
    mean = torch.stack([dare_drop(small, 0.5, gen) for _ in range(4000)]).mean(0)
    assert (mean - small).abs().max().item() < 0.1 * small.abs().max().item()


def test_svd_truncation_is_the_best_rank_k_approximation():
    m = torch.randn(12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = truncate_svd(m, 3)
    assert a.shape == (3, 10) and b.shape == (12, 3)
    sigma = torch.linalg.svdvals(m)
    err = torch.linalg.norm(m - b @ a)
    assert math.isclose(err.item(), sigma[3:].square().sum().sqrt().item(), rel_tol=1e-10)
    # any other rank-3 matrix is further away, e.g. the truncation of a nudged m
    a2, b2 = truncate_svd(m + 0.1 * torch.randn(12, 10, dtype=torch.float64), 3)
    assert torch.linalg.norm(m - b2 @ a2) > err


# ------------------------------------------------------------------ on saved adapters


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    base = save_lm(root / "base")
    # a: r=4, alpha=8 (s=2) on q,v; b: r=2, rsLoRA alpha=16 (s=16/sqrt 2) on q,v,k; c: like a, other weights
    a = save_lora(base, root / "a", seed=1)
    b = save_lora(
        base,
        root / "b",
        seed=2,
        r=2,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "k_proj"],
    )
    c = save_lora(base, root / "c", seed=3)
    return {"root": root, "base": base, "a": a, "b": b, "c": c}


def deltas(folder) -> dict[str, torch.Tensor]:
    """ΔW = s B A per module, from the files and config alone."""
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            path, r = module.removeprefix(PREFIX), a.shape[0]
            alpha = config["alpha_pattern"].get(path, config["lora_alpha"])  # the combined write full paths
            s = alpha / (math.sqrt(r) if config["use_rslora"] else r)
            out[path] = s * state[module + ".lora_B.weight"] @ a
    return out


def weighted_sum(parts) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for folder, w in parts:
        for path, d in deltas(folder).items():
            total[path] = total.get(path, 0) + w * d
    return total


def batch():
    ids = torch.randint(3, 384, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def base_plus(base_dir, updates: dict[str, torch.Tensor]):
    model = load_base(base_dir, "CAUSAL_LM")
    with torch.no_grad():
        for path, delta in updates.items():
            model.get_submodule(path).weight += delta
    return model


def test_cat_is_exact_and_loads_in_peftrun_and_peft(lm):
    parts = [(lm["a"], 0.7), (lm["b"], 0.3)]
    result = peftrun.combine({"a": parts[0], "b": parts[1]}, lm["root"] / "cat", method="cat")
    want = weighted_sum(parts)
    got = deltas(result.folder)
    assert sorted(got) == sorted(want) and len(got) == 6  # q,v in 2 layers from both; k from b alone
    for path in want:
        assert (got[path] - want[path]).abs().max().item() <= 1e-5
    # peft's cat: rank Σ r_i = 6 everywhere, k (from b alone) padded with zero rows
    assert set(result.ranks.values()) == {6}
    assert result.max_relative_distance < 1e-5
    config = json.loads((result.folder / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6 and not config["rank_pattern"]

    reference = logits(base_plus(lm["base"], want), batch())
    ours = peftrun.load(adapters=result.folder, device="cpu")
    assert (logits(ours, batch()) - reference).abs().max().item() <= 1e-5
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(load_base(lm["base"], "CAUSAL_LM"), str(result.folder)).eval()
    assert (logits(theirs, batch()) - logits(ours, batch())).abs().max().item() <= 1e-5


def test_svd_truncates_the_weighted_sum_optimally_and_loads_in_peft(lm):
    parts = [(lm["a"], 0.7), (lm["b"], -0.3)]
    low = peftrun.combine(parts, lm["root"] / "svd3", method="svd", rank=3)
    want = weighted_sum(parts)
    for path, delta in deltas(low.folder).items():
        tail = torch.linalg.svdvals(want[path])[3:].square().sum().sqrt()
        assert math.isclose(
            torch.linalg.norm(delta - want[path]).item(), tail.item(), rel_tol=1e-3, abs_tol=1e-5
        )
        # q,v carry rank 4 + 2 (truncated to 3); k comes from b alone, rank 2
        assert torch.linalg.matrix_rank(delta).item() == (2 if "k_proj" in path else 3)
    # rank 20 is above v/k's 16 outputs: those modules get rank 16 through rank_pattern, and are exact
    full = peftrun.combine(parts, lm["root"] / "svd20", method="svd", rank=20)
    assert (
        full.ranks["model.layers.0.self_attn.q_proj"] == 20
        and full.ranks["model.layers.0.self_attn.v_proj"] == 16
    )
    for path, delta in deltas(full.folder).items():
        if "v_proj" in path or "k_proj" in path:
            assert (delta - want[path]).abs().max().item() <= 1e-5
    ours = peftrun.load(adapters=full.folder, device="cpu")
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(load_base(lm["base"], "CAUSAL_LM"), str(full.folder)).eval()
    assert (logits(theirs, batch()) - logits(ours, batch())).abs().max().item() <= 1e-5


def test_linear_factors_weights_a_and_b_which_is_not_the_sum_of_deltas(lm):
    fa, fc = (load_file(str(lm[k] / "adapter_model.safetensors")) for k in ("a", "c"))
    result = peftrun.combine([(lm["a"], 0.6), (lm["c"], 0.4)], lm["root"] / "linear", method="linear_factors")
    got = load_file(str(result.folder / "adapter_model.safetensors"))
    key = PREFIX + "model.layers.1.self_attn.v_proj"
    s = 2.0  # both r=4, alpha=8
    a = 0.6 * fa[key + ".lora_A.weight"] + 0.4 * fc[key + ".lora_A.weight"]
    b = 0.6 * s * fa[key + ".lora_B.weight"] + 0.4 * s * fc[key + ".lora_B.weight"]
    assert torch.allclose(got[key + ".lora_A.weight"], a, atol=1e-6)
    assert torch.allclose(got[key + ".lora_B.weight"], b, atol=1e-6)
    assert result.max_relative_distance > 0.05  # the cross terms: not Σ w ΔW
    # copies of one adapter with weights summing to 1 give that adapter back
    same = peftrun.combine([(lm["a"], 0.5), (lm["a"], 0.5)], lm["root"] / "linear_same", method="linear_factors")
    for path, delta in deltas(same.folder).items():
        assert (delta - deltas(lm["a"])[path]).abs().max().item() <= 1e-5
    with pytest.raises(PeftrunError, match="one rank"):
        peftrun.combine([(lm["a"], 0.5), (lm["b"], 0.5)], lm["root"] / "linear_bad", method="linear_factors")
    with pytest.raises(PeftrunError, match="one rank"):  # peft's linear too
        peftrun.combine([(lm["a"], 0.5), (lm["b"], 0.5)], lm["root"] / "linear_bad2", method="linear")


def test_ties_delta_at_full_rank_is_the_ties_merge_of_the_deltas(lm):
    parts = [(lm["a"], 1.0), (lm["c"], 0.5)]
    result = peftrun.combine(parts, lm["root"] / "ties", method="ties_delta", rank=32, density=0.2)
    da, dc = deltas(lm["a"]), deltas(lm["c"])
    for path, delta in deltas(result.folder).items():
        want = ties_merge([da[path], dc[path]], [1.0, 0.5], 0.2)
        assert (want != 0).float().mean() <= 0.4  # at most the two trimmed supports
        assert (delta - want).abs().max().item() <= 1e-5


def test_dare_is_seeded_and_its_expectation_is_the_weighted_sum(lm):
    parts = [(lm["a"], 0.7), (lm["c"], 0.3)]
    kw = {"method": "dare_linear_delta", "rank": 32, "density": 0.5}
    one = peftrun.combine(parts, lm["root"] / "dare1", seed=7, **kw)
    two = peftrun.combine(parts, lm["root"] / "dare2", seed=7, **kw)
    other = peftrun.combine(parts, lm["root"] / "dare3", seed=8, **kw)
    d1, d2, d3 = deltas(one.folder), deltas(two.folder), deltas(other.folder)
    want = weighted_sum(parts)
    path = "model.layers.0.self_attn.q_proj"
    assert torch.equal(d1[path], d2[path]) and not torch.allclose(d1[path], d3[path])
    # averaging over seeds approaches Σ w ΔW (each draw is unbiased); one draw alone is far from it
    draws = []
    for seed in range(12):
        out = peftrun.combine(parts, lm["root"] / f"dare_s{seed}", method="dare_linear_delta", rank=32, seed=seed)
        draws.append(deltas(out.folder)[path])
    mean = sum(draws) / len(draws)
    assert torch.linalg.norm(mean - want[path]) < 0.5 * torch.linalg.norm(d1[path] - want[path])
    ties = peftrun.combine(parts, lm["root"] / "dare_ties", method="dare_ties_delta", rank=4, density=0.5, seed=7)
    assert set(ties.ranks.values()) == {4}
    model = peftrun.load(adapters=ties.folder, device="cpu")
    assert torch.isfinite(logits(model, batch())).all()


def test_heads_combine_as_weighted_sums(tmp_path):
    base = save_lm(tmp_path / "bert", "bert", "SEQ_CLS")
    a = save_lora(base, tmp_path / "a", "SEQ_CLS", seed=1)
    b = save_lora(base, tmp_path / "b", "SEQ_CLS", seed=2)
    result = peftrun.combine([(a, 0.25), (b, 0.75)], tmp_path / "ab", method="cat")
    key = PREFIX + "classifier.weight"
    got = load_file(str(result.folder / "adapter_model.safetensors"))[key]
    fa, fb = (load_file(str(f / "adapter_model.safetensors"))[key] for f in (a, b))
    assert torch.allclose(got, 0.25 * fa + 0.75 * fb, atol=1e-6)
    model = peftrun.load(adapters=result.folder, device="cpu")
    assert logits(model, {"input_ids": torch.tensor([[5, 6, 7]])}).shape == (1, 3)


def test_refusals(lm, tmp_path):
    base = lm["base"]
    dora = save_lora(base, tmp_path / "dora", seed=1, use_dora=True)
    with pytest.raises(PeftrunError, match="DoRA"):
        peftrun.combine([(dora, 1.0)], tmp_path / "x")
    other_base = save_lm(tmp_path / "other")
    other = save_lora(other_base, tmp_path / "other_a", seed=1)
    with pytest.raises(PeftrunError, match="disagree on base_model_name_or_path"):
        peftrun.combine([(lm["a"], 0.5), (other, 0.5)], tmp_path / "y")
    with pytest.raises(PeftrunError, match="sets the rank itself"):
        peftrun.combine([(lm["a"], 0.5)], tmp_path / "z", method="cat", rank=2)
    with pytest.raises(PeftrunError, match="must differ"):
        peftrun.combine([(lm["a"], 0.5)], lm["a"])


def test_cli_combine(lm, tmp_path):
    out = tmp_path / "ab"
    proc = run_cli(
        "combine",
        "--adapter",
        f"a={lm['a']}:0.7",
        "--adapter",
        f"b={lm['b']}:0.3",
        "--method",
        "cat",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "combined 2 adapters with cat" in proc.stdout and "rank 6;" in proc.stdout
    assert {p.name for p in out.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "combine.json",
    }
    provenance = json.loads((out / "combine.json").read_text())
    assert [s["weight"] for s in provenance["sources"]] == [0.7, 0.3]
    assert provenance["method"] == "cat" and provenance["meaning"] == "peft add_weighted_adapter"
    bad = run_cli("combine", "--adapter", f"{lm['a']}:1", "--method", "tie", "--output", str(tmp_path / "c"))
    assert bad.returncode == 2 and "did you mean 'ties'" in bad.stderr
