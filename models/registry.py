"""Which architectures exist, what input each expects, and how to build one, in the spirit of
torchvision's `list_models` / `get_model`. The input spec travels into the model card, which is all
the service ever learns about a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from modelcard import InputSpec
from models.alexnet import IMAGENET1K_V1, AlexNet
from models.allconv import AllConvNet
from models.lenet import LeNet5Classic, LeNet5ReLU

DIGITS = [str(d) for d in range(10)]
# Statistics of the MNIST training set (pixels scaled to [0, 1]).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def input_spec(mode: str, height: int, width: int, mean: tuple[float, ...], std: tuple[float, ...],
               scale: float = 1 / 255) -> InputSpec:
    """How a picture becomes the network's input: PIL mode ("L" or "RGB"), window size, then
    x = (pixel · scale − mean) / std per channel. The model card's own InputSpec (modelcard/), so what
    training declares is what export writes and the service reads."""
    return InputSpec(mode, height, width, tuple(mean), tuple(std), scale, len(mean))


def to_tensor(spec: InputSpec, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) → normalized float (N, C, H, W), with the service's numpy
    normalization (modelcard.reference.normalize), so training sees exactly what serving feeds."""
    x = np.ascontiguousarray(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return torch.from_numpy(spec.normalize(x))


@dataclass(frozen=True)
class ArchSpec:
    name: str
    constructor: Callable[..., nn.Module]
    input: InputSpec
    labels: list[str]
    description: str
    kwargs: dict = field(default_factory=dict)

    def build(self, num_classes: int | None = None) -> nn.Module:
        return self.constructor(num_classes=num_classes or len(self.labels), **self.kwargs)


_MNIST_INPUT = input_spec(mode="L", height=28, width=28, mean=MNIST_MEAN, std=MNIST_STD)
_IMAGENET_INPUT = input_spec(
    mode="RGB", height=224, width=224, mean=IMAGENET1K_V1.mean, std=IMAGENET1K_V1.std
)

ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in [
        ArchSpec(
            "lenet5-classic",
            LeNet5Classic,
            _MNIST_INPUT,
            DIGITS,
            "LeNet-5 as in d2l: padding 2, sigmoid, average pooling (dense map approximate)",
        ),
        ArchSpec(
            "lenet5-relu",
            LeNet5ReLU,
            _MNIST_INPUT,
            DIGITS,
            "padding-free LeNet-5 with ReLU and max pooling (dense map exact)",
            kwargs={"width": 2, "dropout": 0.25},
        ),
        ArchSpec(
            "allconv",
            AllConvNet,
            _MNIST_INPUT,
            DIGITS,
            "all-convolutional digit net, no Linear layers (dense map exact)",
        ),
        ArchSpec(
            "alexnet",
            AlexNet,
            _IMAGENET_INPUT,
            [f"imagenet-{i}" for i in range(IMAGENET1K_V1.num_classes)],
            "torchvision's AlexNet, state_dict compatible (dense map approximate: padded)",
        ),
    ]
}


def list_archs() -> list[str]:
    return sorted(ARCHS)


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise KeyError(f"unknown arch {name!r}; choose one of {', '.join(list_archs())}") from None


def build(name: str, num_classes: int | None = None) -> nn.Module:
    return get_arch(name).build(num_classes)
