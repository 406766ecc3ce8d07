"""peftrun.wrap (peft's get_peft_model) in one's own loop and in transformers' Trainer, saved in peft's format
that peft loads; peftrun.train from a dict."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_kit import save_lm

import peftrun
from peftrun.errors import PeftrunError


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_lm(tmp_path_factory.mktemp("wrap") / "base")


def load_base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir)


def rows(n=16, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (n, length), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def peft_logits(base_dir, folder, batch):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_dir), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_wrap_counts_trains_in_a_plain_loop_and_saves_what_peft_loads(base_dir, tmp_path, capsys):
    model = peftrun.wrap(load_base(base_dir), "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert model.task_type == "CAUSAL_LM"  # from the class
    # 2 layers x (q_proj 32->32: A 4x32 + B 32x4; v_proj 32->16 (2 kv heads of 8): A 4x32 + B 16x4) = 896
    assert model.trainable_report() == "trainable params: 896 || all params: 44,064 || trainable%: 2.0334"
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == model.trainable_report()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {k: torch.stack([r[k] for r in rows()]) for k in ("input_ids", "attention_mask", "labels")}
    losses = []
    model.train()
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(base_dir)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    theirs = peft_logits(base_dir, tmp_path / "ad", batch)
    assert (ours - theirs).abs().max().item() < 1e-5
    with torch.no_grad():
        bare = load_base(base_dir)(input_ids=batch["input_ids"]).logits
    assert (ours - bare).abs().max().item() > 1e-3  # it trained


def test_wrap_in_transformers_trainer(base_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = peftrun.wrap(load_base(base_dir), "lora", r=4, lora_alpha=8)
    before = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    data = [{k: v.tolist() for k, v in r.items()} for r in rows()]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
    )
    # a datasets.Dataset with a column the model does not take: Trainer keeps the columns forward names
    from datasets import Dataset

    dataset = Dataset.from_list([{**r, "note": "not a model input"} for r in data])
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    result = trainer.train()
    assert result.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    after = model.adapter_state_dict()
    assert any((after[k] - before[k]).abs().max() > 0 for k in before)  # the adapter moved
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the base stayed frozen
    model.save_pretrained(tmp_path / "ad")
    batch = {k: torch.stack([r[k] for r in rows(4, seed=1)]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits
    assert (ours - peft_logits(base_dir, tmp_path / "ad", batch)).abs().max().item() < 1e-5


def test_wrap_refuses_bad_parameters_and_unknown_tasks(base_dir):
    with pytest.raises(PeftrunError, match="method.rr"):
        peftrun.wrap(load_base(base_dir), "lora", rr=4)
    with pytest.raises(PeftrunError, match="cannot tell the task"):
        peftrun.wrap(torch.nn.Linear(2, 2), "lora")
    with pytest.raises(PeftrunError, match="lorra"):
        peftrun.wrap(load_base(base_dir), "lorra")


def test_the_readme_training_example_runs(base_dir, minilm_path, tmp_path, monkeypatch):
    import re

    from conftest import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Training from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'BASE = "HuggingFaceTB/SmolLM2-135M"' in code
    code = code.replace('BASE = "HuggingFaceTB/SmolLM2-135M"', f"BASE = {str(base_dir)!r}")  # a tiny stand-in
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "quickstart").symlink_to(REPO / "data" / "quickstart")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "my_lora" / "adapter_model.safetensors").is_file()
    record = namespace["record"]
    assert record["step"] == 4  # 64 rows, batch 16, one epoch
    assert 0.0 < record["eval_loss"] < 1.0 and 0.0 <= record["accuracy"] <= 1.0
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"):
        assert (tmp_path / "out" / "quickstart_api" / name).is_file(), name
