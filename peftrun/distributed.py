"""The Accelerator for a recipe: processes, precision, DeepSpeed/FSDP plugins, the CPU process group."""

from __future__ import annotations

import os

import torch


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(recipe):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    handlers = []
    if not torch.cuda.is_available() and world_size_from_env() > 1:
        # CPU ranks talk over gloo; Accelerate would otherwise ask for a backend CPUs lack.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        gradient_accumulation_steps=recipe.training.gradient_accumulation_steps,
        mixed_precision=recipe.training.mixed_precision,
        kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
