r"""LoHa (Hyeon-Woo et al., 2022, FedPara): a low-rank Hadamard-product update.

For a frozen layer y = W x + b, LoHa learns

    ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r,    W1a, W2a ∈ R^{out×r},  W1b, W2b ∈ R^{r×in},
    y  = W x + b + ΔW x,

whose rank can reach r² with the parameters of two rank-r LoRAs. With init_weights (the default) W2b = 0,
so training starts from the base model; the other factors are He-uniform. rank_dropout and module_dropout
as in `lycoris.py`. peft keys: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`. Merge: W <- W + ΔW.

On a Conv2d the b factors span in·kh·kw; with use_effective_conv2d (kernel over 1x1) each product is
a CP decomposition instead, W1 = T1 ×₁ W1a ×₂ W1b with a core T1 ∈ R^{r×r×kh×kw}, W1a ∈ R^{r×out},
W1b ∈ R^{r×in} (peft keys `hada_t1`, `hada_t2`).
"""

from __future__ import annotations

import torch
from torch import nn

from peftrun.methods.configs import SPECS, LoHaConfig
from peftrun.methods.inject import Injected
from peftrun.methods.lycoris import LycorisLayer, apply_lycoris


class LoHaLayer(LycorisLayer):
    adapter_attrs = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module, name: str = ""):
        super().__init__(base_layer, name)
        for attr in self.adapter_attrs:
            setattr(self, attr, nn.ParameterDict())

    def create_factors(self, name: str, config: LoHaConfig) -> None:
        r, out_f, in_f = self.r[name], self.out_features, self.in_features
        if self.effective_conv2d(config):
            kh, kw = self.kernel
            self.hada_t1[name] = self.new_factor(r, r, kh, kw)
            self.hada_w1_a[name] = self.new_factor(r, out_f)
            self.hada_w1_b[name] = self.new_factor(r, in_f)
            self.hada_t2[name] = self.new_factor(r, r, kh, kw)
            self.hada_w2_a[name] = self.new_factor(r, out_f)
            self.hada_w2_b[name] = self.new_factor(r, in_f, zero=config.init_weights)
            return
        in_f *= self.kernel[0] * self.kernel[1]
        self.hada_w1_a[name] = self.new_factor(out_f, r)
        self.hada_w1_b[name] = self.new_factor(r, in_f)
        self.hada_w2_a[name] = self.new_factor(out_f, r)
        self.hada_w2_b[name] = self.new_factor(r, in_f, zero=config.init_weights)

    def make_delta(self, name: str) -> torch.Tensor:
        if name in self.hada_t1:  # the CP form: (out, in, kh, kw) = core ×₁ a ×₂ b, per factor
            w1 = torch.einsum("abkl,ao,bi->oikl", self.hada_t1[name], self.hada_w1_a[name], self.hada_w1_b[name])
            w2 = torch.einsum("abkl,ao,bi->oikl", self.hada_t2[name], self.hada_w2_a[name], self.hada_w2_b[name])
            return w1 * w2
        w1 = self.hada_w1_a[name] @ self.hada_w1_b[name]
        w2 = self.hada_w2_a[name] @ self.hada_w2_b[name]
        return w1 * w2


def apply(peft_model, config: LoHaConfig, adapter_name: str) -> Injected:
    return apply_lycoris(peft_model, config, adapter_name, LoHaLayer, "loha")


METHOD = SPECS["loha"].implement(apply=apply)
