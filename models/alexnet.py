"""AlexNet with torchvision's exact modules and state_dict keys, so torchvision's ImageNet weights
(`alexnet-owt-7be5be79.pth`, "one weird trick" variant, Krizhevsky 2014) load unchanged:

    model = AlexNet(); model.load_state_dict(torch.load(path, weights_only=True))

Copied from torchvision/models/alexnet.py (BSD-3) rather than imported: torchvision has no CPU wheel
for this torch here, and serving must not need it anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # (N, 64, 55, 55) at 224
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (N, 64, 27, 27)
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # (N, 192, 27, 27)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (N, 192, 13, 13)
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # (N, 256, 13, 13)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (N, 256, 6, 6)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@dataclass(frozen=True)
class Weights:
    """Where pretrained weights come from and what they expect. Nothing is downloaded at run time:
    fetch `url` yourself and pass the file to `--weights`."""

    url: str
    sha256_prefix: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    top1: float


# The numbers are torchvision's published metadata for AlexNet_Weights.IMAGENET1K_V1.
IMAGENET1K_V1 = Weights(
    url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    sha256_prefix="7be5be79",
    num_classes=1000,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    top1=56.522,
)
