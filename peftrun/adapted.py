"""A transformers model with named adapters: add, switch, disable, delete, merge, count, state in peft keys."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftrun import lm_loss
from peftrun.errors import PeftrunError
from peftrun.methods import Method, MethodConfig, get_method
from peftrun.methods.layers import AdapterLayer, ModulesToSave
from peftrun.tasks import CAUSAL_LM, SEQ_2_SEQ_LM


class PeftrunModel(nn.Module):
    """Holds the base model as `.model`; adapters live inside it (wrapped layers) or in `prompt_encoders`."""

    def __init__(self, model: nn.Module, task_type: str):
        super().__init__()
        self.model = model
        self.task_type = task_type
        self.prompt_encoders = nn.ModuleDict()
        self.configs: dict[str, MethodConfig] = {}
        self.methods: dict[str, Method] = {}
        self.active_adapter: str | None = None
        self.adapter_folders: dict[str, Path] = {}  # where each adapter loaded with load_adapter came from
        self._disabled = False
        self.chunked_loss = True  # an LM's training loss without the full logits (lm_loss), where exact
        self.loss_only = False  # the caller reads only the loss (evaluation): the chunks apply without gradients

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, method: str | Method, config: MethodConfig) -> None:
        method = get_method(method) if isinstance(method, str) else method
        if name in self.configs:
            raise PeftrunError(f"an adapter named '{name}' is already loaded")
        resolved = method.apply(self, config, name)
        # The model keeps its own copy of the config, with the defaults apply resolved that adapter_config.json
        # names (inject's Injected.saved_fields); the caller's object is never written to.
        self.configs[name] = config.model_copy(update=dict(getattr(resolved, "saved_fields", {})), deep=True)
        self.methods[name] = method
        self.set_adapter(name)

    def load_adapter(self, folder: str | Path, name: str = "default", *, allow_pickle: bool = False) -> None:
        """Add a saved adapter (peft format) under `name` beside those already loaded, and make it active."""
        from peftrun.io.peft_format import ADAPTER_CONFIG, config_from_peft, read_adapter
        from peftrun.methods import method_for_peft_type

        folder = Path(folder)
        config, state = read_adapter(folder, allow_pickle=allow_pickle)
        task_type = config.get("task_type")
        if task_type and task_type != self.task_type:
            raise PeftrunError(
                f"this adapter was trained for {task_type}, the model here is {self.task_type}", where=str(folder)
            )
        method = method_for_peft_type(config.get("peft_type", ""))
        previous = self.active_adapter
        self.add_adapter(name, method, config_from_peft(method, config, where=str(folder / ADAPTER_CONFIG)))
        self._fill_loaded(name, state, previous, folder)

    def _fill_loaded(self, name: str, state: dict, previous: str | None, folder: Path) -> None:
        """Copy a just-added adapter's saved tensors in; on a mismatch take it out again and reactivate
        `previous`, so a failed load leaves the model as it was."""
        try:
            self.load_adapter_state_dict(state, name)
        except PeftrunError:
            self.delete_adapter(name)
            if previous is not None:
                self.set_adapter(previous)
            raise
        self.adapter_folders[name] = folder

    def set_adapter(self, name: str) -> None:
        if name not in self.configs:
            raise PeftrunError(f"no adapter named '{name}'", hint=f"loaded: {', '.join(self.configs) or 'none'}")
        self.active_adapter = name
        for layer in self.adapter_modules():
            layer.set_active([name])

    @property
    def method(self) -> Method:
        return self.methods[self.active_adapter]

    @property
    def config(self) -> MethodConfig:
        return self.configs[self.active_adapter]

    def adapter_modules(self) -> Iterator[AdapterLayer | ModulesToSave]:
        for module in self.model.modules():
            if isinstance(module, (AdapterLayer, ModulesToSave)):
                yield module

    @contextmanager
    def disable_adapters(self):
        """Inside this block the model behaves as the base model."""
        previous = self._disabled
        self._set_disabled(True)
        try:
            yield self
        finally:
            self._set_disabled(previous)

    def _set_disabled(self, value: bool) -> None:
        self._disabled = value
        for layer in self.adapter_modules():
            layer.disabled = value

    def delete_adapter(self, name: str) -> None:
        if name not in self.configs:
            raise PeftrunError(f"no adapter named '{name}'")
        for layer in self.adapter_modules():
            layer.delete_adapter(name)
        if name in self.prompt_encoders:
            del self.prompt_encoders[name]
        del self.configs[name], self.methods[name]
        self.adapter_folders.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.configs), None)
            if self.active_adapter:
                self.set_adapter(self.active_adapter)

    @contextmanager
    def row_adapters(self, names: list[str | None]):
        """One forward where row i of the batch uses adapter names[i] (None: the base model)."""
        unknown = {n for n in names if n is not None and n not in self.configs}
        if unknown:
            raise PeftrunError(f"no adapter named {sorted(unknown)}", hint=f"loaded: {', '.join(self.configs)}")
        prompts = sorted({n for n in names if n is not None and self.methods[n].is_prompt_learning})
        if prompts:
            raise PeftrunError(
                f"soft-prompt adapters {prompts} change the input itself and cannot share a mixed batch",
                hint="run their rows in batches of their own",
            )
        for layer in self.adapter_modules():
            layer.row_adapters = list(names)
        try:
            yield self
        finally:
            for layer in self.adapter_modules():
                layer.row_adapters = None

    # -- running -------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self.active_adapter and self.method.forward and not self._disabled:
            return self.method.forward(self, self.active_adapter, *args, **kwargs)
        return self.run_base(*args, **kwargs)

    def run_base(self, *args, **kwargs):
        """The base model's forward; a causal or seq2seq LM's training loss in chunks (peftrun.lm_loss) where
        it applies."""
        if self.chunked_loss:
            only = self.loss_only
            if self.task_type == CAUSAL_LM and lm_loss.applies(self.model, kwargs, loss_only=only):
                return lm_loss.causal_lm_forward(self.model, *args, **kwargs)
            if self.task_type == SEQ_2_SEQ_LM and lm_loss.applies(self.model, kwargs, seq2seq=True, loss_only=only):
                return lm_loss.seq2seq_lm_forward(self.model, *args, **kwargs)
        return self.model(*args, **kwargs)

    @contextmanager
    def reading_loss_only(self):
        """Within it, forwards with labels return the loss without logits where lm_loss applies (evaluation)."""
        before, self.loss_only = self.loss_only, True
        try:
            yield self
        finally:
            self.loss_only = before

    def generate(self, *args, **kwargs):
        if self.active_adapter and self.method.generate and not self._disabled:
            return self.method.generate(self, self.active_adapter, *args, **kwargs)
        return self.model.generate(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- merging -------------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None) -> None:
        names = names or [self.active_adapter]
        for name in names:
            if not self.methods[name].mergeable:
                raise PeftrunError(f"method '{self.methods[name].name}' cannot be merged into the base weights")
        for layer in self.adapter_modules():
            if isinstance(layer, AdapterLayer):
                layer.merge([n for n in names if n in layer.adapter_names()])

    def unmerge(self) -> None:
        for layer in self.adapter_modules():
            if isinstance(layer, AdapterLayer):
                layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapter in for good and give back a plain transformers model."""
        from peftrun.methods.targets import set_module

        name = self.active_adapter
        if not self.methods[name].mergeable:
            raise PeftrunError(f"method '{self.methods[name].name}' cannot be merged into the base weights")
        for path, module in list(self.model.named_modules()):
            if isinstance(module, AdapterLayer):
                if name in module.adapter_names():
                    module.merge([name], keep_original=False)
                set_module(self.model, path, module.base_layer)
            elif isinstance(module, ModulesToSave):
                keep = module.modules_to_save[name] if name in module.modules_to_save else module.original_module
                set_module(self.model, path, keep)
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    # -- counting ------------------------------------------------------------------------------
    def parameter_counts(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3 partitions parameters
                n = p.ds_numel
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def trainable_report(self) -> str:
        trainable, total = self.parameter_counts()
        return format_trainable(trainable, total)

    def print_trainable_parameters(self) -> None:
        """peft's name for printing the trainable-parameter line."""
        print(self.trainable_report())

    # -- saving --------------------------------------------------------------------------------
    def save_pretrained(
        self, folder: str | Path, adapter_name: str | None = None, *, base_model: str | None = None, tokenizer=None,
    ) -> Path:
        """Write adapter `adapter_name` (default: the active one) to `folder` in peft's format, which
        peft.PeftModel.from_pretrained(base, folder) and peftrun.load(adapters=folder) read. base_model: the
        name or folder recorded as base_model_name_or_path (default: the one the base was loaded from)."""
        from peftrun.io.peft_format import save_adapter

        name = adapter_name or self.active_adapter
        if name not in self.configs:
            raise PeftrunError(f"no adapter named '{name}' to save", hint=f"loaded: {', '.join(self.configs) or 'none'}")
        config = getattr(self.model, "config", None)
        base = base_model or getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
        if not base:
            raise PeftrunError(
                "the base model records no name or folder it came from (built from a config?)",
                hint="pass base_model='hub/id or folder' to save_pretrained",
            )
        return save_adapter(self, folder, name=name, base_model=str(base), tokenizer=tokenizer, whole_folder=False)

    # -- state in peft's keys ------------------------------------------------------------------
    def key_prefix(self, name: str) -> str:
        return "base_model." if self.methods[name].is_prompt_learning else "base_model.model."

    def adapter_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors under the keys peft writes (adapter name left out)."""
        name = name or self.active_adapter
        method = self.methods[name]
        state: dict[str, torch.Tensor] = {}
        if method.state is not None:
            state.update(method.state(self, name))
        prefix = self.key_prefix(name)
        for path, module in self.model.named_modules():
            if isinstance(module, (AdapterLayer, ModulesToSave)):
                for suffix, tensor in module.adapter_state(name).items():
                    state[f"{prefix}{path}.{suffix}"] = tensor
        if getattr(self.configs[name], "bias", "none") != "none":
            for path, param in self.model.named_parameters():
                if path.endswith(".bias") and param.requires_grad and ".modules_to_save." not in path:
                    state.setdefault(f"{prefix}{path}", param)
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], name: str | None = None) -> None:
        """Copy tensors in; refuse with the mismatching keys and shapes when they do not fit."""
        name = name or self.active_adapter
        method = self.methods[name]
        state = dict(state)
        if method.load_state is not None:
            method.load_state(self, name, state)  # consumes its own keys
        own = self.adapter_state_dict(name)
        if method.state is not None:
            for key in method.state(self, name):
                own.pop(key, None)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and tuple(state[k].shape) != tuple(own[k].shape)
        ]
        if missing or unexpected or wrong:
            parts = []
            if wrong:
                parts.append("shapes differ: " + "; ".join(wrong[:5]))
            if missing:
                parts.append(f"{len(missing)} key(s) missing, e.g. {', '.join(missing[:3])}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
            raise PeftrunError(
                "the adapter does not fit this base model: " + "; ".join(parts),
                hint="check that the recipe's model.name_or_path is the base the adapter was trained on",
            )
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key].to(dtype=tensor.dtype, device=tensor.device))


def format_trainable(trainable: int, total: int) -> str:
    """peft's own line, so users can compare counts at a glance."""
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def wrap(
    model: nn.Module,
    task_type: str,
    method: str | Method,
    config: Any,
    name: str = "default",
    *,
    fused_lora: bool = True,
) -> PeftrunModel:
    """`model` with adapter `name`. fused_lora: False runs this model's LoRA layers through the plain modules
    instead of the fused function (a recipe's training.fused_lora)."""
    peft_model = PeftrunModel(model, task_type)
    peft_model.add_adapter(name, method, config)
    if not fused_lora:
        from peftrun.methods.lora import use_fused

        use_fused(peft_model, False)
    return peft_model
