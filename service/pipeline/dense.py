"""Dense scoring beyond one plain pass: finer stride (shift-and-stitch), bounded memory (tiles) and an
image pyramid. numpy only; a detector's peaks come either from its score maps (detect.py, the
reference) or from the graph's peak head, which returns only the peak cells (tiled_peaks,
pyramid_peaks).

Geometry of a score map here: cell (i, j) scores the window of side `window` whose top-left pixel is
(offset + i·stride, offset + j·stride), in the pixels of the image that was scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from modelcard import DenseGeometry, ModelCard
from service.pipeline import images

# (1, C, H, W) uint8 pixels (or float32 normalized) → (1, K, h, w) scores, cropped to in-image cells:
# Engine.bind(model) or Model.scores
Infer = Callable[[np.ndarray], np.ndarray]
# (1, C, H, W) pixels, threshold → a detector's peak cells (M, 3) as (n, y, x) and their raw class
# scores (M, K): Engine.bind(model).peaks, the graph's peak head (export/heads.py)
InferPeaks = Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray]]


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


def one_pass(infer: Infer, x: np.ndarray, card: ModelCard) -> Map:
    d = card.dense
    return Map(infer(x[None])[0], d.stride, d.offset, d.window)


def in_one_pass(height: int, width: int, max_pixels: int, fixed_side: int) -> bool:
    """Whether an image is scored whole rather than in tiles."""
    if fixed_side:
        return height <= fixed_side and width <= fixed_side
    return height * width <= max_pixels


@dataclass(frozen=True)
class Tile:
    cells: tuple[slice, slice]  # the whole map's cells (rows, columns) the tile owns
    pixels: tuple[slice, slice]  # the pixels it scores, starting on multiples of the stride


def tiles(height: int, width: int, geometry: DenseGeometry, max_pixels: int, margin: int,
          fixed_side: int = 0) -> list[Tile]:
    """A tiling of a height × width image for a map of this geometry. Tiles start on multiples of
    the stride (so their cell grids line up with the whole image's) and overlap by window − stride plus
    `margin` pixels of context each side, so every cell a tile owns sees what it sees in one pass.

    fixed_side > 0 (DenseGeometry.fixed_tile_side): every tile is that many pixels a side (or the image's
    side where
    the image is smaller), the last tile of a row or column moved back to end at the image's edge
    rather than cut short: one input shape for all but small images, so a GPU session chooses its
    convolution algorithms once (warmed at start) instead of per new image size (~30 ms each, measured
    on an H100: field notes). It scores more pixels (up to ~2× on a page just over one tile); used on
    CUDA only (Settings.fixed_tiles)."""
    win, s = geometry.window, geometry.stride
    if fixed_side:
        extent = fixed_side
    else:
        extent = max(win + s, int(math.sqrt(max_pixels)) - 2 * margin) + 2 * margin
    per_tile = (extent - 2 * margin - win) // s + 1  # cells a tile owns per side

    def spans(size: int) -> list[tuple[slice, slice]]:
        n = geometry.cells(size)
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


def tiled(infer: Infer, x: np.ndarray, card: ModelCard, max_pixels: int, fixed_side: int = 0) -> Map:
    """The one-pass map computed in tiles of at most ~max_pixels input pixels each (tiles()); the
    stitched map equals it (exactly, up to float rounding)."""
    d = card.dense
    s = d.stride
    _, height, width = x.shape
    if in_one_pass(height, width, max_pixels, fixed_side):
        return one_pass(infer, x, card)
    h, w = d.cells(height), d.cells(width)
    out = np.empty((len(card.labels), h, w), np.float32)
    for tile in tiles(height, width, d, max_pixels, d.context_margin, fixed_side):
        (ci, cj), (pi, pj) = tile.cells, tile.pixels
        scores = infer(np.ascontiguousarray(x[None, :, pi, pj]))[0]
        a, b = ci.start - pi.start // s, cj.start - pj.start // s  # the context's cells, dropped
        out[:, ci, cj] = scores[:, a : a + ci.stop - ci.start, b : b + cj.stop - cj.start]
    return Map(out, s, d.offset, d.window)


def tiled_peaks(infer_peaks: InferPeaks, x: np.ndarray, card: ModelCard, max_pixels: int, threshold: float,
                fixed_side: int = 0) -> Peaks:
    """The whole map's objectness peaks, from the peak head run on tiles of at most ~max_pixels.

    As tiled(), and each tile also scores one more cell beyond each interior side: the 3×3
    neighbourhood of every cell a tile owns is then inside it, so its peak test is the whole map's.
    Each tile keeps the peaks of its own cells only, in whole-map coordinates."""
    d = card.dense
    s = d.stride
    _, height, width = x.shape
    h, w = d.cells(height), d.cells(width)
    if in_one_pass(height, width, max_pixels, fixed_side):
        found, scores = infer_peaks(x[None], threshold)
        return Peaks(found[:, 1:], scores, s, d.offset, d.window, (h, w))
    found, rows = [], []
    # the context margin, and the neighbours' cells
    for tile in tiles(height, width, d, max_pixels, d.context_margin + s, fixed_side):
        (ci, cj), (pi, pj) = tile.cells, tile.pixels
        tile_cells, scores = infer_peaks(np.ascontiguousarray(x[None, :, pi, pj]), threshold)
        ys, xs = tile_cells[:, 1] + pi.start // s, tile_cells[:, 2] + pj.start // s
        own = (ys >= ci.start) & (ys < ci.stop) & (xs >= cj.start) & (xs < cj.stop)
        found.append(np.stack([ys[own], xs[own]], 1))
        rows.append(scores[own])
    found_cells, scores = np.concatenate(found), np.concatenate(rows)
    # row-major, as one pass finds them: candidates in the same order, so NMS breaks ties alike
    order = np.lexsort((found_cells[:, 1], found_cells[:, 0]))
    return Peaks(found_cells[order], scores[order], s, d.offset, d.window, (h, w))


def finer(infer: Infer, x: np.ndarray, card: ModelCard, factor: int, max_pixels: int,
          fixed_side: int = 0) -> Map:
    """Stride s/factor by shift-and-stitch (Long et al. 2015, §3.2; OverFeat's offset pooling is the
    same idea): score the image shifted by every (a, b)·s/factor and interleave the factor² maps.
    Costs factor² passes over (almost) the whole image."""
    d = card.dense
    s = d.stride
    if factor == 1:
        return tiled(infer, x, card, max_pixels, fixed_side)
    if s % factor:
        raise ValueError(f"stride_factor {factor} must divide the model's stride {s}")
    step = s // factor
    _, height, width = x.shape
    h, w = d.cells(height, step), d.cells(width, step)
    out = np.empty((len(card.labels), h, w), np.float32)
    for a in range(factor):
        for b in range(factor):
            if a >= h or b >= w:
                continue
            part = tiled(infer, x[:, a * step :, b * step :], card, max_pixels, fixed_side).scores
            out[:, a::factor, b::factor] = part[:, : len(range(a, h, factor)), : len(range(b, w, factor))]
    return Map(out, step, d.offset, d.window)


def pyramid(infer: Infer, image: Image.Image, card: ModelCard, scales: list[float], factor: int,
            max_pixels: int,
            invert: bool = False, fixed_side: int = 0) -> dict[float, Map]:
    """Score maps of `image` at each scale σ (the image resized by 1/σ, so objects σ× the training size
    fill the window), skipping scales that leave the image smaller than the window."""
    return {scale: finer(infer, x, card, factor, max_pixels, fixed_side)
            for scale, x in _scaled(image, card, scales, invert)}


def pyramid_peaks(infer_peaks: InferPeaks, image: Image.Image, card: ModelCard, scales: list[float],
                  max_pixels: int, threshold: float, invert: bool = False,
                  fixed_side: int = 0) -> dict[float, Peaks]:
    """As pyramid (stride factor 1), the objectness peaks from the graph's peak head instead of maps."""
    return {scale: tiled_peaks(infer_peaks, x, card, max_pixels, threshold, fixed_side)
            for scale, x in _scaled(image, card, scales, invert)}


def _scaled(image: Image.Image, card: ModelCard, scales: list[float], invert: bool):
    """(σ, the image resized by 1/σ as (C, H, W) uint8) for each scale it is not smaller than the
    window at."""
    for scale in scales:
        size = (round(image.width / scale), round(image.height / scale))
        if min(size) < card.dense.window:
            continue
        scaled = image if scale == 1 else image.resize(size, Image.BILINEAR)
        yield scale, images.full_pixels(scaled, card.input, invert)  # (C, H, W) uint8


