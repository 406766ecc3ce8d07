"""One adapter name across a pipeline's components, each with its own config, in peft's layout on disk.

peft's DreamBooth example wraps the UNet and the text encoder separately (get_peft_model on each) and saves
them as output_dir/unet/ and output_dir/text_encoder/, each an ordinary peft adapter folder whose keys are
those get_peft_model(component, config) writes (`base_model.model.<path>.lora_A.weight`). Here a
`DiffusionPeftModel` holds the whole `Components` module (so the training loop, checkpoints and resume see
one model); a component's adapter goes through the ordinary PeftrunModel machinery on that component
alone (`view`), which gives the same keys and adapter_config.json as for a transformers model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftrun.adapted import PeftrunModel
from peftrun.diffusion import ADAPTED_COMPONENTS
from peftrun.errors import PeftrunError
from peftrun.methods import Method, MethodConfig, get_method
from peftrun.tasks import TEXT_TO_IMAGE


class DiffusionPeftModel(PeftrunModel):
    """`model` is a diffusion.components.Components; adapters live in its unet (and text_encoder)."""

    def __init__(self, model, task_type: str = TEXT_TO_IMAGE):
        super().__init__(model, task_type)
        self.chunked_loss = False
        # adapter name -> {component: its config, with the defaults the method resolved}
        self.component_configs: dict[str, dict[str, MethodConfig]] = {}

    def view(self, component: str, name: str | None = None) -> PeftrunModel:
        """A PeftrunModel over one component holding adapter `name` (or all of them): peft's keys and
        adapter_config.json for that component alone. The view shares the component's modules."""
        view = PeftrunModel(getattr(self.model, component), None)
        for each, configs in self.component_configs.items():
            if component in configs and (name is None or each == name):
                view.configs[each], view.methods[each] = configs[component], self.methods[each]
        view.active_adapter = name or self.active_adapter
        return view

    def components_of(self, name: str) -> list[str]:
        return list(self.component_configs.get(name, {}))

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(
        self, name: str, method: str | Method, config: MethodConfig, text_encoder: MethodConfig | None = None
    ) -> None:
        """Adapter `name` on the UNet with `config` and, where given, on the text encoder with `text_encoder`."""
        method = get_method(method) if isinstance(method, str) else method
        if name in self.configs:
            raise PeftrunError(f"an adapter named '{name}' is already loaded")
        wanted = {"unet": config, "text_encoder": text_encoder}
        resolved: dict[str, MethodConfig] = {}
        for component, cfg in wanted.items():
            if cfg is None:
                continue
            view = PeftrunModel(getattr(self.model, component), None)
            view.add_adapter(name, method, cfg)
            resolved[component] = view.configs[name]
        self.component_configs[name] = resolved
        self.configs[name], self.methods[name] = resolved["unet"], method
        self.set_adapter(name)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.component_configs.pop(name, None)

    def adapter_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """`<component>.<peft key>` for every component the adapter is on."""
        name = name or self.active_adapter
        return {
            f"{component}.{key}": tensor
            for component in self.components_of(name)
            for key, tensor in self.view(component, name).adapter_state_dict(name).items()
        }

    def load_adapter(self, folder: str | Path, name: str = "default", *, allow_pickle: bool = False) -> None:
        """A DreamBooth adapter folder (unet/ and maybe text_encoder/, each in peft's format) under `name`."""
        from peftrun.io.peft_format import ADAPTER_CONFIG, config_from_peft, read_adapter
        from peftrun.methods import method_for_peft_type

        folder = Path(folder)
        parts = {c: folder / c for c in ADAPTED_COMPONENTS if (folder / c / ADAPTER_CONFIG).is_file()}
        if "unet" not in parts:
            raise PeftrunError(
                "not a TEXT_TO_IMAGE adapter: no unet/adapter_config.json here", where=str(folder),
                hint="a DreamBooth adapter folder holds unet/ (and text_encoder/), each in peft's format",
            )
        configs, state, method = {}, {}, None
        for component, sub in parts.items():
            config, tensors = read_adapter(sub, allow_pickle=allow_pickle)
            this = method_for_peft_type(config.get("peft_type", ""))
            if method is not None and this is not method:
                raise PeftrunError("unet/ and text_encoder/ hold adapters of different methods", where=str(folder))
            method = this
            configs[component] = config_from_peft(method, config, where=str(sub / ADAPTER_CONFIG))
            state.update({f"{component}.{k}": v for k, v in tensors.items()})
        previous = self.active_adapter
        self.add_adapter(name, method, configs["unet"], configs.get("text_encoder"))
        self._fill_loaded(name, state, previous, folder)

    # -- several at once -----------------------------------------------------------------------
    def set_weighted(self, weights: dict[str, float]) -> None:
        """Run several adapters at once, each update scaled by its weight (peft's and diffusers'
        multi-adapter inference: W x + Σ_i w_i ΔW_i x). `set_adapter` returns to one adapter at its own scale."""
        from peftrun.methods.layers import AdapterLayer

        unknown = sorted(set(weights) - set(self.configs))
        if unknown:
            raise PeftrunError(f"no adapter named {unknown}", hint=f"loaded: {', '.join(self.configs)}")
        for layer in self.adapter_modules():
            if not isinstance(layer, AdapterLayer):
                continue
            base = layer.__dict__.setdefault("_own_scaling", dict(layer.scaling))
            for name in layer.adapter_names():
                base.setdefault(name, layer.scaling[name])
                layer.scaling[name] = base[name] * weights.get(name, 1.0)
            layer.set_active([n for n in weights if weights[n] != 0])
        self.active_adapter = next(iter(weights))

    def set_adapter(self, name: str) -> None:
        for layer in self.adapter_modules():
            own = layer.__dict__.pop("_own_scaling", None)
            if own:
                layer.scaling.update(own)
        super().set_adapter(name)

    # -- on disk -------------------------------------------------------------------------------
    def write_components(self, tmp: Path, name: str, base_model: str, state: dict[str, torch.Tensor]) -> None:
        """tmp/unet/ and tmp/text_encoder/, each adapter_config.json + adapter_model.safetensors as peft writes
        them for that component (io.peft_format.write_adapter calls this; the recipe copy goes beside them)."""
        from peftrun.io.peft_format import write_adapter

        for component in self.components_of(name):
            prefix = component + "."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            (tmp / component).mkdir(parents=True, exist_ok=True)
            write_adapter(tmp / component, self.view(component, name), name, base_model, state=own)


def is_diffusion_adapter(folder: str | Path) -> bool:
    return (Path(folder) / "unet" / "adapter_config.json").is_file()


def adapted_from_recipe(recipe, *, meta: bool = True) -> DiffusionPeftModel:
    """The recipe's adapted components, on the meta device by default (`peftrun params`, `estimate`)."""
    from peftrun.diffusion.components import load_components
    from peftrun.recipe import text_encoder_config

    components = load_components(recipe.model, meta=meta)
    train_text = recipe.dreambooth.train_text_encoder
    components.train_text_encoder = train_text
    model = DiffusionPeftModel(components)
    model.add_adapter(
        "default", recipe.method.name, recipe.method_config, text_encoder_config(recipe) if train_text else None
    )
    return model
