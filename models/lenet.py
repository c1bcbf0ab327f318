"""LeNet-5, in two forms, both for 28×28 single-channel digits.

- `LeNet5Classic`: the version in Dive into Deep Learning §7.6 (after LeCun et al. 1998): 5×5 convs,
  the first padded by 2 so a 28×28 MNIST digit plays the part of the original 32×32 input, sigmoid
  activations, average pooling, and a 120-84-10 sigmoid head.
- `LeNet5ReLU`: the same shape without padding, with ReLU and max pooling. No padding means every
  cell of the dense score map equals the classifier run on that cell's 28×28 crop (see export/).
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet5Classic(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2),  # (N, 6, 28, 28)
            nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),  # (N, 6, 14, 14)
            nn.Conv2d(6, 16, kernel_size=5),  # (N, 16, 10, 10)
            nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),  # (N, 16, 5, 5)
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class LeNet5ReLU(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 1, dropout: float = 0.0) -> None:
        """`width` multiplies the channel counts (6, 16, 120, 84); `dropout` sits before the two
        hidden Linears and becomes identity at export."""
        super().__init__()
        c1, c2, f1, f2 = 6 * width, 16 * width, 120 * width, 84 * width
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=5),  # (N, c1, 24, 24)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # (N, c1, 12, 12)
            nn.Conv2d(c1, c2, kernel_size=5),  # (N, c2, 8, 8)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # (N, c2, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(c2 * 4 * 4, f1),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(f1, f2),
            nn.ReLU(inplace=True),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)
