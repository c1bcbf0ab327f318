"""Detections from score maps or from the peak head's cells: peaks of objectness, each labelled with
its most probable class, then class-wise non-maximum suppression, suppression across classes, and
parts of larger detections dropped. numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelcard import BACKGROUND
from modelcard.reference import local_peaks, softmax
from service.pipeline.dense import Map, Peaks


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best first."""
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
    keep = score >= threshold
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
    """Indices of boxes that are not mostly inside a much larger box."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    for i in range(len(boxes)):
        larger = area >= 1.5 * area[i]
        if larger.any():
            b = boxes[larger]
            w = np.clip(np.minimum(b[:, 2], boxes[i, 2]) - np.maximum(b[:, 0], boxes[i, 0]), 0, None)
            h = np.clip(np.minimum(b[:, 3], boxes[i, 3]) - np.maximum(b[:, 1], boxes[i, 1]), 0, None)
            if (w * h / area[i]).max() >= PART_OF_LARGER:
                continue
        keep.append(i)
    return np.array(keep, int)


def detect(parts: list[Candidates], labels: list[str], iou: float, limit: int = 1000) -> list[dict]:
    """Merge candidates (from every scale): class-wise NMS at `iou`, then across classes at
    CROSS_CLASS_IOU, then drop parts of larger detections → [{"label", "score", "box"}], best first."""
    boxes = np.concatenate([c.boxes for c in parts])
    scores = np.concatenate([c.scores for c in parts])
    classes = np.concatenate([c.classes for c in parts])
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
