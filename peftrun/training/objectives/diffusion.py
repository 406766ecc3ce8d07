r"""DreamBooth (Ruiz et al., 2022) on a TEXT_TO_IMAGE pipeline: the denoising loss with prior preservation.

With z = VAE(x) · scaling, ε ~ N(0, I), t ~ U{0..T-1}, z_t = sqrt(ᾱ_t) z + sqrt(1 - ᾱ_t) ε and c the text
encoding of the prompt, the UNet ε_θ(z_t, t, c) learns

    loss = ||ε_θ(z_t, t, c_instance) - ε||²  +  prior_loss_weight · ||ε_θ(z'_t, t', c_class) - ε'||²

over instance images x with the instance prompt ("a photo of sks dog") and, with prior preservation, class
images x' with the class prompt ("a photo of dog"), which the base pipeline generates first where
class_data_dir holds fewer than num_class_images (diffusion/images.py). Each batch holds its instance rows
first, then as many class rows (the prior half); the two means are taken apart, as in the paper.
(v-prediction schedulers: the target is the velocity instead of ε.)

Images: the shorter side resized to `resolution`, then a centre crop (center_crop) or a random one, an
optional horizontal flip, scaled to [-1, 1]. The random crop and flip draw from torch's generator, so a
resumed run sees the same ones. Evaluation: the denoising loss on the instance images with noise and
timesteps fixed by the recipe's seed (the same draws every epoch, so the numbers compare).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from peftrun.errors import PeftrunError
from peftrun.evaluate import EvalResult
from peftrun.training.objectives import Data, Objective, StepResult


def build_pipeline(recipe):
    """(tokenizer, splits, label_names, model) for training.build: the components with the recipe's adapter
    on the UNet (and the text encoder with dreambooth.train_text_encoder); class images made first."""
    from peftrun.diffusion.adapted import DiffusionPeftModel
    from peftrun.diffusion.components import enable_checkpointing, load_components, load_tokenizer
    from peftrun.recipe import text_encoder_config

    db = recipe.dreambooth
    components = load_components(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    if db.with_prior_preservation:
        from accelerate import PartialState

        from peftrun.diffusion.images import make_class_images

        state = PartialState()
        with state.main_process_first():
            if state.is_main_process:
                with torch.random.fork_rng(devices=[]):  # the run's own draws stay those of its seed
                    make_class_images(components, tokenizer, db, device=state.device)
        components.to("cpu")
    components.train_text_encoder = db.train_text_encoder
    components.noise_offset = db.noise_offset
    model = DiffusionPeftModel(components)
    text = text_encoder_config(recipe) if db.train_text_encoder else None
    model.add_adapter("default", recipe.method.name, recipe.method_config, text)
    if not recipe.training.fused_lora:
        from peftrun.methods.lora import use_fused

        use_fused(model, False)
    if recipe.model.gradient_checkpointing:
        enable_checkpointing(components)
    return tokenizer, None, None, model


class ImageRows(Dataset):
    """DreamBooth's rows: instance image i (with its prompt's ids) and, with prior preservation, class image
    i mod n (with the class prompt's ids); as many rows as the larger of the two sets."""

    def __init__(self, instance: list, instance_ids, classes: list | None = None, class_ids=None, *, size: int,
                 center_crop: bool, flip: bool):
        self.instance, self.classes = instance, classes or []
        self.instance_ids, self.class_ids = instance_ids, class_ids
        self.size, self.center_crop, self.flip = size, center_crop, flip

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def pixels(self, path) -> torch.Tensor:
        return image_tensor(path, self.size, center_crop=self.center_crop, flip=self.flip)

    def __getitem__(self, i: int) -> dict:
        row = {"pixel_values": self.pixels(self.instance[i % len(self.instance)]), "input_ids": self.instance_ids}
        if self.classes:
            row["class_pixel_values"] = self.pixels(self.classes[i % len(self.classes)])
            row["class_input_ids"] = self.class_ids
        return row


def image_tensor(path, size: int, *, center_crop: bool = True, flip: bool = False) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: shorter side resized to `size`, centre or random crop, optional flip."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
        if center_crop:
            left, top = (img.width - size) // 2, (img.height - size) // 2
        else:
            left = int(torch.randint(0, img.width - size + 1, ()).item())
            top = int(torch.randint(0, img.height - size + 1, ()).item())
        img = img.crop((left, top, left + size, top + size))
        if flip and torch.rand(()).item() < 0.5:
            img = ImageOps.mirror(img)
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def collate(rows: list[dict]) -> dict:
    """Instance rows first, then the class rows (prior preservation): one UNet batch of both halves."""
    pixels = [r["pixel_values"] for r in rows] + [r["class_pixel_values"] for r in rows if "class_pixel_values" in r]
    ids = [r["input_ids"] for r in rows] + [r["class_input_ids"] for r in rows if "class_input_ids" in r]
    return {
        "pixel_values": torch.stack(pixels),
        "input_ids": torch.stack(ids),
        "num_instance": torch.tensor(len(rows)),
    }


class Diffusion(Objective):
    name = "diffusion"

    def data(self, tokenizer, splits, label_names):
        from peftrun.diffusion.images import image_files

        db, data = self.recipe.dreambooth, self.recipe.data
        instance = image_files(data.path)
        if not instance:
            raise PeftrunError("no images (png, jpg, webp, bmp) in the instance folder", where=f"data.path ({data.path})")
        if data.max_train_samples:
            instance = instance[: data.max_train_samples]
        classes = None
        notes = [f"DreamBooth: {len(instance)} instance image(s) of '{db.instance_prompt}'"]
        if db.with_prior_preservation:
            classes = image_files(db.class_data_dir)[: db.num_class_images]
            if not classes:
                raise PeftrunError("no class images", where=f"dreambooth.class_data_dir ({db.class_data_dir})")
            notes.append(f"prior preservation: {len(classes)} class image(s) of '{db.class_prompt}', "
                         f"weight {db.prior_loss_weight}")
        kw = {"size": db.resolution, "center_crop": db.center_crop, "flip": db.random_flip}
        train = ImageRows(instance, self.ids(tokenizer, db.instance_prompt), classes,
                          self.ids(tokenizer, db.class_prompt) if classes else None, **kw)
        held = ImageRows(instance, train.instance_ids, size=db.resolution, center_crop=True, flip=False)
        return Data(train, held, collate, collate, notes)

    @staticmethod
    def ids(tokenizer, prompt: str) -> torch.Tensor:
        return tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids[0]

    def loss(self, model, batch):
        prediction, target = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"])
        n = int(batch["num_instance"])
        instance = F.mse_loss(prediction[:n].float(), target[:n].float())
        if prediction.shape[0] == n:
            return StepResult(instance, weight=n)
        prior = F.mse_loss(prediction[n:].float(), target[n:].float())
        loss = instance + self.recipe.dreambooth.prior_loss_weight * prior
        metrics = {"instance_loss": float(instance.detach()), "prior_loss": float(prior.detach())}
        return StepResult(loss, metrics, weight=n)

    def evaluate(self, model, loader, accelerator) -> EvalResult:
        """The instance images' denoising loss at noise and timesteps fixed by the seed; the training
        generator is left as it was."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.recipe.training.seed)
            return super().evaluate(model, loader, accelerator)

    def report(self, result: EvalResult) -> list[str]:
        return []


OBJECTIVE = Diffusion
