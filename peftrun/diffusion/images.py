"""Images from a pipeline with adapters: sampling (one adapter, or several with weights), DreamBooth's class
images for prior preservation, and folding adapters into a whole pipeline folder diffusers loads as is."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from peftrun.errors import PeftrunError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def diffusers_pipeline(components, tokenizer):
    """diffusers' StableDiffusionPipeline over our modules (adapters inside them act), no safety checker."""
    import diffusers

    config = dict(components.scheduler_config)
    scheduler_cls = getattr(diffusers, str(config.get("_class_name", "DDPMScheduler")), diffusers.DDPMScheduler)
    from peftrun.diffusion.components import _quiet

    with _quiet():
        scheduler = scheduler_cls.from_config(config)
        pipe = diffusers.StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=tokenizer, unet=components.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_size(components) -> int:
    return int(components.unet.config.sample_size) * 2 ** (len(components.vae.config.block_out_channels) - 1)


@torch.no_grad()
def sample(
    components, tokenizer, prompts: list[str], *, steps: int = 50, guidance_scale: float = 7.5,
    seed: int | None = None, height: int | None = None, width: int | None = None,
    negative_prompt: str | None = None,
):
    """PIL images, one per prompt; with a seed the same call gives the same pixels."""
    for side in (height, width):
        if side is not None and (side < 8 or side % 8):
            raise PeftrunError(f"image sides must be multiples of 8 (got {side})", where="--size")
    pipe = diffusers_pipeline(components, tokenizer)
    device = next(components.unet.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    size = default_size(components)
    was_training = components.training
    components.eval()
    try:
        return pipe(
            prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
            height=height or size, width=width or size, negative_prompt=negative_prompt and [negative_prompt] * len(prompts),
        ).images
    finally:
        components.train(was_training)


def make_class_images(components, tokenizer, dreambooth, *, say=print, device=None) -> int:
    """Fill class_data_dir up to num_class_images with the base pipeline's images of class_prompt (as
    DreamBooth's prior preservation asks); returns how many were made. Named by content hash, as the
    DreamBooth scripts do, seeded by their index so a rerun makes the same ones."""
    folder = Path(dreambooth.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = len(image_files(folder))
    missing = dreambooth.num_class_images - have
    if missing <= 0:
        return 0
    say(f"generating {missing} class images of '{dreambooth.class_prompt}' into {folder} with the base pipeline")
    if device is not None:
        components.to(device)
    size = dreambooth.resolution
    done = 0
    while done < missing:
        n = min(dreambooth.sample_batch_size, missing - done)
        images = sample(
            components, tokenizer, [dreambooth.class_prompt] * n, steps=dreambooth.class_inference_steps,
            seed=have + done, height=size, width=size,
        )
        for i, image in enumerate(images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
            image.save(folder / f"{have + done + i:05d}-{digest}.png")
        done += n
    return missing


def merge_to_pipeline(adapter: str | Path, output: str | Path, *, base: str | None = None) -> tuple[Path, float]:
    """Fold a DreamBooth adapter into its base pipeline and write the whole pipeline folder (diffusers'
    StableDiffusionPipeline.from_pretrained loads it); returns (folder, max |merged - unmerged| of the
    noise prediction on a probe input)."""
    from peftrun.io.atomic import atomic_dir

    model, tokenizer = load_with_adapters(base, {"default": Path(adapter)})
    unet = model.model.unet
    g = torch.Generator().manual_seed(0)
    channels, side = unet.config.in_channels, int(unet.config.sample_size)
    latents = torch.randn(1, channels, side, side, generator=g)
    ids = tokenizer(["a photo"], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    step = torch.tensor([500])

    @torch.no_grad()
    def probe(components) -> torch.Tensor:
        components.eval()
        hidden = components.text_encoder(ids)[0]
        return components.unet(latents, step, hidden).sample

    before = probe(model.model)
    components = model.merge_and_unload()
    diff = (probe(components) - before).abs().max().item()
    with atomic_dir(output) as tmp:
        diffusers_pipeline(components, tokenizer).save_pretrained(tmp, safe_serialization=True)
    return Path(output), diff


def load_with_adapters(base: str | None, adapters: dict[str, Path], *, dtype: str = "float32", allow_pickle=False):
    """(DiffusionPeftModel, tokenizer): the base pipeline (the one the first adapter names unless `base`)
    with each DreamBooth adapter folder loaded under its name."""
    import json

    from peftrun.diffusion.adapted import DiffusionPeftModel
    from peftrun.diffusion.components import load_components, load_tokenizer
    from peftrun.recipe import ModelSection

    if not adapters and not base:
        raise PeftrunError("give --adapter DIR (a DreamBooth adapter folder) or --base PIPELINE")
    if base is None:
        first = next(iter(adapters.values()))
        base = json.loads((first / "unet" / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise PeftrunError("the adapter names no base pipeline", where=str(first), hint="pass --base PIPELINE")
    section = ModelSection(name_or_path=base, task_type="TEXT_TO_IMAGE", dtype=dtype)
    model = DiffusionPeftModel(load_components(section))
    for name, folder in adapters.items():
        model.load_adapter(folder, name, allow_pickle=allow_pickle)
    if adapters:
        model.set_adapter(next(iter(adapters)))
    return model, load_tokenizer(section)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """"512" -> (512, 512); "512x768" -> (height 512, width 768); None -> the pipeline's own size."""
    if not size:
        return None, None
    head, sep, tail = size.lower().partition("x")
    try:
        height = int(head)
        width = int(tail) if sep else height
    except ValueError:
        raise PeftrunError(f"--size takes N or HxW, e.g. 512 or 512x768 (got '{size}')", where="--size") from None
    return height, width


def image_command(
    prompt: str, adapters: list[str], output: str | Path, *, base: str | None = None, use: str | None = None,
    no_adapter: bool = False, steps: int = 50, guidance_scale: float = 7.5, seed: int | None = None,
    size: str | None = None, dtype: str | None = None, allow_pickle: bool = False,
) -> Path:
    """`peftrun generate` for TEXT_TO_IMAGE: one PNG of `prompt`. Adapters are DreamBooth folders
    (DIR, name=DIR, DIR:weight); with several, or any weight, they act together, each update scaled by
    its weight (default 1); --use picks one of them alone; --no-adapter the base pipeline."""
    from peftrun.api import parse_adapter_spec

    named: dict[str, Path] = {}
    weights: dict[str, float] = {}
    for spec in adapters or []:
        name, folder, weight = parse_adapter_spec(spec, with_weight=True)
        name = name or ("default" if len(adapters) == 1 else Path(folder).name)
        if name in named:
            raise PeftrunError(f"two adapters are named '{name}'", hint="name them: --adapter a=DIR --adapter b=DIR")
        named[name], weights[name] = Path(folder), 1.0 if weight is None else weight
    if use is not None and use not in named:
        raise PeftrunError(f"no adapter named '{use}' to use", hint=f"given: {', '.join(named) or 'none'}")
    height, width = parse_size(size)
    model, tokenizer = load_with_adapters(base, named, dtype=dtype or "float32", allow_pickle=allow_pickle)
    if torch.cuda.is_available():
        model.to("cuda")
    if use is not None:
        model.set_adapter(use)
    elif len(named) > 1 or any(w != 1.0 for w in weights.values()):
        model.set_weighted(weights)
    components = model.model
    if no_adapter:
        with model.disable_adapters():
            image = sample(components, tokenizer, [prompt], steps=steps, guidance_scale=guidance_scale, seed=seed,
                           height=height, width=width)[0]
    else:
        image = sample(components, tokenizer, [prompt], steps=steps, guidance_scale=guidance_scale, seed=seed,
                       height=height, width=width)[0]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    image.save(tmp, format="PNG")
    tmp.replace(output)
    return output
