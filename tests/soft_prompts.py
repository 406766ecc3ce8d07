"""What the soft-prompt method tests share: peft oracle configs, both round trips, generation, a training run."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from tiny import TASK_CLASSES, tiny_batch, tiny_model, train_losses

from peftrun.adapted import wrap
from peftrun.io.loading import load_adapted
from peftrun.io.peft_format import save_adapter
from peftrun.methods import get_method
from peftrun.methods.layers import ModulesToSave

PEFT_CONFIGS = {
    "prompt_tuning": "PromptTuningConfig",
    "p_tuning": "PromptEncoderConfig",
    "multitask_prompt_tuning": "MultitaskPromptTuningConfig",
}
# the tiny model families and the task each one is tested on
FAMILIES = [
    ("t5", "SEQ_2_SEQ_LM"),
    ("llama", "CAUSAL_LM"),
    ("gpt2", "CAUSAL_LM"),
    ("bloom", "CAUSAL_LM"),
    ("bert", "SEQ_CLS"),
    ("roberta", "SEQ_CLS"),
    ("bert", "TOKEN_CLS"),
]


def peft_config(method: str, task: str, **kw):
    peft = pytest.importorskip("peft")
    return getattr(peft, PEFT_CONFIGS[method])(task_type=task, **kw)


def ours_config(method: str, **kw):
    return get_method(method).Config(**kw)


def load_tiny(path: Path, task: str):
    import transformers

    return getattr(transformers, TASK_CLASSES[task]).from_pretrained(path).eval()


def oracle_batch(model, task: str, num_tasks: int | None = None, seed: int = 1) -> dict:
    batch = tiny_batch(model, task, seed=seed)
    if task == "SEQ_2_SEQ_LM":
        batch["labels"] = batch.pop("decoder_input_ids")  # peft's multitask seq2seq derives decoder inputs
    if num_tasks:
        batch["task_ids"] = torch.arange(batch["input_ids"].shape[0]) % num_tasks
    return batch


@torch.no_grad()
def perturb_heads(model) -> None:
    """Move the trainable head copies away from the originals, so a head that is not loaded shows."""
    g = torch.Generator().manual_seed(7)
    for module in model.modules():
        if isinstance(module, ModulesToSave) or type(module).__name__ == "ModulesToSaveWrapper":
            for p in module.modules_to_save.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def logits_of(model, batch: dict, task: str, n: int, from_peft: bool) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch).logits
    if from_peft and task == "TOKEN_CLS":
        logits = logits[:, n:]  # peftrun returns one row per real token; peft keeps the virtual ones
    return logits


def counts(arch: str, task: str, method: str, **kw) -> tuple[tuple[int, int], tuple[int, int]]:
    peft = pytest.importorskip("peft")
    base = tiny_model(arch, task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(method, task, **kw))
    ours = wrap(base, task, method, ours_config(method, **kw))
    return ours.parameter_counts(), theirs.get_nb_trainable_parameters()


def ours_to_peft(tmp_path: Path, model_dir: Path, task: str, method: str, **kw) -> tuple[float, dict, dict]:
    """Save a peftrun adapter, load it with peft; (max |logit diff|, our keys/shapes, peft's keys/shapes)."""
    peft = pytest.importorskip("peft")
    ours = wrap(load_tiny(model_dir, task), task, method, ours_config(method, **kw))
    perturb_heads(ours.model)
    folder = save_adapter(ours, tmp_path / "ours", base_model=str(model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load_tiny(model_dir, task), folder).eval()
    batch = oracle_batch(ours.model, task, kw.get("num_tasks"))
    n = ours.config.num_virtual_tokens
    diff = (
        (logits_of(ours.eval(), batch, task, n, False) - logits_of(theirs, batch, task, n, True)).abs().max()
    )
    their_keys = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    our_keys = {k: tuple(v.shape) for k, v in ours.adapter_state_dict().items()}
    return diff.item(), our_keys, their_keys


def peft_to_ours(tmp_path: Path, model_dir: Path, task: str, method: str, **kw) -> float:
    """Train-free peft adapter (random prompt, perturbed head) saved by peft, loaded by peftrun."""
    peft = pytest.importorskip("peft")
    from transformers import ByT5Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load_tiny(model_dir, task), peft_config(method, task, **kw)).eval()
    perturb_heads(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ByT5Tokenizer().save_pretrained(tmp_path / "theirs")  # tiny models ship no tokenizer
    ours, _ = load_adapted(tmp_path / "theirs")
    batch = oracle_batch(ours.model, task, kw.get("num_tasks"))
    n = ours.config.num_virtual_tokens
    diff = logits_of(ours.eval(), batch, task, n, False) - logits_of(theirs, batch, task, n, True)
    return diff.abs().max().item()


@torch.no_grad()
def greedy_reference(model, task: str, ids, mask, steps: int, start_id: int = 0, **extra) -> torch.Tensor:
    """Greedy decoding by full forwards, no cache: what any correct cached generate must reproduce."""
    if task == "CAUSAL_LM":
        for _ in range(steps):
            nxt = model(input_ids=ids, attention_mask=mask, **extra).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat((ids, nxt), 1), torch.cat((mask, torch.ones_like(nxt)), 1)
        return ids
    out = torch.full((ids.shape[0], 1), start_id, dtype=torch.long)
    for _ in range(steps):
        # labels the model shifts right into exactly `out` (peft's multitask seq2seq reads no decoder_input_ids)
        labels = torch.cat((out[:, 1:], torch.zeros_like(out[:, :1])), 1)
        logits = model(input_ids=ids, attention_mask=mask, labels=labels, **extra).logits
        out = torch.cat((out, logits[:, -1].argmax(-1, keepdim=True)), 1)
    return out


def generations(tmp_path: Path, model_dir: Path, task: str, method: str, left_pad: bool = False, **kw):
    """Greedy tokens for one adapter: (peftrun's generate, peft's generate or None where it fails,
    the no-cache reference through peft's forward, the base model's own generate)."""
    peft = pytest.importorskip("peft")
    ours = wrap(load_tiny(model_dir, task), task, method, ours_config(method, **kw)).eval()
    folder = save_adapter(ours, tmp_path / "gen", base_model=str(model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load_tiny(model_dir, task), folder).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 100, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:  # the second row left-padded, as batched generation pads
        ids[1, :2] = 0
        mask[1, :2] = 0
    extra = {"task_ids": torch.tensor([0, kw["num_tasks"] - 1])} if kw.get("num_tasks") else {}
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = ours.generate(**args, **extra)
        try:
            oracle = theirs.generate(**args, **extra)
        except RuntimeError:
            oracle = None
        reference = greedy_reference(theirs, task, ids, mask, 6, **extra)
        base = ours.model.generate(**args)
    return mine, oracle, reference, base


def train_steps(arch: str, task: str, method: str, steps: int = 15, lr: float = 0.3, **kw):
    """A few AdamW steps on one batch: (losses, names of base tensors that changed)."""
    base = tiny_model(arch, task)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = wrap(base, task, method, ours_config(method, **kw))
    batch = oracle_batch(base, task, kw.get("num_tasks"))
    if task == "CAUSAL_LM":
        batch["labels"] = batch["input_ids"].clone()
    elif task == "SEQ_CLS":
        batch["labels"] = torch.tensor([0, 2])
    elif task == "TOKEN_CLS":
        batch["labels"] = batch["input_ids"] % 3
    torch.manual_seed(0)
    losses = train_losses(model, batch, lr=lr, steps=steps, train=False)  # no dropout: a clean loss curve
    after = {}
    for n, p in base.named_parameters():
        if ".modules_to_save." in n:
            continue  # the trained head copy
        after[n.replace(".original_module", "")] = p.detach()
    changed = [n for n, p in after.items() if not torch.equal(before[n], p)]
    return losses, changed


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def params_line(recipe: str | Path) -> str:
    """`peftrun params` in process: the recipe's model on the meta device, the method applied."""
    from peftrun.models import build_from_config
    from peftrun.recipe import load_recipe

    r = load_recipe(recipe)
    num_labels = r.model.num_labels or 2
    model = build_from_config(r.model.name_or_path, r.model.task_type, meta=True, num_labels=num_labels)
    return wrap(model, r.model.task_type, r.method.name, r.method_config).trainable_report()


def recipe_paths(method: str) -> list[Path]:
    """Every recipe (real and offline) that uses `method`."""
    import yaml

    root = Path(__file__).resolve().parent.parent / "recipes"
    return [
        p
        for p in sorted(root.rglob("*.yaml"))
        if (yaml.safe_load(p.read_text()).get("method") or {}).get("name") == method
    ]


def run_twin(recipe: str, out: Path, *sets: str) -> list[dict]:
    """Train an offline twin recipe through the CLI into `out`; the per-epoch records of metrics.jsonl."""
    import json

    from conftest import run_cli

    args = [
        "train",
        recipe,
        "--set",
        f"output_dir={out}",
        "--set",
        "overwrite=true",
        "--set",
        "training.progress_bar=false",
    ]
    for item in sets:
        args += ["--set", item]
    result = run_cli(*args, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r]


# adapter_config.json keys that legitimately differ: paths, versions, peft-only bookkeeping
CONFIG_SKIP = {
    "base_model_name_or_path",
    "revision",
    "peft_version",
    "auto_mapping",
    "modules_to_save",
    "inference_mode",
}


def config_differences(tmp_path: Path, arch: str, task: str, method: str, **kw) -> tuple[dict, set]:
    """adapter_config.json as peftrun and peft write it: (differing values, keys only peftrun writes)."""
    import json

    peft = pytest.importorskip("peft")
    ours = wrap(tiny_model(arch, task), task, method, ours_config(method, **kw))
    save_adapter(ours, tmp_path / "ours", base_model="tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_model(arch, task), peft_config(method, task, **kw)).save_pretrained(
            tmp_path / "peft"
        )
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    differ = {
        k: (mine[k], theirs[k]) for k in mine.keys() & theirs.keys() - CONFIG_SKIP if mine[k] != theirs[k]
    }
    return differ, set(mine) - set(theirs)
