"""A digit classifier with no Linear layer at all, after Springenberg et al. 2015, "Striving for
Simplicity: The All Convolutional Net": 3×3 convolutions, 2×2 stride-2 convolutions in place of
pooling, a 1×1 convolution to class scores and global average pooling.

No padding anywhere, and the global pool over the 4×4 class map becomes a 4×4 stride-1 average pool
at export, so the dense score map is exact, as for the padding-free LeNet.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride), nn.ReLU(inplace=True)]


class AllConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv(1, w, 3),  # (N, w, 26, 26)
            *_conv(w, w, 3),  # (N, w, 24, 24)
            *_conv(w, w, 2, stride=2),  # (N, w, 12, 12)
            *_conv(w, 2 * w, 3),  # (N, 2w, 10, 10)
            *_conv(2 * w, 2 * w, 3),  # (N, 2w, 8, 8)
            *_conv(2 * w, 2 * w, 2, stride=2),  # (N, 2w, 4, 4)
            nn.Conv2d(2 * w, num_classes, kernel_size=1),  # (N, classes, 4, 4)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # (N, classes, 1, 1)
        self.classifier = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)
