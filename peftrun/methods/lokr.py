r"""LoKr (Yeh et al., 2023, LyCORIS): a Kronecker-product update.

Factor the layer's sizes as out = a·b and in = c·d (`factorize`, with a <= b and c <= d). LoKr learns

    ΔW = W1 ⊗ W2 · alpha / r,    W1 ∈ R^{a×c},  W2 ∈ R^{b×d},
    y  = W x + b + ΔW x.

W2 becomes low rank, W2 = W2a W2b (rank r), when r < max(b, d) / 2; with decompose_both W1 does too
(W1 = W1a W1b) when r < max(a, c) / 2. init_weights: True zeroes W1 (or W1a) so training starts from the
base; "lycoris" zeroes W2 (or W2b) instead; False keeps every factor random. rank_dropout (rescaled by
1 / mean(mask) with rank_dropout_scale) and module_dropout as in `lycoris.py`. peft keys: `lokr_w1`,
`lokr_w2`, or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2_a`/`lokr_w2_b`. Merge: W <- W + ΔW.

On a Conv2d (out, in, kh, kw) the kernel goes with W2: a full W2 ∈ R^{b×d×kh×kw} (W1 broadcast over the
kernel), or low rank W2 = W2a W2b with W2b ∈ R^{r×d·kh·kw}, or with use_effective_conv2d (kernel over
1x1) W2 = T2 ×₁ W2a ×₂ W2b from a core T2 ∈ R^{r×r×kh×kw}, W2a ∈ R^{r×b}, W2b ∈ R^{r×d} (peft key `lokr_t2`).
"""

from __future__ import annotations

import torch
from torch import nn

from peftrun.methods.configs import SPECS, LoKrConfig
from peftrun.methods.inject import Injected
from peftrun.methods.lycoris import LycorisLayer, apply_lycoris


def factorize(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into m·n, the factor sizes LoKr uses (peft's rule, so checkpoints agree).

    A positive `factor` that divides the dimension is taken as is: (factor, dimension // factor).
    Otherwise walk up the divisors of `dimension` while the smaller side stays the smaller one and no
    larger than `factor` (no limit for -1): the most balanced split the limit allows, smaller side first.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for divisor in range(2, dimension + 1):
        if m >= dimension // m:
            break
        if dimension % divisor:
            continue
        if divisor > limit:
            break
        m = divisor
    n = dimension // m
    return (m, n) if m <= n else (n, m)


class LoKrLayer(LycorisLayer):
    adapter_attrs = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module, name: str = ""):
        super().__init__(base_layer, name)
        for attr in self.adapter_attrs:
            setattr(self, attr, nn.ParameterDict())
        self.rescale: dict[str, bool] = {}

    def create_factors(self, name: str, config: LoKrConfig) -> None:
        r = self.r[name]
        a, b = factorize(self.out_features, config.decompose_factor)
        c, d = factorize(self.in_features, config.decompose_factor)
        self.rescale[name] = config.rank_dropout_scale
        zero_w1 = config.init_weights is True
        zero_w2 = config.init_weights == "lycoris"
        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a[name] = self.new_factor(a, r, zero=zero_w1)
            self.lokr_w1_b[name] = self.new_factor(r, c)
        else:
            self.lokr_w1[name] = self.new_factor(a, c, zero=zero_w1)
        kh, kw = self.kernel
        if r >= max(b, d) / 2:
            kernel = (kh, kw) if self.is_conv else ()
            self.lokr_w2[name] = self.new_factor(b, d, *kernel, zero=zero_w2)
        elif self.effective_conv2d(config):
            self.lokr_t2[name] = self.new_factor(r, r, kh, kw)
            self.lokr_w2_a[name] = self.new_factor(r, b)
            self.lokr_w2_b[name] = self.new_factor(r, d, zero=zero_w2)
        else:
            self.lokr_w2_a[name] = self.new_factor(b, r)
            self.lokr_w2_b[name] = self.new_factor(r, d * kh * kw, zero=zero_w2)

    def _factor(self, name: str, which: str) -> torch.Tensor:
        full = getattr(self, f"lokr_{which}")
        if name in full:
            return full[name]
        return getattr(self, f"lokr_{which}_a")[name] @ getattr(self, f"lokr_{which}_b")[name]

    def make_delta(self, name: str) -> torch.Tensor:
        w1 = self._factor(name, "w1")
        if name in self.lokr_t2:  # the CP form of W2: (b, d, kh, kw)
            w2 = torch.einsum("abkl,ao,bi->oikl", self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self._factor(name, "w2")
        if w2.dim() == 4:  # a kernel-shaped W2: W1 repeats over the kernel positions
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)

    def rescales_rank_dropout(self, name: str) -> bool:
        return self.rescale[name]


def apply(peft_model, config: LoKrConfig, adapter_name: str) -> Injected:
    return apply_lycoris(peft_model, config, adapter_name, LoKrLayer, "lokr")


METHOD = SPECS["lokr"].implement(apply=apply)
