"""Dense scoring pieces (service/pipeline/dense.py, detect.py) against brute force, in-process with
onnxruntime: finer stride vs per-crop scoring at stride 1, tiles vs one pass, NMS and box geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.convolutionalize import convolutionalize
from export.geometry import geometry
from export.onnx_export import export_onnx, session
from modelcard import DenseGeometry, ModelCard
from modelcard.reference import local_peaks
from models.registry import build
from service.pipeline import dense, detect


@pytest.fixture(scope="module", params=["lenet5-relu", "lenet5-classic"])
def net(request, tmp_path_factory):
    """(run, card) for a random-weight net: the same `run` contract as ServedModel.run."""
    torch.manual_seed(0)
    fcn = convolutionalize(build(request.param).eval(), (28, 28))
    geo = geometry(fcn, 28)
    path = tmp_path_factory.mktemp("dense") / f"{request.param}.onnx"
    export_onnx(fcn, 1, 28, path)
    sess = session(path)

    def run(x: np.ndarray) -> np.ndarray:
        scores = sess.run(["scores"], {"input": x.astype(np.float32)})[0]
        return scores[:, :, : geo.map_size(x.shape[2]), : geo.map_size(x.shape[3])]

    card = ModelCard.from_dict({"name": request.param, "labels": [str(d) for d in range(10)],
                                "input": {"mode": "L", "height": 28, "width": 28, "mean": [0.0], "std": [1.0],
                                          "scale": 1.0, "channels": 1},
                                "dense": geo.to_dict(), "onnx": {"input": "input", "output": "scores"}})
    return run, card


def per_crop(run, x: np.ndarray, step: int) -> np.ndarray:
    """Brute force: the classifier on every window at `step` px, as one batch of crops."""
    _, height, width = x.shape
    h, w = (height - 28) // step + 1, (width - 28) // step + 1
    crops = np.stack([x[:, i * step : i * step + 28, j * step : j * step + 28]
                      for i in range(h) for j in range(w)])
    return run(crops)[:, :, 0, 0].T.reshape(-1, h, w)


@pytest.mark.parametrize("factor", [2, 4])
def test_finer_stride_equals_per_crop_scoring(net, factor):
    run, card = net
    if not card.dense.exact:
        pytest.skip("exact only for padding-free nets")
    x = np.random.default_rng(0).normal(size=(1, 61, 75)).astype(np.float32)
    m = dense.finer(run, x, card, factor, max_pixels=10**9)
    assert m.stride == 4 // factor
    expected = per_crop(run, x, m.stride)
    assert m.scores.shape == expected.shape
    np.testing.assert_allclose(m.scores, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_stride_factor_must_divide_the_stride(net):
    run, card = net
    with pytest.raises(ValueError, match="divide"):
        dense.finer(run, np.zeros((1, 40, 40), np.float32), card, 3, 10**9)


@pytest.mark.parametrize("shape", [(1, 200, 173), (1, 97, 300)])
def test_tiles_equal_one_pass(net, shape):
    """Tiles overlapping by window − stride (+ a context margin for padded nets) stitch into exactly
    the one-pass map, for padded and padding-free nets."""
    run, card = net
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    whole = dense.one_pass(run, x, card).scores
    for budget in (40 * 40, 64 * 64, 100 * 90):
        stitched = dense.tiled(run, x, card, max_pixels=budget).scores
        assert stitched.shape == whole.shape
        assert np.abs(stitched - whole).max() <= 1e-5 * max(1.0, np.abs(whole).max())


def test_finer_stride_with_tiles_equals_without(net):
    run, card = net
    x = np.random.default_rng(2).normal(size=(1, 120, 90)).astype(np.float32)
    a = dense.finer(run, x, card, 2, max_pixels=10**9).scores
    b = dense.finer(run, x, card, 2, max_pixels=50 * 50).scores
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


@pytest.mark.parametrize("shape", [(1, 200, 173), (1, 97, 300), (1, 61, 75), (1, 120, 60)])
def test_fixed_tiles_are_one_shape_and_equal_one_pass(net, shape):
    """Tiles of one shape (the last of each row and column moved back from the image's edge), as CUDA
    gets them: the same map as one pass, and every tile the same shape unless the image is smaller
    than a tile on that side. Nets with padding keep tiles cut to the image (side 0)."""
    run, card = net
    if not card.dense.exact:
        assert card.dense.fixed_tile_side(64 * 64) == 0
        return
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    whole = dense.one_pass(run, x, card).scores
    for budget in (40 * 40, 64 * 64, 100 * 90):
        side = card.dense.fixed_tile_side(budget)
        assert (side - 28) % 4 == 0 and side <= budget ** 0.5 + 32
        seen: list[tuple[int, int]] = []

        def recording(tile: np.ndarray, seen=seen) -> np.ndarray:
            seen.append(tile.shape[2:])
            return run(tile)

        stitched = dense.tiled(recording, x, card, budget, fixed_side=side).scores
        assert stitched.shape == whole.shape
        assert np.abs(stitched - whole).max() <= 1e-5 * max(1.0, np.abs(whole).max())
        assert set(seen) == {(min(shape[1], side), min(shape[2], side))}
        if shape[1] > side and shape[2] > side:
            assert len(seen) > 1
        finer = dense.finer(recording, x, card, 2, budget, fixed_side=side).scores
        assert np.abs(finer - dense.finer(run, x, card, 2, 10**9).scores).max() <= 1e-5 * max(
            1.0, np.abs(whole).max())


def test_a_4096_page_is_four_fixed_tiles():
    """The default 4 Mi tiles on the detector's geometry: a 4096² page is 2 × 2 tiles of one shape
    (tiles cut to the page take 3 × 3, the last ones thin), for the maps and for the peak head's
    wider overlap; every cell owned once."""
    card = DenseGeometry.from_dict({"window": 28, "stride": 4, "offset": 0, "receptive_field": 28,
                                    "receptive_field_offset": 0})
    side = card.fixed_tile_side(4 * 2**20)
    for margin in (0, 4):  # tiled(), tiled_peaks()
        fixed = dense.tiles(4096, 4096, card, 4 * 2**20, margin, side)
        assert len(fixed) == 4 and len(dense.tiles(4096, 4096, card, 4 * 2**20, margin)) == 9
        assert {(t.pixels[0].stop - t.pixels[0].start, t.pixels[1].stop - t.pixels[1].start)
                for t in fixed} == {(side, side)}
        owned = np.zeros((1018, 1018), int)
        for t in fixed:
            owned[t.cells] += 1
        assert (owned == 1).all()


def test_nms_against_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 30, (60, 1))], 1)
    scores = rng.uniform(size=60)
    kept = detect.nms(boxes, scores, 0.3)
    # brute force: walk by score, keep a box unless it overlaps a kept one by IoU > 0.3
    expected = []
    for i in np.argsort(-scores):
        if all(iou(boxes[i], boxes[j]) <= 0.3 for j in expected):
            expected.append(i)
    assert kept.tolist() == expected


def iou(a, b):
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def test_detections_geometry_and_suppression():
    """A synthetic score map with one strong '7' cell among weaker neighbours (one of another class):
    one detection, at the cell's window, scaled back to original pixels."""
    labels = [str(d) for d in range(10)] + ["background"]
    scores = np.zeros((11, 6, 8), np.float32)
    scores[10] = 5.0  # background everywhere
    scores[7, 2, 3] = 12.0  # the digit
    scores[1, 2, 4] = 9.0  # an off-centre view of it, read as another digit
    m = dense.Map(scores, stride=4, offset=0, window=28)
    for scale in (1.0, 2.0):
        found = detect.detect([detect.candidates(m, labels, 0.5, set(range(10)), scale)], labels, 0.3)
        assert [d["label"] for d in found] == ["7"]
        assert found[0]["box"] == [3 * 4 * scale, 2 * 4 * scale, (12 + 28) * scale, (8 + 28) * scale]
        assert found[0]["score"] > 0.99


def test_local_peaks():
    p = np.array([[0, 1, 0], [1, 3, 1], [0, 1, 2.0]])
    assert local_peaks(p).tolist() == [[False, False, False], [False, True, False],
                                              [False, False, False]]
