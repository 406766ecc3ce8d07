"""A Stable Diffusion pipeline's modules as one nn.Module, from a pipeline folder or the bundled configs.

Training calls `Components.forward(pixel_values, input_ids)`: the VAE encodes the images to latents
(scaled by the VAE's scaling_factor), noise is added at uniformly drawn timesteps by the DDPM schedule
of the pipeline's scheduler config, the text encoder encodes the prompts and the UNet predicts the noise
(or the velocity, for v-prediction schedulers). It returns (prediction, target); the objective takes the
mean squared error. The draws use torch's global generator, so a resumed run draws what an uninterrupted
one would.
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import torch
from torch import nn

from peftrun.errors import PeftrunError
from peftrun.models import BUNDLED_CONFIGS, DTYPES, resolve_model_path


def pipeline_folder(name: str) -> tuple[Path, bool]:
    """(folder, bundled): a local pipeline folder, the hub cache's snapshot, or the bundled configs (no weights)."""
    path = Path(resolve_model_path(name)).expanduser()
    if (path / "model_index.json").is_file():
        return path, False
    bundled = BUNDLED_CONFIGS / name.replace("/", "--")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.txt", "*.safetensors"])), False
    except Exception as exc:  # offline, unknown id, no network: the bundled configs where there are some
        if (bundled / "model_index.json").is_file():
            return bundled, True
        raise PeftrunError(
            f"'{name}' is no diffusers pipeline folder (model_index.json) and cannot be fetched: "
            f"{str(exc).splitlines()[0][:160]}",
            where="model.name_or_path",
            hint="give a local Stable Diffusion pipeline folder (unet/, text_encoder/, vae/, tokenizer/, scheduler/)",
        ) from None


def bundled_pipeline(name: str) -> Path | None:
    folder = BUNDLED_CONFIGS / name.replace("/", "--")
    return folder if (folder / "model_index.json").is_file() else None


def _scheduler_config(folder: Path) -> dict:
    file = folder / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise PeftrunError("no scheduler/scheduler_config.json in the pipeline folder", where=str(folder))
    return json.loads(file.read_text())


class Components(nn.Module):
    """unet, text_encoder, vae (frozen) and the noise schedule; `config.model_type` names it for messages."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module, scheduler_config: dict, source: str):
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.scheduler_config = dict(scheduler_config)
        with _quiet():
            self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.config = types.SimpleNamespace(model_type="stable-diffusion", name_or_path=source)
        self.train_text_encoder = False
        self.noise_offset = 0.0
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_text_encoder):
            return self.text_encoder(input_ids)[0]

    @torch.no_grad()
    def latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return dist.sample() * self.vae.config.scaling_factor

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.latents(pixel_values)
        noise = torch.randn_like(latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
        sched = self.noise_scheduler
        steps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = sched.add_noise(latents, noise, steps)
        hidden = self.encode_prompt(input_ids)
        prediction = self.unet(noisy, steps, hidden.to(self.dtype)).sample
        kind = sched.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = sched.get_velocity(latents, noise, steps)
        else:
            raise PeftrunError(f"the scheduler's prediction_type '{kind}' is not one DreamBooth trains")
        return prediction, target


@contextlib.contextmanager
def _quiet():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_components(model_cfg, *, meta: bool = False) -> Components:
    """The pipeline's modules in the recipe's dtype: weights from the folder, or random (model.random_init)
    or none at all (meta) from its configs, as for the bundled SD v1-4."""
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ImportError:
        raise PeftrunError(
            "TEXT_TO_IMAGE needs diffusers", hint="pip install 'peftrun[diffusion]' (diffusers>=0.30)"
        ) from None
    from transformers import CLIPTextConfig, CLIPTextModel

    from peftrun.models import quiet_transformers

    name = model_cfg.name_or_path
    bundled = bundled_pipeline(name)
    if (meta or model_cfg.random_init) and bundled is not None and not Path(name).exists():
        folder, from_config = bundled, True
    else:
        folder, from_config = pipeline_folder(name)
        from_config = from_config or meta or model_cfg.random_init
    dtype = DTYPES[model_cfg.dtype]
    device = torch.device("meta") if meta else contextlib.nullcontext()
    with _quiet(), quiet_transformers():
        if from_config:
            with device:
                unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
                text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
            unet, vae, text = unet.to(dtype), vae.to(dtype), text.to(dtype)
        else:
            kw = {"torch_dtype": dtype}
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
            text = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
    return Components(unet, text, vae, _scheduler_config(folder), name)


def load_tokenizer(model_cfg):
    """The pipeline's CLIP tokenizer (tokenizer/), or model.tokenizer where the recipe names another folder."""
    from transformers import AutoTokenizer

    if model_cfg.tokenizer:
        path = Path(resolve_model_path(model_cfg.tokenizer))
    else:
        name = model_cfg.name_or_path
        folder = bundled_pipeline(name) if model_cfg.random_init and not Path(name).exists() else None
        path = (folder or pipeline_folder(name)[0]) / "tokenizer"
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise PeftrunError(
            f"the pipeline's tokenizer cannot be loaded: {str(exc).splitlines()[0][:160]}",
            where="model.tokenizer" if model_cfg.tokenizer else "model.name_or_path",
            hint="the bundled configs hold no vocabulary: set model.tokenizer to a CLIP tokenizer folder",
        ) from None


def enable_checkpointing(components: Components) -> None:
    """Gradient checkpointing in the UNet (and the text encoder when it trains): recompute, not store."""
    components.unet.enable_gradient_checkpointing()
    if components.train_text_encoder:
        components.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
