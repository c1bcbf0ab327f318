"""The part of the model card the engine computes with, typed and torch-free.

The card itself is written by export/ (export/card.py) and read here as the dict BentoML stores; this
module holds what must match training exactly: how uint8 pixels become the network's input.
"""

from __future__ import annotations

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
