"""Precision and memory switches: half-precision base weights with fp32 adapters, Accelerate mixed
precision, gradient checkpointing with the input-grad hook, bitsandbytes refused without CUDA,
low_cpu_mem_usage loading, and the per-device memory lines."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file

from peftrun.adapted import wrap
from peftrun.methods.lora import LoraConfig
from peftrun.models import load_model
from peftrun.recipe import ModelSection, recipe_from_dict


@pytest.fixture(scope="module")
def llama_dir(tiny_dir):
    return tiny_dir("llama", "CAUSAL_LM")


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_base_keeps_fp32_adapters_and_trains_them(llama_dir, dtype):
    model = load_model(ModelSection(name_or_path=str(llama_dir), task_type="CAUSAL_LM", dtype=dtype))
    peft = wrap(model, "CAUSAL_LM", "lora", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    base = {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert {p.dtype for p in base.values()} == {getattr(torch, dtype)}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    loss = peft(**batch()).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())
    assert all(torch.equal(base[n], p) for n, p in peft.named_parameters() if n in base)


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir):
    """Frozen embeddings give checkpointed blocks inputs that need no gradient; the input-grad hook
    (enable_input_require_grads) keeps the graph whole, so LoRA in layer 0 still learns."""
    grads = []
    for checkpointing in (False, True):
        section = ModelSection(
            name_or_path=str(llama_dir), task_type="CAUSAL_LM", gradient_checkpointing=checkpointing
        )
        torch.manual_seed(0)  # the same random (non-zero) LoRA start both times
        peft = wrap(load_model(section), "CAUSAL_LM", "lora", LoraConfig(r=4, init_lora_weights=False))
        peft.train()
        assert peft.model.model.gradient_checkpointing is checkpointing
        peft(**batch()).loss.backward()
        grads.append({n: p.grad for n, p in peft.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    first = "model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert checkpointed[first] is not None and checkpointed[first].abs().sum() > 0
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-6)


def test_low_cpu_mem_usage_loads_the_same_weights(llama_dir):
    models = [
        load_model(ModelSection(name_or_path=str(llama_dir), task_type="CAUSAL_LM", low_cpu_mem_usage=flag))
        for flag in (True, False)
    ]
    a, b = (dict(m.state_dict()) for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine bitsandbytes is allowed")
@pytest.mark.parametrize("key", ["load_in_8bit", "load_in_4bit"])
def test_bitsandbytes_refused_without_cuda(tmp_path, llama_dir, key):
    recipe = {
        "model": {"name_or_path": str(llama_dir), "task_type": "CAUSAL_LM", key: True},
        "data": {"train_file": "x.csv"},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("validate", "--here", str(path))  # the machine: plain validate checks the recipe alone
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and f"model.{key}" in result.stderr


def recipe(**training):
    return recipe_from_dict(
        {
            "model": {"name_or_path": "x", "task_type": "CAUSAL_LM"},
            "data": {"train_file": "x.csv"},
            "training": training,
        }
    )


def test_mixed_precision_through_accelerate(monkeypatch):
    from accelerate.state import AcceleratorState

    from peftrun.training.engines import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision sets
    try:
        # the launcher decides when the recipe is silent
        assert make_accelerator(recipe()).mixed_precision == "bf16"
        AcceleratorState._reset_state(True)
        accelerator = make_accelerator(recipe(mixed_precision="no"))  # an explicit recipe value wins
        assert accelerator.mixed_precision == "no"
        AcceleratorState._reset_state(True)
        accelerator = make_accelerator(recipe(mixed_precision="bf16"))
        layer = torch.nn.Linear(8, 8)
        with accelerator.autocast():
            assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    finally:
        AcceleratorState._reset_state(True)


def test_every_device_gets_the_seed_lines_and_a_record():
    """The main process prints the seed's lines for its GPU and the same lines for each other device."""
    from peftrun.memory import MemoryTracker, report

    tracker = MemoryTracker("train")
    tracker.cuda, tracker.devices = True, [0, 1]
    tracker.begin, tracker.used, tracker.peaked = 1916 * 2**20, 66, 7488
    tracker.gpus = {0: {"begin": 1916, "used": 66, "peaked": 7488}, 1: {"begin": 10, "used": 0, "peaked": 20}}
    tracker.cpu_begin, tracker.cpu_used, tracker.cpu_peaked = 19411 * 2**20, 0, 0
    lines, record = report(tracker)
    assert lines[:4] == [
        "GPU Memory before entering the train : 1916",
        "GPU Memory consumed at the end of the train (end-begin): 66",
        "GPU Peak Memory consumed during the train (max-begin): 7488",
        "GPU Total Peak Memory consumed during the train (max): 9404",
    ]
    assert lines[4] == "CPU Memory before entering the train : 19411"
    assert lines[-1] == "GPU 1 Total Peak Memory consumed during the train (max): 30"
    assert record["train_gpu_mem_peak_total_mb"] == 9404
    assert record["train_gpu0_mem_peak_total_mb"] == 9404 and record["train_gpu1_mem_peak_total_mb"] == 30


T0_ROWS = [
    ("@HMRCcustomers No this is my first job", "no complaint"),
    ("@nationalgridus I have no water and the bill is current and paid. Can you do something?", "complaint"),
    ("@JetBlue Cancelled my flight and no one will tell me why", "complaint"),
    ("Looking forward to the weekend with friends", "no complaint"),
    ("@Comcast my internet has been down for three days, still no technician", "complaint"),
    ("Great game last night, what a finish", "no complaint"),
    ("@AppleSupport my phone keeps restarting after the update", "complaint"),
    ("Coffee and a good book this morning", "no complaint"),
]


@pytest.mark.slow
def test_t0_3b_lora_step_fits_this_machine(tmp_path):
    """The seed's point on a 24 GiB CPU machine: one LoRA step of the T0_3B architecture (random weights,
    bf16 base, fp32 adapters, batch 8 x 64 tokens) fits, where full fine-tuning would not (estimate)."""
    import csv
    import re
    import resource

    from peftrun.estimate import estimate
    from peftrun.recipe import load_recipe

    with open(tmp_path / "train.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(T0_ROWS)
    with open(tmp_path / "validation.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(T0_ROWS[:2])
    recipe = {
        "model": {
            "name_or_path": "bigscience/T0_3B",
            "task_type": "SEQ_2_SEQ_LM",
            "random_init": True,
            "dtype": "bfloat16",
            "tokenizer": "byt5",
        },
        "method": {"name": "lora", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1},
        "data": {
            "path": str(tmp_path),
            "template": "Tweet text : {text} Label : ",
            "label_column": "label",
            "max_length": 64,
            "target_max_length": 3,
        },
        "training": {
            "max_steps": 1,
            "num_epochs": 1,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "progress_bar": False,
        },
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "t0_3b_step.yaml"
    path.write_text(yaml.safe_dump(recipe))
    limit = 24 * 2**30
    full = estimate(load_recipe(path)).row("full fine-tuning")
    assert full.device + full.host > limit  # ~45.6 GB of fp32 weights, gradients and AdamW states alone

    result = run_cli("train", str(path), timeout=7200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable params: 4,718,592 || all params: 2,854,475,776" in result.stdout
    train_peak_mib = int(
        re.search(r"CPU Total Peak Memory consumed during the train \(max\): (\d+)", result.stdout)[1]
    )
    process_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(
        f"T0_3B LoRA step: train peak {train_peak_mib} MiB, process peak RSS {process_peak / 2**30:.2f} GiB"
    )
    assert train_peak_mib * 2**20 < limit and process_peak < limit
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {tuple(t.shape) for t in saved.values()} == {(8, 2048), (2048, 8)}
    assert all(t.dtype == torch.float32 for t in saved.values())
