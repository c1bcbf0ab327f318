"""Dense scoring beyond one plain pass: finer stride (shift-and-stitch), bounded memory (tiles), an
image pyramid, and detections (peaks + class-wise non-maximum suppression). numpy only; a detector's
peaks come either from its score maps here (the reference) or from the graph's peak head, which
returns only the peak cells (tiled_peaks, pyramid_peaks).

Geometry of a score map here: cell (i, j) scores the window of side `window` whose top-left pixel is
(offset + i·stride, offset + j·stride), in the pixels of the image that was scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service import images
from service.card import InputSpec, context_margin

BACKGROUND = "background"  # the label a detector gives to "no object here"
# (1, C, H, W) uint8 pixels (or float32 normalized) → (1, K, h, w) scores, cropped to in-image cells:
# Engine.runner(model) or Model.run
Run = Callable[[np.ndarray], np.ndarray]
# (1, C, H, W) pixels, threshold → a detector's peak cells (M, 3) as (n, y, x) and their raw class
# scores (M, K): Engine.runner(model).peaks, the graph's peak head (export/heads.py)
RunPeaks = Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Map:
    scores: np.ndarray  # (K, h, w) raw class scores
    stride: int  # pixels between cells, in the scored image
    offset: int
    window: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.scores.shape[1], self.scores.shape[2]


@dataclass(frozen=True)
class Peaks:
    """What a detector's peak head returns for a whole image: its objectness peaks at or above the
    threshold, not the map (export/heads.py add_dense_head); the geometry as Map's."""

    cells: np.ndarray  # (M, 2) y, x of each peak cell
    scores: np.ndarray  # (M, K) raw class scores there
    stride: int
    offset: int
    window: int
    shape: tuple[int, int]  # (h, w) of the map the peaks are of


def cells(size: int, window: int, stride: int) -> int:
    return 0 if size < window else (size - window) // stride + 1


def one_pass(run: Run, x: np.ndarray, card: dict) -> Map:
    d = card["dense"]
    return Map(run(x[None])[0], d["stride"], d["offset"], d["window"])


def in_one_pass(height: int, width: int, max_pixels: int, fixed_side: int) -> bool:
    """Whether an image is scored whole rather than in tiles."""
    if fixed_side:
        return height <= fixed_side and width <= fixed_side
    return height * width <= max_pixels


@dataclass(frozen=True)
class Tile:
    cells: tuple[slice, slice]  # the whole map's cells (rows, columns) the tile owns
    pixels: tuple[slice, slice]  # the pixels it scores, starting on multiples of the stride


def tiles(height: int, width: int, card: dict, max_pixels: int, margin: int,
          fixed_side: int = 0) -> list[Tile]:
    """A tiling of a height × width image for a map of `card`'s geometry. Tiles start on multiples of
    the stride (so their cell grids line up with the whole image's) and overlap by window − stride plus
    `margin` pixels of context each side, so every cell a tile owns sees what it sees in one pass.

    fixed_side > 0 (card.fixed_tile_side): every tile is that many pixels a side (or the image's side where
    the image is smaller), the last tile of a row or column moved back to end at the image's edge
    rather than cut short: one input shape for all but small images, so a GPU session chooses its
    convolution algorithms once (warmed at start) instead of per new image size (~30 ms each, measured
    on an H100: field notes). It scores more pixels (up to ~2× on a page just over one tile); used on
    CUDA only (Settings.fixed_tiles)."""
    d = card["dense"]
    win, s = d["window"], d["stride"]
    if fixed_side:
        extent = fixed_side
    else:
        extent = max(win + s, int(math.sqrt(max_pixels)) - 2 * margin) + 2 * margin
    per_tile = (extent - 2 * margin - win) // s + 1  # cells a tile owns per side

    def spans(size: int) -> list[tuple[slice, slice]]:
        n = cells(size, win, s)
        if fixed_side and size <= extent:  # one tile's side or less: the axis whole
            return [(slice(0, n), slice(0, size))]
        out = []
        for c0 in range(0, n, per_tile):
            c1 = min(c0 + per_tile, n)
            p0, p1 = max(0, c0 * s - margin), min(size, (c1 - 1) * s + win + margin)
            if fixed_side:  # the full side, never past the image's end
                p0 = min(p0, (size - extent) // s * s)
                p1 = p0 + extent
            out.append((slice(c0, c1), slice(p0, p1)))
        return out

    return [Tile((ci, cj), (pi, pj)) for ci, pi in spans(height) for cj, pj in spans(width)]


def tiled(run: Run, x: np.ndarray, card: dict, max_pixels: int, fixed_side: int = 0) -> Map:
    """The one-pass map computed in tiles of at most ~max_pixels input pixels each (tiles()); the
    stitched map equals it (exactly, up to float rounding)."""
    d = card["dense"]
    win, s = d["window"], d["stride"]
    _, height, width = x.shape
    if in_one_pass(height, width, max_pixels, fixed_side):
        return one_pass(run, x, card)
    h, w = cells(height, win, s), cells(width, win, s)
    out = np.empty((len(card["labels"]), h, w), np.float32)
    for tile in tiles(height, width, card, max_pixels, context_margin(card), fixed_side):
        (ci, cj), (pi, pj) = tile.cells, tile.pixels
        scores = run(np.ascontiguousarray(x[None, :, pi, pj]))[0]
        a, b = ci.start - pi.start // s, cj.start - pj.start // s  # the context's cells, dropped
        out[:, ci, cj] = scores[:, a : a + ci.stop - ci.start, b : b + cj.stop - cj.start]
    return Map(out, s, d["offset"], win)


def tiled_peaks(run_peaks: RunPeaks, x: np.ndarray, card: dict, max_pixels: int, threshold: float,
                fixed_side: int = 0) -> Peaks:
    """The whole map's objectness peaks, from the peak head run on tiles of at most ~max_pixels.

    As tiled(), and each tile also scores one more cell beyond each interior side: the 3×3
    neighbourhood of every cell a tile owns is then inside it, so its peak test is the whole map's.
    Each tile keeps the peaks of its own cells only, in whole-map coordinates."""
    d = card["dense"]
    win, s = d["window"], d["stride"]
    _, height, width = x.shape
    h, w = cells(height, win, s), cells(width, win, s)
    if in_one_pass(height, width, max_pixels, fixed_side):
        found, scores = run_peaks(x[None], threshold)
        return Peaks(found[:, 1:], scores, s, d["offset"], win, (h, w))
    found, rows = [], []
    # the context margin, and the neighbours' cells
    for tile in tiles(height, width, card, max_pixels, context_margin(card) + s, fixed_side):
        (ci, cj), (pi, pj) = tile.cells, tile.pixels
        tile_cells, scores = run_peaks(np.ascontiguousarray(x[None, :, pi, pj]), threshold)
        ys, xs = tile_cells[:, 1] + pi.start // s, tile_cells[:, 2] + pj.start // s
        own = (ys >= ci.start) & (ys < ci.stop) & (xs >= cj.start) & (xs < cj.stop)
        found.append(np.stack([ys[own], xs[own]], 1))
        rows.append(scores[own])
    found_cells, scores = np.concatenate(found), np.concatenate(rows)
    # row-major, as one pass finds them: candidates in the same order, so NMS breaks ties alike
    order = np.lexsort((found_cells[:, 1], found_cells[:, 0]))
    return Peaks(found_cells[order], scores[order], s, d["offset"], win, (h, w))


def finer(run: Run, x: np.ndarray, card: dict, factor: int, max_pixels: int, fixed_side: int = 0) -> Map:
    """Stride s/factor by shift-and-stitch (Long et al. 2015, §3.2; OverFeat's offset pooling is the
    same idea): score the image shifted by every (a, b)·s/factor and interleave the factor² maps.
    Costs factor² passes over (almost) the whole image."""
    d = card["dense"]
    s, win = d["stride"], d["window"]
    if factor == 1:
        return tiled(run, x, card, max_pixels, fixed_side)
    if s % factor:
        raise ValueError(f"stride_factor {factor} must divide the model's stride {s}")
    step = s // factor
    _, height, width = x.shape
    h, w = cells(height, win, step), cells(width, win, step)
    out = np.empty((len(card["labels"]), h, w), np.float32)
    for a in range(factor):
        for b in range(factor):
            if a >= h or b >= w:
                continue
            part = tiled(run, x[:, a * step :, b * step :], card, max_pixels, fixed_side).scores
            out[:, a::factor, b::factor] = part[:, : len(range(a, h, factor)), : len(range(b, w, factor))]
    return Map(out, step, d["offset"], win)


def softmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def local_peaks(p: np.ndarray) -> np.ndarray:
    """True where p is the maximum of its 3×3 neighbourhood (written with numpy: no scipy in the
    serving image)."""
    padded = np.pad(p, 1, constant_values=-np.inf)
    neighbourhood = np.lib.stride_tricks.sliding_window_view(padded, (3, 3)).max(axis=(2, 3))
    return p >= neighbourhood


def reference_peaks(scores: np.ndarray, bg: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The peak head's answer in numpy, from scores (N, K, h, w) of a detector: the cells (M, 3)
    (n, y, x) where objectness 1 − p(background) is ≥ threshold and a 3×3 peak (as candidates()
    finds them), and the raw scores there (M, K), as export/heads.py's graph returns them."""
    cells, rows = [], []
    for n, scores_n in enumerate(scores):
        objectness = 1.0 - softmax(scores_n)[bg]
        ys, xs = np.nonzero((objectness >= threshold) & local_peaks(objectness))
        cells.append(np.stack([np.full_like(ys, n), ys, xs], 1))
        rows.append(scores_n[:, ys, xs].T)
    return np.concatenate(cells).astype(np.int64), np.concatenate(rows)


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


def object_classes(labels: list[str]) -> set[int]:
    """Every class but background."""
    return {k for k, label in enumerate(labels) if label != BACKGROUND}


def pyramid(run: Run, image: Image.Image, card: dict, scales: list[float], factor: int, max_pixels: int,
            invert: bool = False, fixed_side: int = 0) -> dict[float, Map]:
    """Score maps of `image` at each scale σ (the image resized by 1/σ, so objects σ× the training size
    fill the window), skipping scales that leave the image smaller than the window."""
    return {scale: finer(run, x, card, factor, max_pixels, fixed_side)
            for scale, x in _scaled(image, card, scales, invert)}


def pyramid_peaks(run_peaks: RunPeaks, image: Image.Image, card: dict, scales: list[float],
                  max_pixels: int, threshold: float, invert: bool = False,
                  fixed_side: int = 0) -> dict[float, Peaks]:
    """As pyramid (stride factor 1), the objectness peaks from the graph's peak head instead of maps."""
    return {scale: tiled_peaks(run_peaks, x, card, max_pixels, threshold, fixed_side)
            for scale, x in _scaled(image, card, scales, invert)}


def _scaled(image: Image.Image, card: dict, scales: list[float], invert: bool):
    """(σ, the image resized by 1/σ as (C, H, W) uint8) for each scale it is not smaller than the
    window at."""
    spec = InputSpec.from_card(card)
    for scale in scales:
        size = (round(image.width / scale), round(image.height / scale))
        if min(size) < card["dense"]["window"]:
            continue
        scaled = image if scale == 1 else image.resize(size, Image.BILINEAR)
        yield scale, images.full_pixels(scaled, spec, invert)  # (C, H, W) uint8


def detections(maps: dict[float, Map] | dict[float, Peaks], labels: list[str], threshold: float,
               classes: set[int], iou: float) -> list[dict]:
    """Detections merged across every scale of a pyramid."""
    return detect([candidates(m, labels, threshold, classes, s) for s, m in maps.items()], labels, iou)
