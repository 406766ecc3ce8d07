"""GRPO (peftrun/training/objectives/grpo.py) on a tiny llama: sampling and its masks, rewards, the loss and its
gradients against trl 1.16's GRPOTrainer (the test-only oracle), and a short run through `peftrun train` in
which the policy learns what a rule rewards.

The oracle check feeds both sides the same prompts, completions and rewards: ours through the objective with
its sampler replaced by fixed completions, trl's through `GRPOTrainer._compute_loss` with the inputs its own
generation step would have built (the advantages by trl's formula, the reference log-probabilities from trl's
own `_get_per_token_logps_and_entropies` with the adapter disabled). The prompts are of equal length: trl does
not pass position ids, so a left-padded prompt would be read at other positions there than in generate (and
in peftrun, which passes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from test_preference import CORPUS, assert_same_grads, grads_of, lora_llama
from tiny_text import ONE_THREAD_ENV, one_thread, save_tiny_with_tokenizer  # noqa: F401  (a fixture)

from peftrun.io.peft_format import save_adapter
from peftrun.preference import PromptCollator
from peftrun.recipe import recipe_from_dict
from peftrun.rewards import build_rewards
from peftrun.training.objectives import make_objective

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
PROMPTS = ["say something nice", "tell me about the sun", "what colour is grass"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_models")
    tok = save_tiny_with_tokenizer(root / "llama", "llama", "CAUSAL_LM", CORPUS)
    return root / "llama", tok


def grpo_recipe(model_dir, **grpo):
    return recipe_from_dict({
        "model": {"name_or_path": str(model_dir), "task_type": "CAUSAL_LM"},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8},
        "data": {"path": "unused", "format": "prompts", "max_length": 64},
        "training": {"objective": "grpo"},
        "grpo": {"rewards": [{"type": "regex", "pattern": "blue", "name": "blue"}], **grpo},
    })


# ================================================================== rewards


def test_rule_rewards_and_their_weighted_total(llama):
    specs = grpo_recipe(llama[0], rewards=[
        {"type": "regex", "pattern": r"\bblue\b", "name": "blue", "weight": 2.0},
        {"type": "length", "min_chars": 5, "max_chars": 12, "name": "short", "weight": 0.5},
    ]).grpo.rewards
    rewards = build_rewards(specs)
    assert [(name, weight) for name, weight, _ in rewards] == [("blue", 2.0), ("short", 0.5)]
    texts = ["blue", "the sky is blue", "bluest", "green grass"]
    assert rewards[0][2](["p"] * 4, texts).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert rewards[1][2](["p"] * 4, texts).tolist() == [0.0, 0.0, 1.0, 1.0]

    objective = make_objective(grpo_recipe(llama[0], rewards=[s.model_dump() for s in specs]))
    total, means = objective.score(["p"] * 4, texts)
    assert total.tolist() == [2.0, 2.0, 0.5, 0.5]
    assert means == {"rewards/blue": 0.5, "rewards/short": 0.5}


def test_classifier_reward_is_the_probability_of_its_label(tmp_path):
    """A saved SEQ_CLS adapter as the reward: P(label) from its softmax, equal to the adapter's own logits."""
    from transformers import AutoModelForSequenceClassification

    from peftrun.adapted import wrap
    from peftrun.methods.lora import LoraConfig

    tok = save_tiny_with_tokenizer(tmp_path / "bert", "bert", "SEQ_CLS", CORPUS, num_labels=2,
                                   id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = wrap(AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert"), "SEQ_CLS", "lora",
                 LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(model, tmp_path / "clf", base_model=str(tmp_path / "bert"), tokenizer=tok)
    [(name, weight, reward)] = build_rewards(grpo_recipe(tmp_path, rewards=[
        {"type": "classifier", "adapter": str(tmp_path / "clf"), "label": "positive", "name": "pos"}]).grpo.rewards)
    texts = ["you are very kind", "bad rude noise", "the sky is blue"]
    got = reward(["p"] * 3, texts)
    model.eval()
    with torch.no_grad():
        expected = model(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1)[:, 1]
    assert (name, weight) == ("pos", 1.0)
    assert (got - expected).abs().max().item() < 1e-5
    assert len(set(got.tolist())) == 3  # the texts differ in score: not a constant

    # a classifier whose base config keeps transformers' LABEL_0/LABEL_1 (as training on 0/1 labels with a
    # verbalizer leaves it): the class names come from the recipe saved beside the adapter
    model.model.config.id2label, model.model.config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    model.model.config.save_pretrained(tmp_path / "bert")
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(tmp_path / "bert"), "task_type": "SEQ_CLS"},
        "method": {"name": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
        "data": {"path": "unused", "verbalizer": {0: "negative", 1: "positive"},
                 "label_names": ["negative", "positive"]},
    })
    save_adapter(model, tmp_path / "clf2", base_model=str(tmp_path / "bert"), tokenizer=tok, recipe=recipe)
    [(_, _, saved)] = build_rewards(grpo_recipe(tmp_path, rewards=[
        {"type": "classifier", "adapter": str(tmp_path / "clf2"), "label": "positive"}]).grpo.rewards)
    assert (saved(["p"] * 3, texts) - expected).abs().max().item() < 1e-5


# ================================================================== sampling


def test_sampling_masks_everything_after_the_first_eos(llama):
    path, tok = llama
    policy = lora_llama(path, seed=3)
    objective = make_objective(grpo_recipe(path, num_generations=4, max_new_tokens=12))
    objective.bind(policy, tok, None)
    rows = [{"prompt_ids": tok(p)["input_ids"], "prompt_text": p} for p in PROMPTS]
    torch.manual_seed(0)
    completion, mask, prompts, texts, prompt_ids, prompt_mask = objective.sample(
        PromptCollator(tok.pad_token_id)(rows), group=4, greedy=False)
    assert completion.shape[0] == mask.shape[0] == len(texts) == 12 and prompts == [p for p in PROMPTS for _ in range(4)]
    eos = tok.eos_token_id
    for ids, m in zip(completion.tolist(), mask.tolist()):
        first = ids.index(eos) if eos in ids else len(ids)
        assert m == [1] * min(first + 1, len(ids)) + [0] * (len(ids) - first - 1)  # the EOS itself is trained
    assert prompt_ids.shape[0] == 12 and (prompt_mask[:, -1] == 1).all()  # prompts padded on the left


# ================================================================== the loss against trl


def fixed_completions(tok, group):
    """Completions of each prompt: some end with an EOS before the last column, one fills every column."""
    words = [["blue", "sky", "</s>", "<pad>", "<pad>"], ["green", "grass", "is", "blue", "</s>"],
             ["no", "</s>", "<pad>", "<pad>", "<pad>"], ["cat", "dog", "tree", "river", "city"]]
    ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in words] * (len(PROMPTS) * group // len(words)))
    is_eos = ids == tok.eos_token_id
    mask = (~((is_eos.cumsum(1) - is_eos.long()) > 0)).long()
    return ids, mask


@pytest.mark.parametrize("beta,epsilon,temperature,correction", [
    (0.04, 0.2, 1.0, True), (0.3, 0.1, 0.7, True), (0.3, 0.2, 1.0, False), (0.0, 0.2, 1.0, True)])
def test_grpo_loss_and_gradients_equal_trl(llama, tmp_path, monkeypatch, beta, epsilon, temperature, correction):
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    path, tok = llama
    group = 4
    ours = lora_llama(path, seed=1).train()
    folder = tmp_path / "adapter"
    save_adapter(ours, folder, base_model=str(path))

    prompts = [tok(p, add_special_tokens=False)["input_ids"][:3] for p in PROMPTS]
    assert {len(p) for p in prompts} == {3}
    completion, completion_mask = fixed_completions(tok, group)
    texts = tok.batch_decode(completion.masked_fill(completion_mask == 0, tok.pad_token_id), skip_special_tokens=True)
    rows = [{"prompt_ids": p, "prompt_text": t} for p, t in zip(prompts, PROMPTS)]
    batch = PromptCollator(tok.pad_token_id)(rows)
    prompt_ids = batch["prompt_ids"].repeat_interleave(group, 0)
    prompt_mask = batch["prompt_attention_mask"].repeat_interleave(group, 0)

    objective = make_objective(grpo_recipe(path, num_generations=group, beta=beta, epsilon=epsilon,
                                           temperature=temperature, use_bias_correction_kl=correction, rewards=[
        {"type": "regex", "pattern": "blue", "name": "blue"},
        {"type": "length", "min_chars": 0, "max_chars": 8, "name": "short", "weight": 0.5}]))
    objective.bind(ours, tok, None)
    prompt_texts = [p for p in PROMPTS for _ in range(group)]
    monkeypatch.setattr(objective, "sample", lambda b, group, greedy: (
        completion, completion_mask, prompt_texts, texts, prompt_ids, prompt_mask))
    ours.zero_grad(set_to_none=True)
    step = objective(ours, batch)
    step.loss.backward()
    our_grads = grads_of(ours)

    # trl's trainer on the plain base with a new adapter that then gets our weights (as in test_preference)
    rewards, _ = objective.score(prompt_texts, texts)
    assert rewards.tolist() == [1.5, 1.0, 0.5, 0.0] * len(PROMPTS)  # "blue sky", "green grass is blue", "no", ...
    peft_config = PeftLoraConfig.from_pretrained(str(folder))
    peft_config.inference_mode = False
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, loss_type="grpo", beta=beta,
                      epsilon=epsilon, temperature=temperature, num_generations=group, per_device_train_batch_size=group,
                      max_completion_length=completion.shape[1], scale_rewards="group",
                      use_bias_correction_kl=correction, bf16=False)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=[lambda **kw: [0.0]],
                          args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                          processing_class=tok, peft_config=peft_config)
    twin = trainer.model
    assert not set_peft_model_state_dict(twin, load_file(str(folder / "adapter_model.safetensors"))).unexpected_keys
    twin.train()
    trainer.current_gradient_accumulation_steps = 1  # set by trl's training_step, which is not run here
    grouped = rewards.view(-1, group)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion,
              "completion_mask": completion_mask, "advantages": advantages}
    if beta:
        with torch.no_grad(), twin.disable_adapter():
            inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                twin, torch.cat([prompt_ids, completion], 1), torch.cat([prompt_mask, completion_mask], 1),
                completion.shape[1])
    twin.zero_grad(set_to_none=True)
    theirs = trainer._compute_loss(twin, inputs)
    theirs.backward()

    assert abs(step.loss.item() - theirs.item()) <= TOL
    assert_same_grads(our_grads, grads_of(twin, "base_model."))
    assert step.metrics["reward"] == pytest.approx(0.75) and step.metrics["rewards/blue"] == pytest.approx(0.5)
    assert step.metrics["completion_length"] == pytest.approx(completion_mask.sum(1).float().mean().item())
    if beta == 0:
        assert step.metrics["kl"] >= 0


# ================================================================== a run through the CLI


def test_grpo_run_learns_the_rewarded_word_and_reports_trl_names(llama, tmp_path):
    """A rule reward (the completion names a colour or a sky body) on prompts: the sampled reward rises, the
    greedy held-out answers go from none to all rewarded, and the adapter saves in peft's format."""
    path, _ = llama
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    recipe = {
        "model": {"name_or_path": str(path), "task_type": "CAUSAL_LM"},
        "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "data": {"train_file": str(data), "eval_file": str(data), "format": "prompts", "max_length": 32},
        "training": {"objective": "grpo", "num_epochs": 4, "learning_rate": 5e-2, "batch_size": 4,
                     "logging_steps": 1, "seed": 7, "progress_bar": False},
        "grpo": {"num_generations": 8, "max_new_tokens": 4, "beta": 0.0,
                 "rewards": [{"type": "regex", "pattern": "blue|green|sun|moon", "name": "colour"}]},
        "output_dir": str(tmp_path / "out"),
    }
    recipe_path = tmp_path / "grpo.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    res = run_cli("train", str(recipe_path), env=ONE_THREAD_ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r and "epoch" in r and "loss" in r]
    assert {"reward", "reward_std", "kl", "completion_length", "rewards/colour"} <= steps[0].keys()
    per_epoch = {}
    for r in steps:
        per_epoch.setdefault(r["epoch"], []).append(r["reward"])
    first, last = (sum(v) / len(v) for v in (per_epoch[0], per_epoch[max(per_epoch)]))
    evals = [r["eval_reward"] for r in records if "eval_reward" in r]
    print(f"mean sampled reward, first epoch {first:.3f}, last epoch {last:.3f}; greedy held-out reward {evals}")
    assert last > first + 0.05, (first, last)
    # greedy answers: none names a rewarded word after the first epoch, every one does at the end
    assert evals[0] == 0.0 and evals[-1] == 1.0 and "eval_rewards/colour" in records[-1]
    assert (Path(tmp_path / "out") / "adapter_model.safetensors").is_file()
