"""The part of the model card the engine computes with, typed and torch-free.

The card itself is written by export/ (export/card.py) and read here as the dict BentoML stores; this
module holds what must match training exactly: how uint8 pixels become the network's input; and the
dense geometry the engine warms tiles with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    channels: int
    mode: str  # PIL mode the pixels are converted to: "L" or "RGB"
    height: int  # the window the classifier was trained on
    width: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_card(cls, card: dict) -> InputSpec:
        spec = card["input"]
        return cls(int(spec["channels"]), spec["mode"], int(spec["height"]), int(spec["width"]),
                   float(spec["scale"]), tuple(spec["mean"]), tuple(spec["std"]))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) → float32 (N, C, H, W): x = (pixel·scale − mean) / std, the formula of
        models.registry.InputSpec.to_tensor, written with `out=` so a batch costs one allocation."""
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        x = np.multiply(pixels, np.float32(self.scale), dtype=np.float32)
        np.subtract(x, mean, out=x)
        np.divide(x, std, out=x)
        return x


def context_margin(card: dict) -> int:
    """Pixels of context a tile needs beyond its cells' windows so they see what they see in one
    pass: what the receptive field reaches past the window (into the net's padding), in whole strides;
    0 for padding-free nets."""
    d = card["dense"]
    start, field = d["receptive_field_offset"], d["receptive_field"]
    reach = max(-start, start + field - d["window"], 0)
    return math.ceil(reach / d["stride"]) * d["stride"]


def fixed_tile_side(card: dict, max_pixels: int) -> int:
    """The side of one-shape tiles (service/dense.py tiles()) of about max_pixels; 0 where the net has
    padding: a tile moved back from the image's edge would leave its edge cells short of context, so
    those nets keep tiles cut to the image.

    Each tile owns a power-of-two side's cells (2048 px for 4 Mi) and reads window + one stride more,
    the overlap that tiles of the peak head need (dense.tiled_peaks): a 4096² page is then 2 × 2
    tiles, as tiles cut to it are, not 3 × 3."""
    d = card["dense"]
    win, s = d["window"], d["stride"]
    if context_margin(card):
        return 0
    owned = max(2 ** int(math.log2(math.sqrt(max_pixels))) // s * s, s)
    return owned + win + s
