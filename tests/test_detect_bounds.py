"""Bounded detection (issue 21, item 3): at most detect.MAX_CANDIDATES candidates enter NMS, and NMS and
drop_parts work in numpy blocks. The new nms / drop_parts / detect against the greedy implementations
they replaced (kept below as the reference: the same kept indices in the same order, ties and
degenerate boxes included), and flat maps at threshold 0 (every cell a 3×3 peak) staying bounded.
Speed is measured in benchmarks, not asserted here: the timings are printed (pytest -s)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from service.pipeline import dense, detect

LABELS = [str(d) for d in range(10)] + ["background"]


# The implementations before issue 21 (service/pipeline/detect.py at c6a8f93): the reference.
def old_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    order = np.argsort(-scores)
    keep = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        x0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        order = rest[inter / (area[i] + area[rest] - inter) <= iou]
    return np.array(keep, int)


def old_drop_parts(boxes: np.ndarray) -> np.ndarray:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    for i in range(len(boxes)):
        larger = area >= 1.5 * area[i]
        if larger.any():
            b = boxes[larger]
            w = np.clip(np.minimum(b[:, 2], boxes[i, 2]) - np.maximum(b[:, 0], boxes[i, 0]), 0, None)
            h = np.clip(np.minimum(b[:, 3], boxes[i, 3]) - np.maximum(b[:, 1], boxes[i, 1]), 0, None)
            if (w * h / area[i]).max() >= detect.PART_OF_LARGER:
                continue
        keep.append(i)
    return np.array(keep, int)


def old_detect(parts: list[detect.Candidates], labels: list[str], iou: float,
               limit: int = 1000) -> list[dict]:
    boxes = np.concatenate([c.boxes for c in parts])
    scores = np.concatenate([c.scores for c in parts])
    classes = np.concatenate([c.classes for c in parts])
    kept = np.concatenate([np.nonzero(classes == k)[0][old_nms(boxes[classes == k], scores[classes == k],
                                                               iou)]
                           for k in np.unique(classes)] or [np.zeros(0, int)])
    kept = kept[old_nms(boxes[kept], scores[kept], max(iou, detect.CROSS_CLASS_IOU))]
    kept = kept[old_drop_parts(boxes[kept])]
    return [{"label": labels[classes[i]], "score": round(float(scores[i]), 4),
             "box": [round(float(v), 1) for v in boxes[i]]} for i in kept[:limit]]


def random_boxes(rng: np.random.Generator, n: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Boxes on a coarse grid (exact ties in IoU, duplicates, some of zero width) in a few sizes (so
    drop_parts has parts to drop), with scores from a few values (ties in the order)."""
    side = rng.choice([7.0, 14.0, 28.0, 56.0], n)[:, None] * rng.choice([0.0, 1.0, 1.0, 1.0, 1.0], (n, 2))
    xy = rng.integers(0, 20, (n, 2)) * rng.choice([2.0, 7.0])
    boxes = np.concatenate([xy, xy + side], 1).astype(dtype)
    values = rng.uniform(size=rng.integers(1, 12))  # integer boxes: float32 scores
    scores = rng.choice(values, n).astype(np.float32 if dtype == np.int64 else dtype)
    return boxes, scores


# sizes crossing NMS's and drop_parts' blocks (BLOCK = 256)
SIZES = [0, 1, 2, 5, 30, 255, 256, 257, 600]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("iou", [0.0, 0.3, 0.5, 1.0])
def test_nms_equals_greedy(seed, iou):
    rng = np.random.default_rng(seed)
    for n in SIZES:
        for dtype in (np.float32, np.float64, np.int64):
            boxes, scores = random_boxes(rng, n, dtype)
            with np.errstate(divide="ignore", invalid="ignore"):
                want = old_nms(boxes, scores, iou)
            got = detect.nms(boxes, scores, iou)
            assert got.dtype == want.dtype and got.tolist() == want.tolist(), (seed, n, dtype)


@pytest.mark.parametrize("seed", range(24))
def test_drop_parts_equals_loop(seed):
    rng = np.random.default_rng(100 + seed)
    for n in SIZES:
        for dtype in (np.float32, np.int64):
            boxes, _ = random_boxes(rng, n, dtype)
            with np.errstate(divide="ignore", invalid="ignore"):
                want = old_drop_parts(boxes)
            got = detect.drop_parts(boxes)
            assert got.dtype == want.dtype and got.tolist() == want.tolist(), (seed, n, dtype)


def test_drop_parts_degenerate_boxes():
    """Zero-area, negative and NaN boxes: kept or dropped as the loop did (NaN ratios keep a box)."""
    boxes = np.array([[0, 0, 0, 0], [0, 0, 10, 10], [2, 2, 4, 4], [5, 5, 3, 3], [np.nan, 0, 1, 1],
                      [0, 0, 28, 28], [1, 1, 1, 9]], np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = old_drop_parts(boxes)
    assert detect.drop_parts(boxes).tolist() == want.tolist()


def candidates(rng: np.random.Generator, n: int) -> detect.Candidates:
    boxes, scores = random_boxes(rng, n)
    return detect.Candidates(boxes, scores, rng.integers(0, 4, n))


@pytest.mark.parametrize("seed", range(6))
def test_detect_below_the_cap_is_unchanged(seed):
    """Fewer candidates than the cap (every normal page): the same detections, in the same order."""
    rng = np.random.default_rng(200 + seed)
    parts = [candidates(rng, n) for n in rng.integers(0, 300, 3)]
    with np.errstate(divide="ignore", invalid="ignore"):
        want = old_detect(parts, LABELS, 0.3)
    assert detect.detect(parts, LABELS, 0.3) == want


def test_detect_above_the_cap_is_the_best_candidates(monkeypatch):
    """More candidates than the cap: the answer is the old one on the best MAX_CANDIDATES (by score,
    ties to the earlier), in their original order."""
    monkeypatch.setattr(detect, "MAX_CANDIDATES", 300)
    rng = np.random.default_rng(7)
    parts = [candidates(rng, 250), candidates(rng, 200)]
    merged = detect.Candidates(*(np.concatenate([getattr(c, f) for c in parts])
                                 for f in ("boxes", "scores", "classes")))
    top = np.sort(np.argsort(-merged.scores, kind="stable")[:300])
    best = detect.Candidates(merged.boxes[top], merged.scores[top], merged.classes[top])
    with np.errstate(divide="ignore", invalid="ignore"):
        want = old_detect([best], LABELS, 0.3)
    assert detect.detect(parts, LABELS, 0.3) == want


def test_best_is_stable():
    scores = np.array([0.5, 0.9, 0.5, 0.7, 0.5, 0.9], np.float32)
    assert detect.best(scores, 6) is None
    assert detect.best(scores, 4).tolist() == [0, 1, 3, 5]  # 0.9, 0.9, 0.7, and the first 0.5
    assert detect.best(scores, 2).tolist() == [1, 5]


def flat(cells: int) -> dense.Map:
    """A constant score map: objectness the same everywhere, so at threshold 0 every cell is a peak."""
    return dense.Map(np.zeros((len(LABELS), cells, cells), np.float32), stride=4, offset=0, window=28)


def flat_peaks(cells: int) -> dense.Peaks:
    """What the peak head returns for a flat page at threshold 0: every cell."""
    ys, xs = np.divmod(np.arange(cells * cells), cells)
    return dense.Peaks(np.stack([ys, xs], 1), np.zeros((cells * cells, len(LABELS)), np.float32),
                       4, 0, 28, (cells, cells))


@pytest.mark.parametrize("side,cells", [(1024, 250), (4096, 1018)])
@pytest.mark.parametrize("source", ["map", "peaks"])
def test_flat_page_at_threshold_zero_is_bounded(monkeypatch, side, cells, source):
    """A flat page at threshold 0: ~62k peaks at 1024², ~1M at 4096², one scale or three; at most
    MAX_CANDIDATES of them per scale, and in all, reach NMS."""
    sizes = []

    def counting_nms(boxes, scores, iou):
        sizes.append(len(boxes))
        return nms(boxes, scores, iou)

    nms = detect.nms
    monkeypatch.setattr(detect, "nms", counting_nms)
    m = flat(cells) if source == "map" else flat_peaks(cells)
    for scales in ([1.0], [0.5, 1.0, 2.0]):
        maps = dict.fromkeys(scales, m)
        per_scale = [len(detect.candidates(m, LABELS, 0.0, set(range(10)), s).scores) for s in scales]
        assert per_scale == [detect.MAX_CANDIDATES] * len(scales)
        sizes.clear()
        t = time.perf_counter()
        found = detect.detections(maps, LABELS, 0.0, set(range(10)), 0.3)
        elapsed = time.perf_counter() - t
        assert found and max(sizes) <= detect.MAX_CANDIDATES
        print(f"flat {side}² ({cells}² cells, {source}) scales {scales}: {elapsed:.2f}s, "
              f"{len(found)} detections, NMS inputs {sizes}")
