"""Detections from score maps or from the peak head's cells: peaks of objectness, each labelled with
its most probable class, then class-wise non-maximum suppression, suppression across classes, and
parts of larger detections dropped. numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelcard import BACKGROUND
from modelcard.reference import local_peaks, softmax
from service.pipeline.dense import Map, Peaks

# At most this many candidates, the best by score, enter NMS: per scale as they are found, and per
# request once every scale's are merged. A page holds far fewer objects than its map has cells: real
# objects' windows barely overlap (NMS at IoU 0.3, across classes at 0.5), so a 1024² page of digits at
# the training size (28 px) has room for ~(1024/28)² ≈ 1,300, and the answer lists at most 1,000
# (detect's limit); 4,096 leaves room for each object's peak at a few pyramid scales. Unbounded, a flat
# page at threshold 0 makes every cell a 3×3 peak (a plateau): ~62k candidates at 1024², ~1M at
# 4096², and NMS is quadratic in them. A box is only ever suppressed by better ones, so NMS on the best
# MAX_CANDIDATES keeps the full NMS's survivors among them (only drop_parts can differ: a larger box
# below the cut no longer drops a part). Pages with fewer candidates (a few dozen for a normal page)
# get the same answer, bit for bit and in the same order.
MAX_CANDIDATES = 4096

# NMS and drop_parts compare boxes a block of BLOCK rows at a time: ≤ 256 × MAX_CANDIDATES float32
# (4 MiB) per temporary, never an n × n matrix.
BLOCK = 256


def best(scores: np.ndarray, cap: int | None = None) -> np.ndarray | None:
    """Indices of the `cap` (MAX_CANDIDATES) best scores in their original order, ties going to the
    earlier (a stable sort by score, descending); None where there are no more: keep them all."""
    cap = MAX_CANDIDATES if cap is None else cap
    if len(scores) <= cap:
        return None
    return np.sort(np.argsort(-scores, kind="stable")[:cap])


def _suppressed(boxes: np.ndarray, area: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                iou: float) -> np.ndarray:
    """(len(rows), len(cols)): whether box rows[a] suppresses cols[c] (IoU > iou, or undefined), each
    pair computed as greedy NMS computes it, so the same bits decide."""
    a, b = boxes[rows][:, None, :], boxes[cols][None, :, :]
    x0 = np.maximum(a[..., 0], b[..., 0])
    y0 = np.maximum(a[..., 1], b[..., 1])
    x1 = np.minimum(a[..., 2], b[..., 2])
    y1 = np.minimum(a[..., 3], b[..., 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ~(inter / (area[rows][:, None] + area[cols][None, :] - inter) <= iou)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best first: walk the boxes by score (as
    np.argsort(-scores) orders them), keeping each that no kept box overlaps by IoU > iou.

    In blocks of BLOCK boxes: a block is first checked against every box kept so far (one matrix),
    then walked in order against its own survivors. O(n · kept) arithmetic in numpy, n steps of Python."""
    order = np.argsort(-scores)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = [np.zeros(0, int)]
    done = 0  # boxes kept so far
    for start in range(0, len(order), BLOCK):
        block = order[start : start + BLOCK]
        if done:
            block = block[~_suppressed(boxes, area, np.concatenate(kept), block, iou).any(0)]
        clear = ~_suppressed(boxes, area, block, block, iou)
        alive = np.ones(len(block), bool)
        for i in range(len(block)):
            if alive[i]:
                alive[i + 1 :] &= clear[i, i + 1 :]
        kept.append(block[alive])
        done += int(alive.sum())
    return np.concatenate(kept).astype(int)


@dataclass
class Candidates:
    boxes: np.ndarray  # (n, 4) x0, y0, x1, y1 in original-image pixels
    scores: np.ndarray  # (n,)
    classes: np.ndarray  # (n,) label index


def candidates(m: Map | Peaks, labels: list[str], threshold: float, classes: set[int],
               scale: float) -> Candidates:
    """Peaks of objectness (1 − p(background); the best class's p for models without background),
    each labelled with its most probable class, as boxes in original pixels. `scale` σ: the scored
    image was the original resized by 1/σ, so a window there covers window·σ original pixels.
    From a score map (numpy: the reference) or from the peaks the graph found (Peaks).

    Peaks of objectness rather than of each class: around one digit, off-centre cells often prefer
    another digit class, and per-class peaks would report each of those as a detection."""
    if isinstance(m, Peaks):  # softmax over (K, M), as over (K, h, w) below: the same bits
        probs = softmax(np.ascontiguousarray(m.scores.T)).T
        return _boxes(m, m.cells[:, 0], m.cells[:, 1], probs, threshold, classes, scale)
    probs = softmax(m.scores)  # (K, h, w)
    wanted = sorted(classes)
    if BACKGROUND in labels:
        objectness = 1.0 - probs[labels.index(BACKGROUND)]
    else:
        objectness = probs[wanted].max(0)
    ys, xs = np.nonzero((objectness >= threshold) & local_peaks(objectness))
    return _boxes(m, ys, xs, probs[:, ys, xs].T, threshold, classes, scale)


def _boxes(m: Map | Peaks, ys: np.ndarray, xs: np.ndarray, probs: np.ndarray, threshold: float,
           classes: set[int], scale: float) -> Candidates:
    """Peak cells (ys, xs) with their class probabilities (M, K) → candidates: each labelled with its
    most probable wanted class, kept where that class's p is ≥ threshold."""
    wanted = np.asarray(sorted(classes))
    cls = wanted[probs[:, wanted].argmax(1)] if len(ys) else np.zeros(0, int)
    score = probs[np.arange(len(ys)), cls]
    keep = np.nonzero(score >= threshold)[0]
    top = best(score[keep])  # bounded: a flat map at threshold 0 is all peaks
    if top is not None:
        keep = keep[top]
    ys, xs, cls, score = ys[keep], xs[keep], cls[keep], score[keep]
    x0 = (m.offset + xs * m.stride) * scale
    y0 = (m.offset + ys * m.stride) * scale
    side = m.window * scale
    boxes = np.stack([x0, y0, x0 + side, y0 + side], 1).astype(np.float32).reshape(-1, 4)
    return Candidates(boxes, score.astype(np.float32), cls.astype(int))


# Two different objects' windows rarely overlap this much; a weaker box of another class that does is
# the same object seen off-centre (measured: 85 % of false positives before this step).
CROSS_CLASS_IOU = 0.5


# Across pyramid levels, part of a big object often looks like a small object (a 0's arc like a 1):
# measured, 80 % of multi-scale false positives lay inside a larger detection.
PART_OF_LARGER = 0.7  # fraction of a box's area inside a ≥ 1.5× larger detection that drops it


def drop_parts(boxes: np.ndarray) -> np.ndarray:
    """Indices of boxes that are not mostly inside a much larger box: box i is dropped where some box of
    area ≥ 1.5 × its own covers ≥ PART_OF_LARGER of it. Only boxes with a larger one are checked, a
    block of BLOCK at a time against the boxes large enough to be one."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    dropped = np.zeros(len(boxes), bool)
    sized = area[~np.isnan(area)]
    rows = np.nonzero(sized.max() >= 1.5 * area)[0] if sized.size else []  # boxes with a larger one
    if len(rows):
        cols = np.nonzero(area >= 1.5 * area[rows].min())[0]  # boxes that can be a larger one
        b = boxes[cols]
        for start in range(0, len(rows), BLOCK):
            r = rows[start : start + BLOCK]
            a = boxes[r][:, None, :]
            w = np.clip(np.minimum(b[:, 2], a[..., 2]) - np.maximum(b[:, 0], a[..., 0]), 0, None)
            h = np.clip(np.minimum(b[:, 3], a[..., 3]) - np.maximum(b[:, 1], a[..., 1]), 0, None)
            larger = area[cols] >= 1.5 * area[r][:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                inside = np.where(larger, w * h / area[r][:, None], -np.inf)
            dropped[r] = inside.max(1) >= PART_OF_LARGER  # NaN, as max of the larger ones, keeps
    return np.nonzero(~dropped)[0]


def detect(parts: list[Candidates], labels: list[str], iou: float, limit: int = 1000) -> list[dict]:
    """Merge candidates (from every scale), the best MAX_CANDIDATES of them: class-wise NMS at `iou`,
    then across classes at CROSS_CLASS_IOU, then drop parts of larger detections → [{"label", "score",
    "box"}], best first."""
    boxes = np.concatenate([c.boxes for c in parts])
    scores = np.concatenate([c.scores for c in parts])
    classes = np.concatenate([c.classes for c in parts])
    top = best(scores)  # bounded: MAX_CANDIDATES across every scale
    if top is not None:
        boxes, scores, classes = boxes[top], scores[top], classes[top]
    kept = np.concatenate([np.nonzero(classes == k)[0][nms(boxes[classes == k], scores[classes == k], iou)]
                           for k in np.unique(classes)] or [np.zeros(0, int)])
    kept = kept[nms(boxes[kept], scores[kept], max(iou, CROSS_CLASS_IOU))]
    kept = kept[drop_parts(boxes[kept])]
    return [{"label": labels[classes[i]], "score": round(float(scores[i]), 4),
             "box": [round(float(v), 1) for v in boxes[i]]} for i in kept[:limit]]


def detections(maps: dict[float, Map] | dict[float, Peaks], labels: list[str], threshold: float,
               classes: set[int], iou: float) -> list[dict]:
    """Detections merged across every scale of a pyramid."""
    return detect([candidates(m, labels, threshold, classes, s) for s, m in maps.items()], labels, iou)
