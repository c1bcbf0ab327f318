"""Recast a classifier's fully-connected head as convolutions, so that one forward pass over a large
image scores every window (CS231n "Converting FC layers to CONV layers"; Long et al. 2015, FCN; Sermanet
et al. 2014, OverFeat).

Expects torchvision's layout: `features` (convolutions), optional `avgpool`, `classifier`. At the
classifier's window size the last feature map is C×H×W, and:
- the first Linear(C·H·W → K) becomes Conv2d(C, K, kernel=(H, W)) with `weight.view(K, C, H, W)`
  (torch.flatten is channel-major, so the view lines up);
- every later Linear becomes a 1×1 Conv2d;
- Dropout and Flatten become nothing (eval-mode Dropout is the identity);
- AdaptiveAvgPool2d that is the identity at the window size (AlexNet's (6, 6)) is removed, since it
  would rescale larger maps; a global one (output 1×1) becomes AvgPool2d((H, W), stride=1).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.GELU, nn.Softmax, nn.Identity)


def _pair(v: int | tuple[int, ...] | None) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))  # type: ignore[index]


def _convert_avgpool(pool: nn.Module, h: int, w: int) -> tuple[list[nn.Module], int, int]:
    if isinstance(pool, nn.Identity):
        return [], h, w
    if not isinstance(pool, nn.AdaptiveAvgPool2d):
        raise ValueError(f"cannot convolutionalize avgpool {pool}")
    out = _pair(pool.output_size)
    if out == (h, w):
        return [], h, w  # identity at the window size: removed
    if out == (1, 1):
        return [nn.AvgPool2d((h, w), stride=1)], 1, 1
    raise ValueError(f"AdaptiveAvgPool2d{out} on a {h}×{w} map has no sliding equivalent")


def convolutionalize(model: nn.Module, window: tuple[int, int]) -> nn.Sequential:
    """A fully-convolutional copy of `model` (in eval mode): input (N, C, H, W) of any size ≥ window
    → scores (N, classes, H', W'); at exactly the window size the output is (N, classes, 1, 1) and
    equals `model`'s logits."""
    model = copy.deepcopy(model).eval()
    channels = model.features[0].in_channels
    with torch.no_grad():
        fmap = model.features(torch.zeros(1, channels, *window))  # (1, C, H, W)
    _, c, h, w = fmap.shape
    layers: list[nn.Module] = [*model.features]
    pool_layers, h, w = _convert_avgpool(getattr(model, "avgpool", nn.Identity()), h, w)
    layers += pool_layers

    head = model.classifier if isinstance(model.classifier, nn.Sequential) else [model.classifier]
    first = True
    for layer in head:
        if isinstance(layer, nn.Dropout | nn.Flatten) or type(layer) is nn.Identity:
            continue
        if isinstance(layer, nn.Linear):
            kernel = (h, w) if first else (1, 1)
            if layer.in_features != c * kernel[0] * kernel[1]:
                raise ValueError(f"{layer} does not read a {c}×{kernel[0]}×{kernel[1]} map")
            conv = nn.Conv2d(c, layer.out_features, kernel_size=kernel, bias=layer.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(layer.weight.view(layer.out_features, c, *kernel))
                if layer.bias is not None:
                    conv.bias.copy_(layer.bias)
            layers.append(conv)
            c, first = layer.out_features, False
        elif isinstance(layer, _ELEMENTWISE):
            layers.append(layer)
        else:
            raise ValueError(f"cannot convolutionalize classifier layer {layer}")
    return nn.Sequential(*layers).eval()
