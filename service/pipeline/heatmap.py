"""A heat-map PNG: one class's probability per score-map cell, drawn over the image.

Each cell's value is painted over its window's centre stride×stride square and smoothed bilinearly;
colours go black → red → yellow → white ("hot"), opacity grows with probability, so the page shows
through where nothing was found.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.pipeline.dense import Map


def hot(v: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] → (H, W, 3) uint8, the classic "hot" colour map."""
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


def render(image: Image.Image, prob: np.ndarray, m: Map, scale: float = 1.0) -> bytes:
    """`prob`: (h, w) in [0, 1] on the grid of `m`, which was scored on `image` resized by 1/`scale`."""
    h, w = prob.shape
    cell = m.stride * scale  # cell pitch in original pixels
    grid = Image.fromarray(prob.astype(np.float32), "F")
    grid = grid.resize((max(1, round(w * cell)), max(1, round(h * cell))), Image.BILINEAR)
    layer = np.zeros((image.height, image.width), np.float32)
    origin = round((m.offset + (m.window - m.stride) / 2) * scale)
    values = np.asarray(grid)[: image.height - origin, : image.width - origin]
    layer[origin : origin + values.shape[0], origin : origin + values.shape[1]] = values
    base = np.asarray(image.convert("L").convert("RGB"), np.float32)
    alpha = (0.15 + 0.75 * layer)[..., None]
    blended = base * (1 - alpha) + hot(layer).astype(np.float32) * alpha
    out = io.BytesIO()
    Image.fromarray(blended.clip(0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()
