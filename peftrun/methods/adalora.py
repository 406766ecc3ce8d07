r"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form with a rank budget moved to where it matters.

Each adapted layer y = W x + b learns

    y = W x + b + (lora_alpha / ranknum) · P Λ Q dropout(x),
        Q = lora_A ∈ R^{r×in},  Λ = diag(lora_E), lora_E ∈ R^{r×1},  P = lora_B ∈ R^{out×r},

with r = init_r and ranknum = init_r (plus peft's 1e-5) fixed, so pruning a triplet never rescales the rest.
Λ starts at zero, so the adapted model starts equal to the base.

The rank allocator runs after every optimizer step (gradients still present). For every entry w of P, Λ, Q:

    I = |w · ∂L/∂w|,   Ī ← β1 Ī + (1-β1) I,   Ū ← β2 Ū + (1-β2) |I - Ī|,   s(w) = Ī · Ū

and triplet i of a layer scores S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij). The total budget b(t) (kept
triplets, all layers) follows a cubic schedule from b0 = Σ init_r to b_T = target_r · #layers:

    b(t) = b0                                                  t <= tinit
         = b_T + (b0 - b_T) (1 - (t - tinit) / (T - tfinal - tinit))^3   tinit < t <= T - tfinal
         = b_T                                                  afterwards,   T = total_step,

and every deltaT steps the λ_i outside the top b(t) scores are set to zero. At t = T - tfinal the final
pattern is fixed and re-applied after each later step; it is saved as `rank_pattern` (a list of kept flags
per `<module>.lora_E`) and the saved tensors keep only those triplets, as peft does.

The loss gains orth_reg_weight · R with R the mean over adapted matrices of ||P^T P - I||_F and ||Q Q^T - I||_F.
The paper writes the sum of squared norms; its authors' code and peft use this mean of plain norms, and so does
peftrun, so that an orth_reg_weight means the same in a config moved across.

Merge: W <- W + (lora_alpha / ranknum) P Λ Q, with the pruned λ already zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftrun.errors import PeftrunError
from peftrun.methods.configs import SPECS, AdaLoraConfig, check_schedule
from peftrun.methods.inject import Injected, inject
from peftrun.methods.layers import AdapterLayer
from peftrun.methods.targets import ADALORA_TARGETS

RANKNUM_EPS = 1e-5  # peft's guard in alpha / (ranknum + eps); kept so outputs agree to the last bit


class AdaLoraLayer(AdapterLayer):
    adapter_attrs = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module, name: str = ""):
        super().__init__(base_layer)
        self.module_name = name
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        # init_r as a frozen parameter: the fixed denominator of the scaling (peft counts it among all params).
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_alpha: dict[str, float] = {}
        self.init_r: dict[str, int] = {}
        # Rows of an init_r-sized adapter that a loaded rank_pattern kept (None: the adapter is init_r wide).
        self.loaded_rows: dict[str, torch.Tensor | None] = {}
        # The allocator's state: which current triplets are kept, and the EMAs (Ī, Ū) per tensor.
        self.keep: dict[str, torch.Tensor] = {}
        self.ema: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def add_adapter(self, name: str, config: AdaLoraConfig) -> None:
        flags = pattern_flags(config.rank_pattern, self.module_name, name)
        if flags is not None and len(flags) != config.init_r:
            raise PeftrunError(
                f"rank_pattern for '{self.module_name}' has {len(flags)} flags but init_r is {config.init_r}",
                where="method.rank_pattern",
            )
        rows = None if flags is None else torch.tensor(flags, dtype=torch.bool).nonzero().view(-1)
        r = config.init_r if rows is None else int(rows.numel())
        kw = self.adapter_tensor_kwargs()
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_E[name] = nn.Parameter(torch.empty(r, 1, **kw))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.ranknum[name] = nn.Parameter(torch.full((1,), float(config.init_r), **kw), requires_grad=False)
        self.lora_dropout[name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.lora_alpha[name] = float(config.lora_alpha)
        self.init_r[name] = config.init_r
        self.loaded_rows[name] = rows
        self.reset(name, config.init_lora_weights)
        self.active_adapters = [name]

    def reset(self, name: str, init: bool | str) -> None:
        if self.lora_A[name].is_meta:
            return
        with torch.no_grad():
            if init:
                nn.init.zeros_(self.lora_E[name])
                nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)
            else:  # a non-zero update from the start, for tests
                for p in (self.lora_A[name], self.lora_E[name], self.lora_B[name]):
                    nn.init.normal_(p)

    def scaling(self, name: str) -> torch.Tensor:
        return self.lora_alpha[name] / (self.ranknum[name] + RANKNUM_EPS)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        return (b @ (a * e)) * self.scaling(name)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        xd = self.lora_dropout[name](x.to(a.dtype))
        update = (xd @ (a * e).T @ b.T) * self.scaling(name)
        return result + update.to(result.dtype)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """peft's keys; after pruning only the kept triplets are written, as peft writes them."""
        state = super().adapter_state(name)
        keep = self.keep.get(name)
        if keep is not None and not bool(keep.all()):
            state = {
                "lora_A": state["lora_A"][keep],
                "lora_E": state["lora_E"][keep],
                "lora_B": state["lora_B"][:, keep],
            }
        return state

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for container in (self.ranknum, self.lora_dropout):
            if name in container:
                del container[name]
        for table in (self.lora_alpha, self.init_r, self.loaded_rows, self.keep, self.ema):
            table.pop(name, None)

    def pattern(self, name: str) -> list[bool]:
        """This layer's init_r flags for `rank_pattern` (a loaded pattern composed with the current mask)."""
        keep = self.keep.get(name)
        if keep is None:
            keep = torch.ones(self.lora_A[name].shape[0], dtype=torch.bool)
        rows = self.loaded_rows.get(name)
        if rows is None:
            return keep.cpu().tolist()
        full = torch.zeros(self.init_r[name], dtype=torch.bool)
        full[rows] = keep.cpu()
        return full.tolist()


def pattern_flags(rank_pattern: dict[str, list[bool]] | None, module: str, adapter: str) -> list[bool] | None:
    if not rank_pattern:
        return None
    for key in (f"{module}.lora_E", f"{module}.lora_E.{adapter}"):
        if key in rank_pattern:
            return list(rank_pattern[key])
    return None


def layers_of(peft_model, name: str) -> list[AdaLoraLayer]:
    return [m for m in peft_model.model.modules() if isinstance(m, AdaLoraLayer) and name in m.lora_A]


# ------------------------------------------------------------------ the rank allocator


def budget_schedule(
    step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int, deltaT: int
) -> tuple[int, bool]:
    """(budget b(step), whether to mask at this step) as in the module docstring."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * remaining**3 + target_budget)
    return budget, step % deltaT == 0


@torch.no_grad()
def update_importance(layer: AdaLoraLayer, name: str, beta1: float, beta2: float) -> bool:
    """Fold this step's sensitivity |w·g| into the EMAs; False when the layer has no gradients."""
    ema = layer.ema.setdefault(name, {})
    seen = False
    for attr in AdaLoraLayer.adapter_attrs:
        p = getattr(layer, attr)[name]
        sensitivity = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
        seen = seen or p.grad is not None
        mean, unc = ema.get(attr, (torch.zeros_like(p), torch.zeros_like(p)))
        mean = beta1 * mean + (1 - beta1) * sensitivity
        unc = beta2 * unc + (1 - beta2) * (sensitivity - mean).abs()
        ema[attr] = (mean, unc)
    return seen


def triplet_scores(layer: AdaLoraLayer, name: str) -> torch.Tensor:
    """S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), one score per triplet of the layer."""
    ema = layer.ema.get(name)
    r = layer.lora_A[name].shape[0]
    if not ema:
        return torch.zeros(r, device=layer.lora_A[name].device)
    score = {attr: mean * unc for attr, (mean, unc) in ema.items()}
    return score["lora_E"].view(-1) + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)


@torch.no_grad()
def mask_to_budget(layers: list[AdaLoraLayer], name: str, budget: int) -> None:
    """Keep the `budget` best-scored triplets over all layers; zero the λ of the others."""
    scores = [triplet_scores(layer, name) for layer in layers]
    flat = torch.cat([s.float().cpu() for s in scores]) if scores else torch.zeros(0)
    keep_flat = torch.zeros(flat.numel(), dtype=torch.bool)
    keep_flat[torch.topk(flat, k=min(max(budget, 0), flat.numel())).indices] = True
    start = 0
    for layer, s in zip(layers, scores):
        keep = keep_flat[start : start + s.numel()]
        start += s.numel()
        layer.keep[name] = keep.to(layer.lora_E[name].device)
        layer.lora_E[name].masked_fill_(~layer.keep[name].view(-1, 1), 0.0)


@torch.no_grad()
def reapply_masks(layers: list[AdaLoraLayer], name: str) -> None:
    for layer in layers:
        if name in layer.keep:
            layer.lora_E[name].masked_fill_(~layer.keep[name].view(-1, 1), 0.0)


def rank_pattern(peft_model, name: str) -> dict[str, list[bool]]:
    return {f"{layer.module_name}.lora_E": layer.pattern(name) for layer in layers_of(peft_model, name)}


def after_step(peft_model, name: str, step: int, total_steps: int) -> None:
    """Called after each optimizer step, before the gradients are cleared: update scores, mask to budget."""
    config: AdaLoraConfig = peft_model.configs[name]
    if config.total_step is None:
        config.total_step = total_steps  # saved with the adapter: peft needs it to rebuild the config
    try:
        check_schedule(config.tinit, config.tfinal, config.total_step)
    except ValueError as exc:
        raise PeftrunError(
            str(exc), where="method.total_step", hint="lower tinit/tfinal or train longer"
        ) from None
    layers = layers_of(peft_model, name)
    if not layers:
        return
    final_step = config.total_step - config.tfinal
    if step > final_step:
        reapply_masks(layers, name)
        return
    if step < final_step:
        seen = [update_importance(layer, name, config.beta1, config.beta2) for layer in layers]
        if not any(seen):
            raise PeftrunError(
                "AdaLoRA's rank allocator found no gradients on its adapter after the optimizer step",
                hint="AdaLoRA needs the full gradients in each process (DeepSpeed ZeRO partitions them)",
            )
    budget, mask_now = budget_schedule(
        step,
        init_budget=sum(layer.lora_A[name].shape[0] for layer in layers),
        target_budget=config.target_r * len(layers),
        tinit=config.tinit,
        tfinal=config.tfinal,
        total_step=config.total_step,
        deltaT=config.deltaT,
    )
    if mask_now or step == final_step:
        mask_to_budget(layers, name, budget)
        config.rank_pattern = rank_pattern(peft_model, name)
    if step == final_step:
        for layer in layers:
            layer.ema.pop(name, None)


def resume_state(peft_model, name: str) -> dict[str, torch.Tensor]:
    """The allocator's state for a resume checkpoint: each layer's kept-triplet mask and importance EMAs."""
    state = {}
    for layer in layers_of(peft_model, name):
        if name in layer.keep:
            state[f"{layer.module_name}.keep"] = layer.keep[name]
        for attr, (mean, unc) in layer.ema.get(name, {}).items():
            state[f"{layer.module_name}.{attr}.ema_mean"] = mean
            state[f"{layer.module_name}.{attr}.ema_uncertainty"] = unc
    return state


def load_resume_state(peft_model, name: str, state: dict[str, torch.Tensor]) -> None:
    for layer in layers_of(peft_model, name):
        device = layer.lora_E[name].device
        keep = state.get(f"{layer.module_name}.keep")
        if keep is not None:
            layer.keep[name] = keep.to(device)
        ema = {
            attr: (
                state[f"{layer.module_name}.{attr}.ema_mean"].to(device),
                state[f"{layer.module_name}.{attr}.ema_uncertainty"].to(device),
            )
            for attr in AdaLoraLayer.adapter_attrs
            if f"{layer.module_name}.{attr}.ema_mean" in state
        }
        if ema:
            layer.ema[name] = ema
    if any(name in layer.keep for layer in layers_of(peft_model, name)):
        peft_model.configs[name].rank_pattern = rank_pattern(peft_model, name)


def orthogonal_regulariser(peft_model, name: str) -> torch.Tensor:
    """R = mean over adapted matrices of ||Q Q^T - I||_F and ||P^T P - I||_F."""
    norms = []
    for layer in layers_of(peft_model, name):
        for gram in (layer.lora_A[name] @ layer.lora_A[name].T, layer.lora_B[name].T @ layer.lora_B[name]):
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            norms.append(torch.linalg.matrix_norm(gram - eye, ord="fro"))
    if not norms:
        return torch.zeros(())
    return torch.stack(norms).mean()


def extra_loss(peft_model, name: str) -> Any:
    weight = peft_model.configs[name].orth_reg_weight
    return weight * orthogonal_regulariser(peft_model, name) if weight > 0 else 0.0


# ------------------------------------------------------------------ loading


def load_state(peft_model, name: str, state: dict[str, torch.Tensor]) -> None:
    """Refuse, with the reason, a pruned checkpoint offered to full-size layers (its rank_pattern was not used)."""
    prefix = peft_model.key_prefix(name)
    for layer in layers_of(peft_model, name):
        saved = state.get(f"{prefix}{layer.module_name}.lora_E")
        rows = layer.lora_E[name].shape[0]
        if saved is not None and saved.shape[0] < rows and layer.loaded_rows.get(name) is None:
            raise PeftrunError(
                f"this AdaLoRA checkpoint keeps {saved.shape[0]} of {rows} triplets at '{layer.module_name}': it was "
                "pruned to its rank_pattern, which the model being loaded was not built with",
                hint="load it with its adapter_config.json (peftrun eval/merge --adapter)",
            )


# ------------------------------------------------------------------ applying


def apply(peft_model, config: AdaLoraConfig, adapter_name: str) -> Injected:
    def check(names):
        keys = {f"{n}.lora_E" for n in names} | {f"{n}.lora_E.{adapter_name}" for n in names}
        unknown = sorted(set(config.rank_pattern or {}) - keys)
        if unknown:
            raise PeftrunError(
                f"rank_pattern names {len(unknown)} module(s) that are not adapted, e.g. {unknown[0]}",
                where="method.rank_pattern",
                hint="the keys are '<module path>.lora_E' of the adapted modules",
            )

    return inject(
        peft_model,
        config,
        adapter_name,
        method="adalora",
        layer=AdaLoraLayer,
        targets=ADALORA_TARGETS,
        bias=config.bias,
        check=check,
    )


METHOD = SPECS["adalora"].implement(
    apply=apply,
    load_state=load_state,
    extra_loss=extra_loss,
    after_step=after_step,
    resume_state=resume_state,
    load_resume_state=load_resume_state,
)
