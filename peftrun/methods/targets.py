"""Which modules a method adapts: per-architecture defaults, names, regex, `all-linear`, layer filters."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftrun.errors import PeftrunError

# peft's defaults, so that a recipe without target_modules adapts what a peft user expects.
LORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "umt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "falcon": ["query_key_value"],
    "distilbert": ["q_lin", "v_lin"],
}

# (IA)^3: attention keys/values and the feed-forward input (the feed-forward modules scale their input).
# peft's defaults, entry for entry, so a recipe without target_modules matches a peft adapter.
IA3_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")


def default_targets(
    table: dict[str, list[str]],
    model_type: str,
    method: str,
    *,
    field: str = "target_modules",
    hint: str = "name the modules to adapt, e.g. target_modules: [q_proj, v_proj], or 'all-linear'",
) -> list[str]:
    """`table`'s entry for the model type: what `method` takes for `field` when a config leaves it out."""
    if model_type not in table:
        raise PeftrunError(
            f"{method} has no default {field} for model type '{model_type}'", where=f"method.{field}", hint=hint
        )
    return list(table[model_type])


def is_adaptable(module: nn.Module, conv2d: bool = False) -> bool:
    """A Linear or GPT-2 Conv1D; with `conv2d` (methods that adapt convolutions) an ungrouped nn.Conv2d too."""
    if conv2d and isinstance(module, nn.Conv2d) and module.groups == 1:
        return True
    return isinstance(module, (nn.Linear, Conv1D))


def _layer_index(name: str, patterns: Sequence[str]) -> int | None:
    for pattern in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def name_matches(name: str, targets: str | Sequence[str]) -> bool:
    """A string target is a regex that must match the whole name; a list matches by name suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def wrapper_paths(model: nn.Module) -> list[str]:
    """Paths of modules an adapter already wraps; what lies inside them (base_layer, lora_A...) is no target."""
    from peftrun.methods.layers import AdapterLayer, ModulesToSave

    return [name for name, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSave))]


def _inside(name: str, wrappers: Sequence[str]) -> bool:
    return any(name.startswith(w + ".") for w in wrappers)


def all_linear_names(model: nn.Module) -> list[str]:
    """Suffixes of every Linear/Conv1D except the output head (peft's 'all-linear')."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrappers = wrapper_paths(model)
    names = set()
    for name, module in model.named_modules():
        if _inside(name, wrappers):
            continue
        if name in wrappers:
            module = getattr(module, "base_layer", module)
        if is_adaptable(module) and module is not output and name.split(".")[-1] not in HEAD_NAMES:
            names.add(name.split(".")[-1])
    return sorted(names)


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    skip: Sequence[str] = (),
    require_adaptable: bool = True,
    conv2d: bool = False,
) -> list[str]:
    """Module paths to adapt, or a PeftrunError listing the candidates when nothing matches.

    conv2d: the method adapts nn.Conv2d layers too (LoRA, LoHa, LoKr on a diffusion UNet)."""
    if target_modules == "all-linear":
        target_modules = all_linear_names(model)
    layers = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or LAYER_PATTERNS)
    found = []
    wrappers = wrapper_paths(model)  # a second adapter goes into the layers the first one wrapped
    for name, module in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip) or _inside(name, wrappers):
            continue
        if name in wrappers:
            module = getattr(module, "base_layer", module)
        if not name_matches(name, target_modules):
            continue
        if exclude_modules and name_matches(name, exclude_modules):
            continue
        if layers is not None and _layer_index(name, patterns) not in layers:
            continue
        if require_adaptable and not is_adaptable(module, conv2d):
            kinds = "Linear, Conv1D and (ungrouped) Conv2d" if conv2d else "Linear and Conv1D"
            raise PeftrunError(
                f"target module '{name}' is a {type(module).__name__}; only {kinds} layers can be adapted",
                where="method.target_modules",
            )
        found.append(name)
    if not found:
        candidates = sorted({n.split(".")[-1] for n, m in model.named_modules() if is_adaptable(m, conv2d)})
        raise PeftrunError(
            f"target_modules {target_modules!r} match no module of this model",
            where="method.target_modules",
            hint=f"layers that can be adapted here: {', '.join(candidates[:30])}",
        )
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# AdaLoRA: peft's defaults (wider than LoRA's for encoders and T5: every projection of the block).
ADALORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}

# Bottleneck adapters sit on each sub-layer's output projection: (attention, feed-forward) regexes
# over full module paths (a regex, because BERT's ffn `output.dense` is a suffix of `attention.output.dense`).
_BERT_LIKE = (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense")
_LLAMA_LIKE = (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj")
SUBLAYER_OUTPUTS: dict[str, tuple[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "t5": (r".*\.(SelfAttention|EncDecAttention)\.o", r".*\.DenseReluDense\.wo"),
    "mt5": (r".*\.(SelfAttention|EncDecAttention)\.o", r".*\.DenseReluDense\.wo"),
    "gpt2": (r".*\.(attn|crossattention)\.c_proj", r".*\.mlp\.c_proj"),
    "bloom": (r".*\.self_attention\.dense", r".*\.mlp\.dense_4h_to_h"),
}
