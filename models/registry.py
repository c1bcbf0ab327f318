"""Which architectures exist, what input each expects, and how to build one, in the spirit of
torchvision's `list_models` / `get_model`. The input spec travels into the model card, which is all
the service ever learns about a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from models.alexnet import IMAGENET1K_V1, AlexNet
from models.allconv import AllConvNet
from models.lenet import LeNet5Classic, LeNet5ReLU

DIGITS = [str(d) for d in range(10)]
BACKGROUND = "background"
# Statistics of the MNIST training set (pixels scaled to [0, 1]).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


@dataclass(frozen=True)
class InputSpec:
    """How a picture becomes the network's input: PIL mode, window size, then
    x = (pixel · scale − mean) / std per channel."""

    mode: str  # "L" or "RGB"
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1 / 255

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": self.channels}

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W) or (N, H, W, C) → normalized float (N, C, H, W), as the service does it."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float() * self.scale
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std


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


_MNIST_INPUT = InputSpec(mode="L", height=28, width=28, mean=MNIST_MEAN, std=MNIST_STD)
_IMAGENET_INPUT = InputSpec(
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
