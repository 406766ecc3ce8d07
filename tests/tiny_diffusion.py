"""Tiny Stable Diffusion components from small configs (random weights), a tokenizer trained in a moment,
and real photographs from the scikit-image wheel as instance images: DreamBooth tests without downloads."""

from __future__ import annotations

from pathlib import Path

import torch

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=4,
)
TEXT = dict(
    vocab_size=96,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=16,
)
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
)
PROMPTS = ["a photo of sks cat", "a photo of a cat", "a photo of sks mug", "a photo of a mug", "a dog"]


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET).eval()


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TEXT)).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE).eval()


def tiny_tokenizer(max_length: int = 16):
    """A word-level CLIP-style tokenizer trained on a few prompts (bos/eos/pad ids as TEXT says)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"]
    tok.train_from_iterator(PROMPTS * 3, trainers.WordLevelTrainer(special_tokens=special, vocab_size=TEXT["vocab_size"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def save_pipeline(folder: Path, seed: int = 0) -> Path:
    """A Stable Diffusion pipeline folder (model_index.json, unet/, text_encoder/, vae/, tokenizer/, scheduler/)
    that diffusers' StableDiffusionPipeline.from_pretrained loads as is."""
    from diffusers import DDPMScheduler

    folder = Path(folder)
    tiny_unet(seed).save_pretrained(folder / "unet")
    tiny_text_encoder(seed + 1).save_pretrained(folder / "text_encoder")
    tiny_vae(seed + 2).save_pretrained(folder / "vae")
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    DDPMScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    import json

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def instance_images(folder: Path, names: tuple[str, ...] = ("chelsea.png", "coffee.png"), size: int = 40) -> Path:
    """Real photographs from scikit-image's data folder, centre-cropped and resized to `size`, saved as PNG."""
    import skimage
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(skimage.__file__).parent / "data"
    for name in names:
        img = Image.open(data / name).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img.crop((left, top, left + side, top + side)).resize((size, size)).save(folder / name)
    return folder
