"""Checks every weight-wrapping method shares, against the peft library as an oracle.

Each check takes peftrun's method name, a tiny architecture (tests/tiny.py) with its task type, and a
config in peft's field names (the same dict builds both sides). The per-method test files parametrise them.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_batch, tiny_config, tiny_model
from torch import nn

from peftrun.adapted import PeftrunModel, wrap
from peftrun.errors import PeftrunError
from peftrun.io.loading import load_adapted
from peftrun.io.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from peftrun.methods import get_method
from peftrun.recipe import ModelSection

PEFT_CONFIGS = {"lora": "LoraConfig", "ia3": "IA3Config", "loha": "LoHaConfig", "lokr": "LoKrConfig"}
# peft fields peftrun does not write (bookkeeping) or fills from its own arguments.
UNCOMPARED = {"auto_mapping", "peft_version", "base_model_name_or_path"}
TOL = 1e-5


def peft_lib():
    return pytest.importorskip("peft")


def base(arch: str, task: str) -> nn.Module:
    """The tiny model with random biases (transformers starts them at zero, which hides bias handling)."""
    model = tiny_model(arch, task)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def ours(method: str, arch: str, task: str, config: dict) -> PeftrunModel:
    cfg = get_method(method).Config.model_validate(dict(config))
    return wrap(base(arch, task), task, method, cfg)


def theirs(method: str, arch: str, task: str, config: dict):
    peft = peft_lib()
    cfg = getattr(peft, PEFT_CONFIGS[method])(task_type=task, **config)
    return peft.get_peft_model(base(arch, task), cfg)


def perturb(model: nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor off its initial value, so an identity-at-init adapter means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


def batch_for(arch: str, task: str) -> dict:
    return tiny_batch(types.SimpleNamespace(config=tiny_config(arch)), task)


@torch.no_grad()
def logits(model: nn.Module, arch: str, task: str) -> torch.Tensor:
    model.eval()
    return model(**batch_for(arch, task)).logits


def labels_for(batch: dict, task: str) -> torch.Tensor:
    ids = batch["input_ids"]
    if task == "SEQ_CLS":
        return torch.arange(ids.shape[0]) % 3
    if task == "TOKEN_CLS":
        return torch.arange(ids.numel()).reshape(ids.shape) % 3
    if task == "SEQ_2_SEQ_LM":
        return batch.pop("decoder_input_ids")
    return ids.clone()


def check_count(method: str, arch: str, task: str, config: dict) -> tuple[int, int]:
    counts = ours(method, arch, task, config).parameter_counts()
    assert counts == theirs(method, arch, task, config).get_nb_trainable_parameters()
    return counts


def check_files(tmp_path: Path, method: str, arch: str, task: str, config: dict) -> None:
    """adapter_config.json fields and safetensors key names and shapes as peft writes them."""
    save_adapter(ours(method, arch, task, config), tmp_path / "ours", base_model="tiny")
    theirs(method, arch, task, config).save_pretrained(tmp_path / "theirs")

    def read(folder: Path) -> tuple[dict, dict]:
        data = json.loads((folder / ADAPTER_CONFIG).read_text())
        data = {k: sorted(v) if isinstance(v, list) else v for k, v in data.items() if k not in UNCOMPARED}
        return data, {k: tuple(v.shape) for k, v in load_file(folder / ADAPTER_WEIGHTS).items()}

    assert read(tmp_path / "ours") == read(tmp_path / "theirs")


def check_to_peft(tmp_path: Path, method: str, arch: str, task: str, config: dict) -> float:
    """A peftrun adapter saved with save_adapter loads in peft and gives the same logits."""
    peft = peft_lib()
    model = ours(method, arch, task, config)
    perturb(model)
    expected = logits(model, arch, task)
    plain = logits(base(arch, task), arch, task)
    assert (expected - plain).abs().max() > 1e-3, (
        "the adapter must change the output for the test to mean anything"
    )
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    loaded = peft.PeftModel.from_pretrained(base(arch, task), tmp_path / "adapter")
    diff = (logits(loaded, arch, task) - expected).abs().max().item()
    assert diff <= TOL
    return diff


def check_from_peft(tmp_path: Path, method: str, arch: str, task: str, config: dict) -> float:
    """A peft adapter (save_pretrained) loads in peftrun (peftrun.io.loading.load_adapted) with the same logits."""
    base(arch, task).save_pretrained(tmp_path / "base")
    model = theirs(method, arch, task, config)
    perturb(model)
    expected = logits(model, arch, task)
    model.save_pretrained(tmp_path / "adapter")
    section = ModelSection(
        name_or_path=str(tmp_path / "base"),
        task_type=task,
        tokenizer="byt5",
        num_labels=3 if task in ("SEQ_CLS", "TOKEN_CLS") else None,
    )
    loaded, _ = load_adapted(tmp_path / "adapter", model_section=section)
    diff = (logits(loaded, arch, task) - expected).abs().max().item()
    assert diff <= TOL
    return diff


def check_train_mode(method: str, arch: str, task: str, config: dict, seed: int = 3) -> None:
    """With dropout in play (rank_dropout, module_dropout), seeded training forwards equal peft's."""
    a, b = ours(method, arch, task, config), theirs(method, arch, task, config)  # same base weights
    for model in (a, b):  # same adapter values on both sides: each tensor seeded by its size
        for p in model.parameters():
            if p.requires_grad:
                p.data.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = batch_for(arch, task)
    outs = []
    for model in (a, b):
        model.train()
        torch.manual_seed(seed)
        outs.append(torch.stack([model(**batch).logits for _ in range(4)]))
    assert (outs[0] - outs[1]).abs().max().item() <= TOL


def check_learns(
    method: str, arch: str, task: str, config: dict, steps: int = 25, lr: float = 0.1
) -> tuple[float, float]:
    """A few AdamW steps lower the loss; the frozen base weights stay bit-identical."""
    torch.manual_seed(0)
    plain = tiny_model(arch, task)
    frozen = {n: (p, p.detach().clone()) for n, p in plain.named_parameters()}
    cfg = get_method(method).Config.model_validate(dict(config))
    model = wrap(plain, task, method, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    batch = batch_for(arch, task)
    batch["labels"] = labels_for(batch, task)

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    before = loss()
    opt = torch.optim.AdamW(trainable, lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    after = loss()
    assert before - after > 0.1, (before, after)  # nats, measured in eval mode (no dropout noise)
    assert all(torch.equal(p, copy) for p, copy in frozen.values())
    assert all(not torch.equal(p, s) for p, s in zip(trainable, start))
    return before, after


def check_merge(method: str, arch: str, task: str, config: dict) -> float:
    """Merged output == unmerged (<= 1e-5); unmerge restores every base tensor exactly; merge_and_unload too."""
    model = ours(method, arch, task, config)
    perturb(model)
    frozen = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if not p.requires_grad}
    before = logits(model, arch, task)
    model.merge()
    assert any(not torch.equal(p, copy) for p, copy in frozen.values()), "merge must change the base weights"
    diff = (logits(model, arch, task) - before).abs().max().item()
    assert diff <= TOL
    model.unmerge()
    assert all(torch.equal(p, copy) for p, copy in frozen.values())
    assert torch.equal(logits(model, arch, task), before)
    plain = model.merge_and_unload()
    assert (logits(plain, arch, task) - before).abs().max().item() <= TOL
    return diff


def conv_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4))
    net.config = types.SimpleNamespace(model_type="convnet")
    return net


def check_refuses_conv2d(method: str, **config) -> None:
    net = conv_net()
    cfg = get_method(method).Config.model_validate({"target_modules": ["0"], **config})
    with pytest.raises(PeftrunError, match="Conv2d; only Linear and Conv1D"):
        wrap(net, "CAUSAL_LM", method, cfg)


def check_recipes(method: str, trainable: int) -> None:
    """The roberta-large MRPC recipe and its offline twin validate; `peftrun params` gives peft's count."""
    from conftest import REPO
    from typer.testing import CliRunner

    from peftrun.cli import app
    from peftrun.models import build_from_config
    from peftrun.recipe import load_recipe

    cli = CliRunner()
    seed_recipe = REPO / "recipes" / f"roberta_large_mrpc_{method}.yaml"
    for recipe in (seed_recipe, REPO / "recipes" / "offline" / f"quickstart_{method}.yaml"):
        done = cli.invoke(app, ["validate", str(recipe)])
        assert done.exit_code == 0 and ": ok (" in done.output, done.output
    done = cli.invoke(app, ["params", str(seed_recipe)])
    assert done.exit_code == 0, done.output
    assert f"trainable params: {trainable:,d} ||" in done.output
    peft = peft_lib()
    params = load_recipe(seed_recipe).method.params
    model = build_from_config("roberta-large", "SEQ_CLS", meta=True, num_labels=2)
    cfg = getattr(peft, PEFT_CONFIGS[method])(task_type="SEQ_CLS", **params)
    assert peft.get_peft_model(model, cfg).get_nb_trainable_parameters()[0] == trainable


def check_quickstart(tmp_path: Path, method: str, min_accuracy: float) -> float:
    """The offline twin trains on data/quickstart with MiniLM and reaches `min_accuracy`; the adapter merges."""
    from conftest import REPO, run_cli

    recipe = REPO / "recipes" / "offline" / f"quickstart_{method}.yaml"
    out = tmp_path / "out"
    args = ("--set", f"output_dir={out}", "--set", "training.progress_bar=false")
    done = run_cli("train", str(recipe), *args, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["accuracy"] >= min_accuracy
    done = run_cli("merge", "--adapter", str(out), "--output", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr[-2000:]
    return last["accuracy"]
