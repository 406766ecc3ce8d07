"""Full fine-tuning: every parameter of the base model trains (the encoder and the task head alike); nothing
is added. Not a PEFT method: the baseline an adapter is compared with, from the same recipe, data
pipeline and loop (`method: {name: full}`).

What is saved is the whole model: adapter_model.safetensors holds every tensor of the model's state dict
under peft's key names (`base_model.model.<name>`), and adapter_config.json says `peft_type: FULL`. peftrun's
eval, predict, generate and resume read the folder like any adapter's; peft itself has no FULL type, so
for other tools `peftrun merge` writes the trained model out as a plain transformers folder (merging has
nothing to fold in: the model is the result).
"""

from __future__ import annotations

import torch

from peftrun.errors import PeftrunError
from peftrun.methods.configs import SPECS, FullConfig

KEY_PREFIX = "base_model.model."


def apply(peft_model, config: FullConfig, name: str) -> None:
    if peft_model.configs:
        raise PeftrunError(
            "full fine-tuning trains the base model itself and cannot sit beside other adapters",
            where="method.name",
        )
    for param in peft_model.model.parameters():
        param.requires_grad_(True)


def state(peft_model, name: str) -> dict[str, torch.Tensor]:
    """The whole model's state (parameters and persistent buffers), under peft-style keys."""
    return {KEY_PREFIX + key: value for key, value in peft_model.model.state_dict(keep_vars=True).items()}


def load_state(peft_model, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a saved whole model in; consumes its keys. Refuses a state that is not this model's, in one line."""
    own = peft_model.model.state_dict()
    saved = {key.removeprefix(KEY_PREFIX): tensors.pop(key) for key in list(tensors) if key.startswith(KEY_PREFIX)}
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    wrong = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        detail = (wrong and "shapes differ: " + "; ".join(wrong[:3])) or (
            missing and f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}"
        ) or f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}"
        raise PeftrunError(
            f"the saved fully fine-tuned model does not fit this base model: {detail}",
            hint="check that the recipe's model.name_or_path is the model that was fine-tuned",
        )
    peft_model.model.load_state_dict(saved, strict=True)


METHOD = SPECS["full"].implement(apply=apply, state=state, load_state=load_state)
