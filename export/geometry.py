"""Where each score-map cell looks, computed from the layers (never typed in).

Receptive-field arithmetic (Dumoulin & Visin 2016, "A guide to convolution arithmetic"): through a
layer of kernel k, stride s, padding p, dilation d, with input jump j and field r,
    r ← r + (d·(k − 1))·j,   start ← start − p·j,   j ← j·s.
The score map's stride is the final jump. Cell (i, j) scores the window whose top-left input pixel is
(offset + i·stride, offset + j·stride), of the classifier's window size; a net with no padding has
its receptive field inside that window, so the cell equals the classifier on that crop (`exact`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class Geometry:
    window: int  # classifier input size (pixels per side)
    stride: int  # pixels between neighbouring cells
    offset: int  # input pixel of cell (0, 0)'s window origin
    receptive_field: int  # input pixels (per side) that can influence one cell
    receptive_field_offset: int  # where cell (0, 0)'s receptive field starts (< 0: reaches into padding)
    padded: bool  # some layer pads its input
    exact: bool  # each cell equals the classifier on its crop

    def map_size(self, size: int) -> int:
        """Cells along an axis of `size` pixels (0 when the image is smaller than the window)."""
        return 0 if size < self.window else (size - self.window) // self.stride + 1

    def to_dict(self) -> dict:
        return asdict(self)


def _first(v) -> int:
    return int(v if isinstance(v, int) else v[0])


def _square(v, what: str, layer: nn.Module) -> int:
    if not isinstance(v, int) and len(set(v)) != 1:
        raise ValueError(f"{layer}: non-square {what} {v} is not supported")
    return _first(v)


def geometry(fcn: nn.Sequential, window: int) -> Geometry:
    """Geometry of a fully-convolutional Sequential (see export.convolutionalize)."""
    jump, field, start, padded = 1, 1, 0, False
    for layer in fcn.modules():
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            if getattr(layer, "ceil_mode", False):
                raise ValueError(f"{layer}: ceil_mode pooling is not supported")
            k = _square(layer.kernel_size, "kernel", layer)
            s = _square(layer.stride, "stride", layer)
            if isinstance(layer.padding, str) and layer.padding != "valid":
                raise ValueError(f"{layer}: padding={layer.padding!r} is not supported; give numbers")
            p = 0 if isinstance(layer.padding, str) else _square(layer.padding, "padding", layer)
            d = _square(getattr(layer, "dilation", 1), "dilation", layer)
            field += d * (k - 1) * jump
            start -= p * jump
            jump *= s
            padded = padded or p > 0
    return Geometry(window=window, stride=jump, offset=0, receptive_field=field,
                    receptive_field_offset=start, padded=padded, exact=not padded)
