"""Conv2d layers in LoRA, LoHa and LoKr against the peft oracle: on a small conv net (3x3 with stride and
padding, 1x1, a Linear beside them) and on a tiny diffusers UNet: trainable counts, checkpoint keys and
shapes, outputs with the same tensors on both sides, merge == unmerged and an exact unmerge."""

from __future__ import annotations

import pytest
import torch
from oracle import PEFT_CONFIGS, TOL, perturb
from safetensors.torch import load_file
from torch import nn

from peftrun.adapted import wrap
from peftrun.io.peft_format import ADAPTER_WEIGHTS, save_adapter
from peftrun.methods import get_method

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(6, 12, 3, stride=2, padding=1)
        self.point = nn.Conv2d(12, 8, 1)
        self.dense = nn.Linear(8, 10)

    def forward(self, x):
        return self.dense(self.point(torch.relu(self.conv(x))).mean(dim=(2, 3)))


NET_TARGETS = ["conv", "point", "dense"]
UNET_TARGETS = ["to_q", "to_v", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "conv_out"]
# each method with the variants that change the conv factors' layout
CASES = [
    ("lora", {"r": 4, "lora_alpha": 8}),
    ("lora", {"r": 2, "lora_alpha": 4, "rank_pattern": {"point": 3}, "use_rslora": True}),
    ("loha", {"r": 4, "alpha": 8}),
    ("loha", {"r": 2, "alpha": 4, "use_effective_conv2d": True}),
    ("lokr", {"r": 2, "alpha": 4}),
    ("lokr", {"r": 1, "alpha": 4, "use_effective_conv2d": True, "decompose_both": True}),
    ("lokr", {"r": 8, "alpha": 4}),  # full W2 factors: kernel-shaped lokr_w2
]
IDS = [f"{m}-{i}" for i, (m, _) in enumerate(CASES)]
RANDOM = {"lora": {"init_lora_weights": False}, "loha": {"init_weights": False}, "lokr": {"init_weights": False}}


def net_input() -> torch.Tensor:
    return torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(5))


def pair(make, method: str, config: dict, targets: list[str]):
    """(ours, peft's) on two copies of the same base, peft's adapter tensors set to ours."""
    config = {**config, "target_modules": targets}
    ours = wrap(make(), None, method, get_method(method).Config.model_validate(config))
    theirs = peft.get_peft_model(make(), getattr(peft, PEFT_CONFIGS[method])(**config))
    perturb(ours)
    state = ours.adapter_state_dict()
    peft.set_peft_model_state_dict(theirs, {k: v.detach().clone() for k, v in state.items()})
    return ours, theirs


def unet():
    from tiny_diffusion import tiny_unet

    return tiny_unet()


def unet_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 16, generator=g)


@torch.no_grad()
def noise(model, inputs) -> torch.Tensor:
    model.eval()
    sample, t, text = inputs
    return model(sample, t, encoder_hidden_states=text).sample


@pytest.mark.parametrize("method,config", CASES, ids=IDS)
def test_conv_net_equals_peft(tmp_path, method, config):
    ours, theirs = pair(ConvNet, method, config, NET_TARGETS)
    assert ours.parameter_counts() == theirs.get_nb_trainable_parameters()
    save_adapter(ours, tmp_path / "ours", base_model="net")
    theirs.save_pretrained(tmp_path / "theirs")
    shapes = [
        {k: tuple(v.shape) for k, v in load_file(tmp_path / side / ADAPTER_WEIGHTS).items()}
        for side in ("ours", "theirs")
    ]
    assert shapes[0] == shapes[1]
    assert any(".conv." in k for k in shapes[0]) and any(".point." in k for k in shapes[0])  # the convs are adapted
    x = net_input()
    ours.eval(), theirs.eval()
    with torch.no_grad():
        expected = ConvNet()(x)
        got, want = ours(x), theirs(x)
    assert (got - expected).abs().max() > 1e-3  # the adapter changes the output
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("method,config", CASES, ids=IDS)
def test_conv_merge_equals_unmerged_and_unmerge_is_exact(method, config):
    model = wrap(ConvNet(), None, method, get_method(method).Config.model_validate({**config, "target_modules": NET_TARGETS}))
    perturb(model)
    frozen = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if not p.requires_grad}
    x = net_input()
    model.eval()
    with torch.no_grad():
        before = model(x)
        model.merge()
        assert (model(x) - before).abs().max().item() <= TOL
        model.unmerge()
        assert all(torch.equal(p, c) for p, c in frozen.values())
        assert torch.equal(model(x), before)
        plain = model.merge_and_unload()
        assert (plain(x) - before).abs().max().item() <= TOL


@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
def test_default_init_starts_from_the_base_on_conv(method):
    model = wrap(ConvNet(), None, method, get_method(method).Config.model_validate({"target_modules": ["conv"]}))
    x = net_input()
    with torch.no_grad():
        assert torch.equal(model(x), ConvNet()(x))


@pytest.mark.parametrize("method,config", [CASES[0], CASES[3], CASES[5]], ids=["lora", "loha-cp", "lokr-cp"])
def test_unet_noise_prediction_equals_peft_and_merges(method, config):
    ours, theirs = pair(unet, method, {**config, **RANDOM[method]}, UNET_TARGETS)
    assert ours.parameter_counts() == theirs.get_nb_trainable_parameters()
    assert set(ours.adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs))
    inputs = unet_inputs()
    got = noise(ours, inputs)
    assert (got - noise(unet(), inputs)).abs().max() > 1e-3
    assert (got - noise(theirs, inputs)).abs().max().item() <= TOL
    ours.merge()
    assert (noise(ours, inputs) - got).abs().max().item() <= TOL
    ours.unmerge()
    assert torch.equal(noise(ours, inputs), got)


def test_conv_learns_with_frozen_base():
    model = wrap(ConvNet(), None, "lora", get_method("lora").Config.model_validate({"target_modules": NET_TARGETS}))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x, y = net_input(), torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_ia3_still_refuses_conv2d_and_grouped_conv_is_refused():
    from oracle import check_refuses_conv2d

    from peftrun.errors import PeftrunError

    check_refuses_conv2d("ia3", feedforward_modules=[])
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(PeftrunError, match="Linear, Conv1D and"):
        wrap(net, None, "lora", get_method("lora").Config.model_validate({"target_modules": ["0"]}))
