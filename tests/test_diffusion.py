"""TEXT_TO_IMAGE (DreamBooth) on tiny Stable Diffusion components (tests/tiny_diffusion.py): recipe checks,
prior-preservation batches, the loss falling, peft loading our unet/ and text_encoder/ folders onto diffusers'
modules with equal noise predictions, merge into a pipeline folder, resume after a kill, the image command."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from tiny_diffusion import instance_images, save_pipeline  # noqa: E402

from peftrun.errors import PeftrunError  # noqa: E402
from peftrun.recipe import recipe_from_dict  # noqa: E402

TOL = 1e-5
UNET_TARGETS = ["to_q", "to_v", "conv1", "conv2"]
METHODS = {
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": UNET_TARGETS},
    "loha": {"r": 2, "alpha": 4, "target_modules": UNET_TARGETS},
    "lokr": {"r": 2, "alpha": 4, "target_modules": UNET_TARGETS},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dreambooth")
    save_pipeline(root / "pipe")
    instance_images(root / "instance")
    return root


def recipe_data(work: Path, name: str, method: str = "lora", **training) -> dict:
    text = {"r": 2, "lora_alpha": 4} if method == "lora" else {"r": 2, "alpha": 4}
    return {
        "model": {"name_or_path": str(work / "pipe"), "task_type": "TEXT_TO_IMAGE"},
        "method": {"name": method, **METHODS[method], "text_encoder": text},
        "data": {"path": str(work / "instance"), "format": "images"},
        "dreambooth": {
            "instance_prompt": "a photo of sks cat", "class_prompt": "a photo of a cat",
            "class_data_dir": str(work / "class"), "with_prior_preservation": True, "num_class_images": 2,
            "sample_batch_size": 2, "class_inference_steps": 2, "resolution": 32, "train_text_encoder": True,
        },
        "training": {
            "objective": "diffusion", "num_epochs": 3, "batch_size": 1, "learning_rate": 5e-3,
            "lr_scheduler": "constant", "progress_bar": False, "seed": 7, "logging_steps": 1, **training,
        },
        "output_dir": str(work / name),
    }


def train(data: dict, **kw):
    from peftrun.training.loop import train as run

    return run(recipe_from_dict(copy.deepcopy(data)), **kw)


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "mem" not in k} for r in rows]


@pytest.fixture(scope="module")
def trained(work) -> Path:
    """One LoRA DreamBooth run: UNet and text encoder, prior preservation, 6 optimizer steps."""
    data = recipe_data(work, "lora_run", num_epochs=3, save_steps=2)
    train(data)
    return work / "lora_run"


# ------------------------------------------------------------------ recipes


def test_recipe_checks(work):
    good = recipe_data(work, "x")
    recipe_from_dict(copy.deepcopy(good))
    cases = [
        (("training", "objective"), "supervised", "set training.objective: diffusion"),
        (("dreambooth", "instance_prompt"), None, "prompt of the instance images"),
        (("dreambooth", "train_text_encoder"), False, "train_text_encoder is false"),
        (("data", "format"), "plain", "reads data.format 'images'"),
    ]
    for (section, key), value, message in cases:
        bad = copy.deepcopy(good)
        bad[section][key] = value
        with pytest.raises(PeftrunError, match=message):
            recipe_from_dict(bad)
    bad = copy.deepcopy(good)
    bad["method"] = {"name": "prompt_tuning"}
    with pytest.raises(PeftrunError, match="cannot train task_type TEXT_TO_IMAGE"):
        recipe_from_dict(bad)
    bad = copy.deepcopy(good)
    bad["method"]["text_encoder"] = {"r": 2, "lora_alfa": 4}
    with pytest.raises(PeftrunError, match="method.text_encoder.lora_alfa"):
        recipe_from_dict(bad)


def test_seed_recipes_validate_and_count_offline():
    from typer.testing import CliRunner

    from peftrun.cli import app

    repo = Path(__file__).resolve().parent.parent
    counts = {}
    for method in ("lora", "loha", "lokr"):
        result = CliRunner().invoke(app, ["params", str(repo / "recipes" / f"sd_v1_4_dreambooth_{method}.yaml")])
        assert result.exit_code == 0, result.output
        counts[method] = int(result.output.split("trainable params: ")[1].split(" ")[0].replace(",", ""))
    # peft's DreamBooth settings: r=16 on the UNet's to_q/to_v and the text encoder's q_proj/v_proj
    assert counts["lora"] == 1_594_368 + 589_824
    assert all(n > 0 for n in counts.values())


# ------------------------------------------------------------------ data


def test_prior_preservation_batches_and_class_images(work, trained):
    from peftrun.diffusion.images import image_files
    from peftrun.training.objectives.diffusion import Diffusion, collate

    assert len(image_files(work / "class")) == 2  # generated by the base pipeline before training
    recipe = recipe_from_dict(recipe_data(work, "y"))
    from peftrun.diffusion.components import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    data = Diffusion(recipe).data(tokenizer, None, None)
    assert len(data.train) == 2 and len(data.eval) == 2
    batch = collate([data.train[0], data.train[1]])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and int(batch["num_instance"]) == 2
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    instance = tokenizer("a photo of sks cat", padding="max_length", max_length=16, return_tensors="pt").input_ids[0]
    klass = tokenizer("a photo of a cat", padding="max_length", max_length=16, return_tensors="pt").input_ids[0]
    assert all(torch.equal(batch["input_ids"][i], instance) for i in (0, 1))
    assert all(torch.equal(batch["input_ids"][i], klass) for i in (2, 3))
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])
    held = collate([data.eval[0]])
    assert held["pixel_values"].shape == (1, 3, 32, 32)  # evaluation: instance images alone


# ------------------------------------------------------------------ training and the saved adapter


def test_loss_falls_on_the_instance_set(trained):
    evals = [r["eval_loss"] for r in records(trained) if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    steps = [r for r in records(trained) if "loss" in r]
    assert {"instance_loss", "prior_loss"} <= set(steps[0])


def test_saved_in_peft_layout(trained):
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", ["q_proj", "v_proj"])):
        config = json.loads((trained / component / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["task_type"] is None
        assert sorted(config["target_modules"]) == sorted(targets)
        keys = load_file(str(trained / component / "adapter_model.safetensors"))
        assert keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
    assert (trained / "peftrun_recipe.yaml").is_file()


def noise_inputs(unet, text_encoder):
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(2, unet.config.in_channels, 4, 4, generator=g)
    ids = torch.randint(3, 20, (2, 16), generator=g)
    return latents, torch.tensor([3, 800]), ids


@torch.no_grad()
def predict(unet, text_encoder, inputs):
    unet.eval(), text_encoder.eval()
    latents, steps, ids = inputs
    return unet(latents, steps, text_encoder(ids)[0]).sample


def peft_predict(work, adapter: Path, inputs):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPTextModel

    unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(work / "pipe" / "unet"), adapter / "unet")
    text = PeftModel.from_pretrained(CLIPTextModel.from_pretrained(work / "pipe" / "text_encoder"),
                                     adapter / "text_encoder")
    return predict(unet, text, inputs)


def test_peft_loads_the_adapters_with_equal_noise_predictions(work, trained):
    pytest.importorskip("peft")
    from peftrun.diffusion.images import load_with_adapters

    model, _ = load_with_adapters(None, {"default": trained})
    components = model.model
    inputs = noise_inputs(components.unet, components.text_encoder)
    ours = predict(components.unet, components.text_encoder, inputs)
    with model.disable_adapters():
        base = predict(components.unet, components.text_encoder, inputs)
    assert (ours - base).abs().max() > 1e-4  # training moved the adapters
    assert (ours - peft_predict(work, trained, inputs)).abs().max().item() <= TOL


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_dreambooth_trains_and_round_trips_through_peft(work, method):
    pytest.importorskip("peft")
    from peftrun.diffusion.images import load_with_adapters

    data = recipe_data(work, f"{method}_run", method=method, num_epochs=1, max_steps=2, learning_rate=2e-2)
    train(data)
    out = work / f"{method}_run"
    assert json.loads((out / "unet" / "adapter_config.json").read_text())["peft_type"] == method.upper()
    model, _ = load_with_adapters(None, {"default": out})
    inputs = noise_inputs(model.model.unet, model.model.text_encoder)
    ours = predict(model.model.unet, model.model.text_encoder, inputs)
    assert (ours - peft_predict(work, out, inputs)).abs().max().item() <= TOL


def test_resume_after_a_kill_equals_an_uninterrupted_run(work, trained):
    from peftrun.training.hooks import Hooks

    class Kill(Hooks):
        def at(self, point, step, value=None):
            if point == "after_step" and step == 3:
                raise KeyboardInterrupt  # the process dies here: nothing after the step-2 checkpoint is kept
            return value

    data = recipe_data(work, "lora_killed", num_epochs=3, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(data, hooks=Kill())
    train(data, resume=True)
    out = work / "lora_killed"
    for component in ("unet", "text_encoder"):
        a = load_file(str(out / component / "adapter_model.safetensors"))
        b = load_file(str(trained / component / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    got, want = records(out), records(trained)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in ("loss", "eval_loss", "train_epoch_loss"):
            if key in w:
                assert g[key] == pytest.approx(w[key], abs=1e-6), key


# ------------------------------------------------------------------ using the adapters


def cli(*args: str):
    from typer.testing import CliRunner

    from peftrun.cli import app

    return CliRunner().invoke(app, list(args))


def test_image_command_writes_a_png_of_the_asked_size_deterministic_with_a_seed(work, trained, tmp_path):
    from PIL import Image

    paths = []
    for name in ("a.png", "b.png", "c.png"):
        seed = "3" if name != "c.png" else "4"
        result = cli("generate", "--adapter", str(trained), "a photo of sks cat", "--output", str(tmp_path / name),
                     "--steps", "2", "--guidance-scale", "3.0", "--seed", seed, "--size", "16x24")
        assert result.exit_code == 0, result.output
        paths.append(tmp_path / name)
    with Image.open(paths[0]) as img:
        assert img.format == "PNG" and img.size == (24, 16)  # width x height
        first = img.tobytes()
    with Image.open(paths[1]) as img:
        assert img.tobytes() == first  # the same seed, the same pixels
    with Image.open(paths[2]) as img:
        assert img.tobytes() != first
    result = cli("generate", "--adapter", str(trained), "x", "--output", str(tmp_path / "d.png"), "--size", "15")
    assert result.exit_code == 2 and "multiples of 8" in result.output


def test_several_adapters_at_once_with_weights(work, trained):
    """w_a ΔW_a + w_b ΔW_b acting together equals the base plus the weighted sum of each one's change."""
    from peftrun.diffusion.images import load_with_adapters

    model, _ = load_with_adapters(None, {"a": trained, "b": work / "lora_killed"} if (work / "lora_killed").is_dir()
                                  else {"a": trained, "b": trained})
    unet, text = model.model.unet, model.model.text_encoder
    inputs = noise_inputs(unet, text)
    with model.disable_adapters():
        base = predict(unet, text, inputs)
    # a lone adapter at weight w on the UNet's Linear/Conv layers is linear in w when the text encoder is off
    model.set_weighted({"a": 0.5})
    half = predict(unet, text, inputs)
    model.set_weighted({"a": 1.0})
    full = predict(unet, text, inputs)
    model.set_adapter("a")
    assert torch.equal(predict(unet, text, inputs), full)  # set_adapter restores each adapter's own scale
    model.set_weighted({"a": 0.0, "b": 0.0})
    assert (predict(unet, text, inputs) - base).abs().max().item() <= TOL
    assert (half - base).abs().max() > 1e-5 and (full - half).abs().max() > 1e-5


def test_combine_handles_conv_factors(work, trained, tmp_path):
    from peftrun.combination import combine

    result = combine([(trained / "unet", 0.7), (trained / "unet", 0.3)], tmp_path / "unet", method="cat")
    assert result.max_relative_distance <= 1e-5
    state = load_file(str(tmp_path / "unet" / "adapter_model.safetensors"))
    original = load_file(str(trained / "unet" / "adapter_model.safetensors"))
    conv = [k for k in original if ".conv1.lora_A" in k][0]
    assert state[conv].dim() == 4 and state[conv].shape[1:] == original[conv].shape[1:]
    svd = combine([(trained / "unet", 0.7), (trained / "unet", 0.3)], tmp_path / "svd", method="svd")
    assert svd.max_relative_distance <= 1e-4  # the sum has the inputs' rank: exact up to rounding


def test_merge_writes_a_pipeline_diffusers_loads_with_equal_predictions(work, trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    from peftrun.diffusion.images import load_with_adapters

    result = cli("merge", "--adapter", str(trained), "--output", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    diff = float(result.output.split("noise prediction: ")[1].split(")")[0])
    assert diff <= TOL
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", safety_checker=None)
    model, _ = load_with_adapters(None, {"default": trained})
    inputs = noise_inputs(pipe.unet, pipe.text_encoder)
    merged = predict(pipe.unet, pipe.text_encoder, inputs)
    assert (merged - predict(model.model.unet, model.model.text_encoder, inputs)).abs().max().item() <= TOL


def test_estimate_rows_against_the_seed_table():
    """The seed's A100 table: full fine-tuning 27.5 GB, LoRA 15.5 GB, LoRA + gradient checkpointing 8.12 GB;
    the same W + G + O + A as the language models, within 15%."""
    from peftrun.estimate import estimate
    from peftrun.recipe import load_recipe

    repo = Path(__file__).resolve().parent.parent
    path = repo / "recipes" / "sd_v1_4_dreambooth_lora.yaml"
    plain = estimate(load_recipe(path, ["model.gradient_checkpointing=false"]), baseline=0.0)
    checkpointed = estimate(load_recipe(path), baseline=0.0)
    got = {
        "full": plain.row("full fine-tuning").device / 1e9,
        "lora": plain.row("lora").device / 1e9,
        "lora+gc": checkpointed.row("lora").device / 1e9,
    }
    seed = {"full": 27.5, "lora": 15.5, "lora+gc": 8.12}
    for key, want in seed.items():
        assert abs(got[key] - want) / want <= 0.15, (key, got[key], want)
    assert plain.row("lora").trainable * 4 / 1e6 == pytest.approx(8.8, rel=0.10)  # the checkpoint's MB
