"""Houlsby bottleneck adapters: placement and counts, identity start, save/load round trip, learning, no merge."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, run_cli
from helpers import assert_merge_refused
from safetensors.torch import load_file
from tiny import tiny_batch, tiny_model, train_losses

from peftrun.adapted import wrap
from peftrun.errors import PeftrunError
from peftrun.io.loading import load_adapted
from peftrun.io.peft_format import save_adapter
from peftrun.methods.bottleneck import BottleneckConfig, BottleneckLayer
from peftrun.recipe import ModelSection, load_recipe


def per_adapter(d: int, m: int) -> int:
    return 2 * d * m + m + d


def adapted_names(peft_model) -> list[str]:
    return [n for n, m in peft_model.model.named_modules() if isinstance(m, BottleneckLayer)]


# tiny models have hidden 32; reduction_factor 16 gives m = 2. (arch, task, adapted layers, head params)
PLACEMENT = [
    ("roberta", "SEQ_CLS", 4, 32 * 32 + 32 + 3 * 32 + 3),  # 2 layers x (attention.output.dense, output.dense)
    ("bert", "TOKEN_CLS", 4, 3 * 32 + 3),
    ("llama", "CAUSAL_LM", 4, 0),  # o_proj, down_proj
    ("gpt2", "CAUSAL_LM", 4, 0),  # attn.c_proj, mlp.c_proj (Conv1D)
    ("bloom", "CAUSAL_LM", 4, 0),  # self_attention.dense, mlp.dense_4h_to_h
    ("t5", "SEQ_2_SEQ_LM", 10, 0),  # encoder 2 x (self o, wo) + decoder 2 x (self o, cross o, wo)
]


@pytest.mark.parametrize("arch,task,layers,head", PLACEMENT)
def test_count_formula_and_placement(arch, task, layers, head):
    ours = wrap(tiny_model(arch, task), task, "bottleneck", BottleneckConfig())
    assert len(adapted_names(ours)) == layers
    assert ours.parameter_counts()[0] == layers * per_adapter(32, 2) + head
    base_total = sum(p.numel() for p in tiny_model(arch, task).parameters())
    assert ours.parameter_counts()[1] == base_total + layers * per_adapter(32, 2) + head


def test_which_sublayers_and_sizes():
    both = adapted_names(wrap(tiny_model("roberta", "SEQ_CLS"), "SEQ_CLS", "bottleneck", BottleneckConfig()))
    assert both == [
        "roberta.encoder.layer.0.attention.output.dense",
        "roberta.encoder.layer.0.output.dense",
        "roberta.encoder.layer.1.attention.output.dense",
        "roberta.encoder.layer.1.output.dense",
    ]
    ffn = wrap(tiny_model("roberta", "SEQ_CLS"), "SEQ_CLS", "bottleneck", BottleneckConfig(sublayers=["ffn"]))
    assert adapted_names(ffn) == [
        "roberta.encoder.layer.0.output.dense",
        "roberta.encoder.layer.1.output.dense",
    ]
    sized = wrap(
        tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", "bottleneck", BottleneckConfig(bottleneck_size=5)
    )
    assert sized.parameter_counts()[0] == 4 * per_adapter(32, 5) == 1428
    named = wrap(
        tiny_model("llama", "CAUSAL_LM"),
        "CAUSAL_LM",
        "bottleneck",
        BottleneckConfig(target_modules=["o_proj"], reduction_factor=4),
    )
    assert adapted_names(named) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert named.parameter_counts()[0] == 2 * per_adapter(32, 8)


def test_config_mistakes_are_refused():
    with pytest.raises(PeftrunError, match="reduction_factor or bottleneck_size, not both"):
        load_recipe("recipes/roberta_large_mrpc_bottleneck.yaml", ["method.bottleneck_size=32"])
    with pytest.raises(PeftrunError, match="non_linearity"):
        load_recipe("recipes/roberta_large_mrpc_bottleneck.yaml", ["method.non_linearity=softmax"])
    with pytest.raises(PeftrunError, match="no default sub-layer outputs for model type 'opt'"):
        from transformers import OPTConfig, OPTForCausalLM

        opt = OPTForCausalLM(
            OPTConfig(
                vocab_size=64,
                hidden_size=16,
                num_hidden_layers=1,
                ffn_dim=32,
                num_attention_heads=2,
                word_embed_proj_dim=16,
            )
        )
        wrap(opt, "CAUSAL_LM", "bottleneck", BottleneckConfig())


@pytest.mark.parametrize("arch,task", [("gpt2", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("roberta", "SEQ_CLS")])
def test_starts_equal_to_the_base(arch, task):
    base = tiny_model(arch, task)
    batch = tiny_batch(base, task)
    with torch.no_grad():
        expected = base(**batch).logits
        ours = wrap(base, task, "bottleneck", BottleneckConfig(non_linearity="gelu"))
        assert torch.equal(ours(**batch).logits, expected)
        # and the adapter does act once W_up is not zero
        for layer in ours.model.modules():
            if isinstance(layer, BottleneckLayer):
                torch.nn.init.normal_(layer.adapter_up["default"].weight)
        assert (ours(**batch).logits - expected).abs().max() > 1e-3


def test_save_load_round_trip_gives_identical_logits(tmp_path, tiny_dir):
    base_dir = tiny_dir("llama", "CAUSAL_LM")
    config = BottleneckConfig(init_weights=False, non_linearity="tanh", reduction_factor=8)
    ours = wrap(tiny_model("llama", "CAUSAL_LM"), "CAUSAL_LM", "bottleneck", config).eval()
    save_adapter(ours, tmp_path / "adapter", base_model=str(base_dir))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["reduction_factor"] == 8
    assert saved["non_linearity"] == "tanh" and saved["sublayers"] == ["attention", "ffn"]
    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.o_proj"
    assert {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)} == {
        f"{prefix}.adapter_down.weight": (4, 32),
        f"{prefix}.adapter_down.bias": (4,),
        f"{prefix}.adapter_up.weight": (32, 4),
        f"{prefix}.adapter_up.bias": (32,),
    }
    assert len(state) == 4 * 4

    section = ModelSection(name_or_path=str(base_dir), task_type="CAUSAL_LM", tokenizer="byt5")
    loaded, _ = load_adapted(tmp_path / "adapter", model_section=section)
    loaded.eval()
    batch = tiny_batch(ours.model, "CAUSAL_LM")
    with torch.no_grad():
        out = loaded(**batch).logits
        assert torch.equal(out, ours(**batch).logits)
        with loaded.disable_adapters():
            assert (loaded(**batch).logits - out).abs().max() > 1e-3


def test_learns_with_frozen_base_and_refuses_merge():
    ours = wrap(
        tiny_model("roberta", "SEQ_CLS"), "SEQ_CLS", "bottleneck", BottleneckConfig(bottleneck_size=8)
    )
    trainable = {id(p) for p in ours.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in ours.model.named_parameters() if id(p) not in trainable}
    batch = tiny_batch(ours.model, "SEQ_CLS", batch=4, seed=5)
    batch["labels"] = torch.tensor([0, 1, 2, 1])
    losses = train_losses(ours, batch, lr=1e-2, steps=25)
    assert losses[-1] < 0.5 * losses[0], losses
    after = {n: p.detach() for n, p in ours.model.named_parameters() if id(p) not in trainable}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ups = [m.adapter_up["default"].weight for m in ours.model.modules() if isinstance(m, BottleneckLayer)]
    assert all(w.abs().max() > 0 for w in ups)  # the adapters themselves moved, not only the head
    with pytest.raises(PeftrunError, match="cannot be merged"):
        ours.merge()


def test_peftrun_merge_refuses(tmp_path, tiny_dir):
    ours = wrap(tiny_model("roberta", "SEQ_CLS"), "SEQ_CLS", "bottleneck", BottleneckConfig())
    assert_merge_refused(
        tmp_path,
        ours,
        tiny_dir("roberta", "SEQ_CLS"),
        "SEQ_CLS",
        "method 'bottleneck' adds modules of its own and cannot be folded into the base weights",
    )


def test_params_line_for_the_mrpc_recipe():
    res = run_cli("params", "recipes/roberta_large_mrpc_bottleneck.yaml")
    assert res.returncode == 0, res.stderr
    # 48 adapters 1024 -> 64 -> 1024, plus the classification head (dense 1024x1024, out_proj 1024x2)
    trainable = 48 * per_adapter(1024, 64) + (1024 * 1024 + 1024 + 2 * 1024 + 2)
    assert trainable == 7_395_330
    assert (
        res.stdout.strip() == "trainable params: 7,395,330 || all params: 362,757,124 || trainable%: 2.0386"
    )


@pytest.mark.slow
def test_offline_recipe_learns_and_reloads(tmp_path, minilm_path):
    out = tmp_path / "run"
    recipe = str(REPO / "recipes/offline/quickstart_bottleneck.yaml")
    res = run_cli(
        "train", recipe, "--set", f"output_dir={out}", "--set", "training.progress_bar=false", timeout=1800
    )
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "accuracy" in r][-1]["accuracy"] >= 0.9
    loaded, tokenizer = load_adapted(out)
    assert len(adapted_names(loaded)) == 12  # 6 layers x (attention, ffn)
    loaded.eval()
    batch = tokenizer(
        ["The kettle smells awful.", "Absolutely love these shoes."], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        with_adapter = loaded(**batch).logits
        with loaded.disable_adapters():
            base = loaded(**batch).logits
    assert (with_adapter - base).abs().max() > 1e-2
