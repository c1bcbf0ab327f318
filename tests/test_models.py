"""Model definitions: shapes, the registry, and AlexNet's torchvision compatibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.alexnet import AlexNet
from models.allconv import AllConvNet
from models.registry import build, get_arch, list_archs, to_tensor

# torchvision.models.alexnet().state_dict(): key → shape, pinned here so torchvision is not needed.
TORCHVISION_ALEXNET = {
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
    "classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
}


def test_alexnet_state_dict_matches_torchvision():
    state = AlexNet().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == TORCHVISION_ALEXNET
    assert list(state) == list(TORCHVISION_ALEXNET)  # same order, as torchvision writes it


def test_alexnet_loads_a_torchvision_format_file(tmp_path):
    """A file in torchvision's format (plain tensors under its keys) loads with weights_only=True."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen) for k, shape in TORCHVISION_ALEXNET.items()}
    torch.save(state, tmp_path / "alexnet-owt.pth")
    model = AlexNet()
    model.load_state_dict(torch.load(tmp_path / "alexnet-owt.pth", weights_only=True))
    assert torch.equal(model.classifier[6].bias, state["classifier.6.bias"])
    assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("arch", list_archs())
def test_every_arch_classifies_its_window(arch):
    spec = get_arch(arch)
    model = build(arch, num_classes=7).eval()
    x = torch.randn(2, spec.input.channels, spec.input.height, spec.input.width)
    assert model(x).shape == (2, 7)
    assert set(model._modules) >= {"features", "classifier"}  # torchvision's layout


def test_allconv_has_no_linear_layer():
    assert not any(isinstance(m, nn.Linear) for m in AllConvNet().modules())


def test_unknown_arch_names_the_choices():
    with pytest.raises(KeyError, match="lenet5-relu"):
        get_arch("resnet")


def test_input_spec_normalizes_like_the_card_says():
    spec = get_arch("lenet5-relu").input
    x = to_tensor(spec, torch.full((1, 28, 28), 255, dtype=torch.uint8).numpy())
    assert x.shape == (1, 1, 28, 28)
    assert torch.allclose(x, torch.tensor((1 - 0.1307) / 0.3081))
