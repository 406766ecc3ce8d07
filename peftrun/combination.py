r"""Weighted combinations of LoRA adapters into one new LoRA adapter, in peft's format.

Input i brings a weight w_i and, for each adapted module, its factors A_i ∈ R^{r_i×in}, B_i ∈ R^{out×r_i},
its scaling s_i and its update ΔW_i = s_i B_i A_i. The plain weighted sum is M = Σ_i w_i ΔW_i.

The names peft's `add_weighted_adapter` has mean here what they mean there (tested against peft 0.21):

  cat          A = [w_1 s_1 A_1; …; w_n s_n A_n], B = [B_1 … B_n]: B A = M exactly; rank R = Σ r_i (the
               adapters' ranks; a module only some adapters adapt keeps zero rows up to R).
  linear, ties, dare_linear, dare_ties, magnitude_prune
               work on the factors, each with its own weights: with c_i = w_i s_i,
               a_i = sign(c_i) √|c_i| (A's weight) and b_i = √|c_i| (B's weight),
               A = F(A_1…A_n; a), B = F(B_1…B_n; b), where F is
                 linear           Σ_i a_i T_i
                 magnitude_prune  Σ_i a_i P(T_i), P keeping the ⌊density · numel⌋ largest-magnitude entries
                 ties             the disjoint mean of the a_i P(T_i) over the i whose sign agrees with the
                                  elected sign γ (below)
                 dare_linear      Σ_i a_i D(T_i), D keeping each entry with probability density and
                                  dividing the kept by density (E[D(T)] = T)
                 dare_ties        the disjoint mean of the a_i D(T_i), γ elected on the D(T_i)
               all adapters must have one rank r, which the result keeps. `linear` is NOT M: B A has
               cross terms Σ_i Σ_j b_i a_j B_i A_j.
  svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
               F (linear for svd) applied to the deltas ΔW_i with weights w_i, then truncated to rank
               k = --rank (default: the largest adapter rank) by SVD: B = U_k Σ_k, A = V_kᵀ; with
               svd_clamp q, both are clamped to ±(the q-quantile of their entries together).

  Sign election (ties, dare_ties): γ = +1 where S ≥ 0, else −1, with S = Σ_i T̃_i ("total") or Σ_i sign(T̃_i)
  ("frequency") over the pruned, UNWEIGHTED tensors T̃_i; the disjoint mean is
  Σ_{i: sign(T̃_i) = γ} w_i T̃_i / max(1, #{those i}). A density ≥ 1 prunes nothing (and draws nothing).
  With one adapter every name is `linear`, as in peft. DARE draws with torch.bernoulli from a generator
  seeded with `seed`, module by module in module order (layer numbers numerically, then by name), for
  each module the A's of the adapters in order, then their B's (the ΔW's, for the *_svd names).
  These are peft's very draws when torch's global generator holds `seed` as peft starts combining and the
  module names sort in the model's order (peft goes by the model's; otherwise: the same distribution).

peftrun's own formulas, under their own names:

  linear_factors     A = Σ w_i A_i, B = Σ w_i s_i B_i (all r_i equal): B A = Σ_i Σ_j w_i w_j s_i B_i A_j,
                     NOT M (cross terms); copies of one adapter with Σ w_i = 1 give that adapter back.
  ties_delta         TIES-merging (Yadav et al., 2023) on the deltas, signs elected by the WEIGHTED sum:
                     trim each ΔW_i to its round(density · numel) largest-magnitude entries (ΔW̃_i), elect
                     γ = sign(Σ_i w_i ΔW̃_i), take Σ_{i: sign(w_i ΔW̃_i) = γ} w_i ΔW̃_i / #{those i}.
  dare_linear_delta  DARE (Yu et al., 2023) on the deltas: drop each entry with probability 1 − density,
                     scale the kept by 1/density, then Σ_i w_i ΔW̃_i.
  dare_ties_delta    DARE's drop and rescale, then ties_delta's election and disjoint mean.

  Each is then truncated to rank k (--rank, default the largest input rank) with the balanced split
  B = U_k Σ_k^{1/2}, A = Σ_k^{1/2} V_kᵀ, the best rank-k approximation (Eckart–Young).

The new adapter has scaling 1 (lora_alpha = r), so its B A is the combined update itself; a module smaller
than the rank asked for gets its own rank through rank_pattern (peft cannot build that one). Tensors that
are not LoRA factors (a head under modules_to_save, trained biases) are combined as Σ_i w_i T_i (peft
refuses those).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from peftrun.errors import PeftrunError, did_you_mean
from peftrun.io.atomic import atomic_dir
from peftrun.io.loading import CALLER_ONLY
from peftrun.io.lock import beside_lock
from peftrun.io.outputs import check_output_folder, user_path, write_marker
from peftrun.io.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    RECIPE_COPY,
    first_non_finite,
    read_adapter,
    read_recipe_copy,
    save_tensors,
)
from peftrun.io.scrub import scrub
from peftrun.methods.lora import LoraConfig, lora_scaling, pattern_value

# the names peft's add_weighted_adapter has, meaning what they mean there
PEFT_METHODS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # F on A and on B
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # F on ΔW, SVD
OWN_METHODS = ("linear_factors", "ties_delta", "dare_linear_delta", "dare_ties_delta")  # peftrun's own
METHODS = PEFT_METHODS + OWN_METHODS
RANKED = SVD_METHODS + OWN_METHODS[1:]  # the names --rank is for
DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
DENSITY += ("magnitude_prune", "magnitude_prune_svd", "ties_delta", "dare_linear_delta", "dare_ties_delta")
SIGN_METHODS = ("total", "frequency")
PREFIX = "base_model.model."
A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"
TARGET_FIELDS = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")
PROVENANCE = "combine.json"


@dataclass
class Source:
    """One input adapter: where it is, its weight, its peft config and tensors."""

    folder: Path
    weight: float
    config: dict[str, Any]
    state: dict[str, torch.Tensor]

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """module path -> (A, B, scaling), in float32."""
        out = {}
        for key, a in self.state.items():
            if not key.endswith(A_KEY):
                continue
            module = key[: -len(A_KEY)]
            path = module.removeprefix(PREFIX)
            b = self.state[module + B_KEY]
            alpha = pattern_value(
                self.config.get("alpha_pattern") or {}, path, self.config.get("lora_alpha", 8)
            )
            scaling = lora_scaling(alpha, a.shape[0], bool(self.config.get("use_rslora")))
            # a Conv2d's A (r, in, kh, kw) and B (out, r, 1, 1) as matrices: ΔW = s B A over the unrolled kernel
            out[path] = (a.float().flatten(1), b.float().flatten(1), scaling)
        return out

    def kernel(self, path: str) -> tuple[int, ...]:
        """The (kh, kw) of a Conv2d module's A, () for a Linear one."""
        return tuple(self.state[f"{PREFIX}{path}{A_KEY}"].shape[2:])


@dataclass
class Combined:
    folder: Path
    method: str
    ranks: dict[str, int]
    # max over modules of ‖B A − Σ w_i ΔW_i‖_F / ‖Σ w_i ΔW_i‖_F: how far the result is from the plain sum
    max_relative_distance: float
    sources: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------ the maths, one function each


def truncate_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A the best rank-`rank` approximation of m (fewer when m is smaller)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root[None, :]


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density · numel) entries of largest magnitude, zero the rest (TIES's trim)."""
    keep = max(1, round(density * delta.numel()))
    if keep >= delta.numel():
        return delta.clone()
    flat = delta.flatten()
    idx = flat.abs().topk(keep).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(delta)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability p = 1 − density, scale the kept by 1/(1 − p): unbiased."""
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def elect_and_merge(weighted: list[torch.Tensor]) -> torch.Tensor:
    """TIES's sign election (the sign of the sum) and disjoint mean (over the entries that agree)."""
    stacked = torch.stack(weighted)
    sign = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (stacked * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    return elect_and_merge([w * trim_magnitude(d, density) for d, w in zip(deltas, weights)])


# -------------------- the names as peft means them


def keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """P: keep the ⌊density · numel⌋ entries of largest magnitude (all of them when density ≥ 1)."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
    return t * keep.view_as(t)


def keep_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """D: keep each entry with probability density, divide the kept by density (no draw when density ≥ 1)."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def elected_agreement(pruned: torch.Tensor, sign_method: str) -> torch.Tensor:
    """Where sign(T̃_i) = γ, γ = +1 where S ≥ 0 else −1; S the total of the T̃_i or of their signs."""
    signs = pruned.sign()
    s = pruned.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    gamma = torch.where(s >= 0, 1.0, -1.0)
    return signs == gamma


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def merge_tensors(
    kind: str,
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    density: float,
    sign_method: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """F of the module docstring: kind is linear, magnitude_prune, ties, dare_linear or dare_ties."""
    if kind in ("magnitude_prune", "ties"):
        tensors = [keep_largest(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [keep_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    if kind in ("ties", "dare_ties"):
        return disjoint_mean(stacked * w, elected_agreement(stacked, sign_method))
    return (stacked * w).sum(dim=0)


def truncate_like_peft(m: torch.Tensor, rank: int, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (V_kᵀ, U_k Σ_k), optionally both clamped to ±(their entries' clamp-quantile)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.numel())
    b, a = u[:, :k] * s[:k], vh[:k]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return a, b


def adapter_rank(config: dict[str, Any]) -> int:
    """An adapter's rank as peft counts it: r, or the largest of rank_pattern when that is larger."""
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


def module_order(path: str) -> list[tuple[int, Any]]:
    """Sort key: layer numbers numerically, names alphabetically (the order DARE draws in)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in path.split(".")]


# ------------------------------------------------------------------ reading and checking inputs


def read_sources(inputs: list[tuple[str | Path, float]], allow_pickle: bool = False) -> list[Source]:
    if not inputs:
        raise PeftrunError("give at least one adapter to combine")
    sources = []
    for folder, weight in inputs:
        config, state = read_adapter(folder, allow_pickle=allow_pickle)
        where = str(Path(folder) / ADAPTER_CONFIG)
        if config.get("peft_type") != "LORA":
            raise PeftrunError(
                f"only LoRA adapters combine; this one is {config.get('peft_type')}", where=where
            )
        if config.get("use_dora") or any("lora_magnitude_vector" in k for k in state):
            raise PeftrunError("DoRA adapters do not combine: their update is not B·A alone", where=where)
        if not any(k.endswith(A_KEY) for k in state):
            raise PeftrunError("no lora_A/lora_B tensors in this adapter", where=str(folder))
        check_factors(state, Path(folder) / ADAPTER_WEIGHTS)
        if not torch.isfinite(torch.tensor(float(weight))):
            raise PeftrunError(f"weight {weight} is not a finite number", where=str(folder))
        sources.append(Source(Path(folder), float(weight), config, state))
    first = sources[0]
    for src in sources[1:]:
        for key in ("base_model_name_or_path", "task_type"):
            if src.config.get(key) != first.config.get(key):
                raise PeftrunError(
                    f"adapters disagree on {key}: {first.config.get(key)!r} ({first.folder}) vs "
                    f"{src.config.get(key)!r} ({src.folder})",
                    hint="combine adapters trained on the same base model for the same task",
                )
    return sources


def check_factors(state: dict[str, torch.Tensor], where: Path) -> None:
    """Each lora_A has its lora_B and back, A (r × in) and B (out × r) of one rank r: matrices, or a Conv2d's
    factors A (r, in, kh, kw) and B (out, r, 1, 1)."""
    for key in sorted(state):
        if not key.endswith((A_KEY, B_KEY)):
            continue
        module = key[: -len(A_KEY)]
        a_key, b_key = module + A_KEY, module + B_KEY
        partner = b_key if key == a_key else a_key
        if partner not in state:
            raise PeftrunError(f"'{key}' has no '{partner}' beside it", where=str(where))
        a, b = state[a_key], state[b_key]
        conv = a.dim() == 4 and b.dim() == 4 and tuple(b.shape[2:]) == (1, 1)
        if not (conv or (a.dim() == 2 and b.dim() == 2)) or a.shape[0] != b.shape[1]:
            raise PeftrunError(
                f"'{module}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}: they must be matrices "
                "(r × in) and (out × r) of one rank r",
                where=str(where),
            )


def _check_method(
    method: str, rank: int | None, density: float, svd_clamp: float | None = None, sign_method: str = "total"
) -> None:
    if method not in METHODS:
        raise PeftrunError(
            f"unknown combination method '{method}'",
            hint=did_you_mean(method, METHODS) or f"choose one of {', '.join(METHODS)}",
        )
    if rank is not None and method not in RANKED:
        raise PeftrunError(f"'{method}' sets the rank itself; --rank is for svd, the *_svd and the *_delta methods")
    if rank is not None and rank < 1:
        raise PeftrunError("rank must be at least 1")
    if method in DENSITY and not 0 < density <= 1:
        raise PeftrunError(f"density must lie in (0, 1], got {density}")
    if svd_clamp is not None and method not in SVD_METHODS:
        raise PeftrunError(f"--svd-clamp is for svd and the *_svd methods, not '{method}'")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise PeftrunError(f"svd_clamp is a quantile in [0, 1], got {svd_clamp}")
    if sign_method not in SIGN_METHODS:
        raise PeftrunError(
            f"unknown majority sign method '{sign_method}'", hint=f"choose one of {', '.join(SIGN_METHODS)}"
        )


# ------------------------------------------------------------------ combining


@dataclass
class Settings:
    """How one combination runs: the method, the new rank (None: per module), density, signs, clamp, draws."""

    method: str
    rank: int | None
    density: float
    sign_method: str
    svd_clamp: float | None
    generator: torch.Generator


def _finite(m: torch.Tensor, path: str) -> torch.Tensor:
    if not bool(torch.isfinite(m).all()):  # finite inputs: an overflow of float32, which SVD cannot take
        raise PeftrunError(
            f"the combined update of '{path}' is not finite (it overflowed float32); nothing written",
            hint="use smaller --adapter weights",
        )
    return m


def combine_module(
    parts: list[tuple[torch.Tensor, torch.Tensor, float, float]], how: Settings, path: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one module (`path`, for messages) from its parts (A_i, B_i, s_i, w_i), scaling 1."""
    method, opts = how.method, {"density": how.density, "sign_method": how.sign_method, "generator": how.generator}
    if method == "cat":
        a = torch.cat([w * s * a for a, _, s, w in parts])
        b = torch.cat([b for _, b, _, _ in parts], dim=1)
        pad = (how.rank or a.shape[0]) - a.shape[0]  # peft's rank Σ r_i: zero rows for absent adapters
        return torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    if method in FACTOR_METHODS or method == "linear_factors":
        ranks = {a.shape[0] for a, _, _, _ in parts}
        if len(ranks) > 1:
            raise PeftrunError(
                f"'{method}' needs adapters of one rank, got ranks {sorted(ranks)} at '{path}'",
                hint="use cat, svd or a *_svd method",
            )
    if method == "linear_factors":
        return sum(w * a for a, _, _, w in parts), sum(w * s * b for _, b, s, w in parts)
    if method in FACTOR_METHODS:
        c = [w * s for _, _, s, w in parts]
        root = [abs(x) ** 0.5 for x in c]
        a = merge_tensors(method, [a for a, _, _, _ in parts], [r if x >= 0 else -r for r, x in zip(root, c)], **opts)
        b = merge_tensors(method, [b for _, b, _, _ in parts], root, **opts)
        return a, b
    deltas = [s * (b @ a) for a, b, s, _ in parts]
    weights = [w for _, _, _, w in parts]
    k = how.rank or max(a.shape[0] for a, _, _, _ in parts)
    if method in SVD_METHODS:
        kind = "linear" if method == "svd" else method.removesuffix("_svd")
        m = _finite(merge_tensors(kind, deltas, weights, **opts), path)
        return truncate_like_peft(m, k, how.svd_clamp)
    if method == "ties_delta":
        m = ties_merge(deltas, weights, how.density)
    elif method == "dare_linear_delta":
        m = sum(w * dare_drop(d, how.density, how.generator) for w, d in zip(weights, deltas))
    else:  # dare_ties_delta
        m = elect_and_merge([w * dare_drop(d, how.density, how.generator) for w, d in zip(weights, deltas)])
    return truncate_svd(_finite(m, path), k)


def new_rank(sources: list[Source], method: str, rank: int | None) -> int | None:
    """The result's rank as peft sets it (Σ for cat, the common r for the factor methods, --rank or the
    largest for the *_svd ones); --rank or None (each module's largest) for peftrun's own methods."""
    ranks = [adapter_rank(src.config) for src in sources]
    if method == "cat":
        return sum(ranks)
    if method in FACTOR_METHODS:
        if len(set(ranks)) > 1:
            raise PeftrunError(
                f"'{method}' needs adapters of one rank, got ranks {ranks}", hint="use cat, svd or a *_svd method"
            )
        return ranks[0]
    if method in SVD_METHODS:
        return rank or max(ranks)
    return rank


def combine_states(
    sources: list[Source],
    method: str,
    *,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """The combined state dict (peft keys), each module's rank, and the max relative distance from Σ w ΔW."""
    _check_method(method, rank, density, svd_clamp, majority_sign_method)
    if len(sources) == 1 and method in PEFT_METHODS:
        method = "linear"  # as peft does with one adapter
    factors = [src.factors() for src in sources]
    modules = sorted({path for f in factors for path in f}, key=module_order)
    generator = torch.Generator().manual_seed(seed)
    how = Settings(method, new_rank(sources, method, rank), density, majority_sign_method, svd_clamp, generator)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    distance = 0.0
    for path in modules:
        parts = [(*f[path], src.weight) for f, src in zip(factors, sources) if path in f]
        shapes = {(b.shape[0], a.shape[1]) for a, b, _, _ in parts}
        if len(shapes) > 1:
            raise PeftrunError(f"module '{path}' has different shapes across the adapters: {sorted(shapes)}")
        if method == "linear_factors" and len(parts) < len(sources):
            a0, b0 = parts[0][0], parts[0][1]  # an adapter without this module adds zero factors
            parts += [(torch.zeros_like(a0), torch.zeros_like(b0), 1.0, 0.0)] * (len(sources) - len(parts))
        a, b = combine_module(parts, how, path=path)
        kernel = next(src.kernel(path) for f, src in zip(factors, sources) if path in f)
        if kernel:  # back to Conv2d factors: A (k, in, kh, kw), B (out, k, 1, 1)
            a, b = a.reshape(a.shape[0], -1, *kernel), b.reshape(*b.shape, 1, 1)
        state[f"{PREFIX}{path}{A_KEY}"] = a.contiguous()
        state[f"{PREFIX}{path}{B_KEY}"] = b.contiguous()
        ranks[path] = a.shape[0]
        target = sum(w * s * (bi @ ai) for ai, bi, s, w in parts)
        norm = torch.linalg.norm(target)
        if norm > 0:
            distance = max(distance, (torch.linalg.norm(b.flatten(1) @ a.flatten(1) - target) / norm).item())
    state.update(_other_tensors(sources))
    return state, ranks, distance


def _other_tensors(sources: list[Source]) -> dict[str, torch.Tensor]:
    """Σ w_i T_i for tensors that are not LoRA factors (heads under modules_to_save, trained biases)."""
    keys = [{k for k in src.state if not k.endswith((A_KEY, B_KEY))} for src in sources]
    union = set().union(*keys)
    partial = sorted(union - set.intersection(*keys))
    if partial:
        raise PeftrunError(
            f"'{partial[0]}' (a trained head or bias) is in only some of the adapters; they cannot be combined"
        )
    for key in sorted(union):
        shapes = {tuple(src.state[key].shape) for src in sources}
        if len(shapes) > 1:
            raise PeftrunError(
                f"'{key}' (a trained head or bias) has different shapes across the adapters: {sorted(shapes)}",
                hint="combine adapters trained on the same base model for the same task",
            )
    return {k: sum(src.weight * src.state[k].float() for src in sources).contiguous() for k in sorted(union)}


def combined_config(sources: list[Source], ranks: dict[str, int]) -> dict[str, Any]:
    """adapter_config.json of the result: LoRA with scaling 1 everywhere, rank_pattern where ranks differ."""
    config = dict(sources[0].config)
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {path: k for path, k in ranks.items() if k != r}
    config.update(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
        init_lora_weights=True,
        inference_mode=True,
        peft_type="LORA",
    )
    if any(src.config.get(f) != config.get(f) for src in sources for f in TARGET_FIELDS):
        # the inputs adapt different modules: name exactly those the result has
        config.update(
            target_modules="(" + "|".join(re.escape(p) for p in ranks) + ")",
            layers_to_transform=None,
            layers_pattern=None,
            exclude_modules=None,
        )
    saved = sorted({m for src in sources for m in (src.config.get("modules_to_save") or [])})
    config["modules_to_save"] = saved or None
    return config


def combine(
    inputs: list[tuple[str | Path, float]],
    output: str | Path,
    *,
    method: str = "cat",
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Combined:
    """Combine LoRA adapters [(folder, weight), ...] into a new adapter folder `output`.

    The output follows io.outputs' policy: never an input or a folder above one, never a protected folder;
    an existing non-empty folder only with `overwrite` and only when peftrun wrote it whole."""
    output = user_path(output)
    inputs = [(user_path(folder), weight) for folder, weight in inputs]
    for folder, _ in inputs:
        if output.resolve() == folder.resolve():
            raise PeftrunError("--output must differ from the input adapters; combining never overwrites one")
    where = f"--output ({output})"
    named_inputs = [(folder, f"the input adapter {folder}") for folder, _ in inputs]
    check_output_folder(output, where=where, inputs=named_inputs, overwrite=overwrite)
    _check_method(method, rank, density, svd_clamp, majority_sign_method)
    sources = read_sources(inputs, allow_pickle=allow_pickle)
    state, ranks, distance = combine_states(
        sources,
        method,
        rank=rank,
        density=density,
        seed=seed,
        majority_sign_method=majority_sign_method,
        svd_clamp=svd_clamp,
    )
    bad = first_non_finite(state)
    if bad is not None:  # finite inputs, finite weights: only an overflow of float32 gets here
        raise PeftrunError(
            f"the combined tensor '{bad}' is not finite (it overflowed float32); nothing written",
            hint="use smaller --adapter weights",
        )
    config = combined_config(sources, ranks)
    provenance = {
        "method": method,
        # peft's meaning of the name (peft.LoraModel.add_weighted_adapter), or peftrun's own formula
        "meaning": "peft add_weighted_adapter" if method in PEFT_METHODS else "peftrun",
        "computed_as": "linear" if len(sources) == 1 and method in PEFT_METHODS else method,
        "rank": rank,
        "density": density,
        "seed": seed,
        "majority_sign_method": majority_sign_method,
        "svd_clamp": svd_clamp,
        "sources": [{"folder": str(src.folder), "weight": src.weight} for src in sources],
        "max_relative_distance_from_weighted_sum": distance,
    }
    with beside_lock(output, command="combine"):
        check_output_folder(output, where=where, inputs=named_inputs, overwrite=overwrite)  # again, under the lock
        with atomic_dir(output) as tmp:
            save_tensors(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(scrub(config), indent=2, sort_keys=True) + "\n")
            (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
            _copy_tokenizer_and_recipe(sources[0].folder, tmp, config)
            write_marker(tmp, "combine")
    return Combined(output, method, ranks, distance, provenance["sources"])


def _copy_tokenizer_and_recipe(source: Path, tmp: Path, config: dict[str, Any]) -> None:
    """The first input's tokenizer and recipe copy (its model and data sections), with the new method."""
    if (source / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source, trust_remote_code=False).save_pretrained(tmp)
    recipe = read_recipe_copy(source)
    if isinstance(recipe, dict) and recipe:
        if isinstance(recipe.get("model"), dict):
            # what an adapter folder may never decide (io.loading): not carried into the new adapter
            recipe["model"] = {k: v for k, v in recipe["model"].items() if k not in CALLER_ONLY}
        fields = {k: config[k] for k in LoraConfig.model_fields if k in config and k != "inference_mode"}
        recipe["method"] = {"name": "lora", **fields}
        (tmp / RECIPE_COPY).write_text(yaml.safe_dump(scrub(recipe), sort_keys=False))
