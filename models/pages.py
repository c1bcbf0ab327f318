"""Synthetic pages of MNIST digits, with ground truth. They train the digit detector's `background`
class and evaluate dense scoring.

A page is MNIST's polarity (light strokes on dark paper). Backgrounds vary widely on purpose: flat
level, linear gradient, low-frequency blotches, Gaussian noise and speckle, each with random strength,
and every digit gets its own ink level and scale, so the detector does not learn one generator.

Ground-truth box of a digit = its whole (scaled) 28×28 MNIST frame, which is also the box a score-map
cell stands for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

WINDOW = 28


@dataclass
class Page:
    image: np.ndarray  # (H, W) uint8
    boxes: np.ndarray  # (n, 4) float: x0, y0, x1, y1 in pixels
    labels: np.ndarray  # (n,) int


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float32 (H, W) paper texture in 0..255: dark, varied, never containing a digit."""
    level = rng.uniform(0, 70)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / max(height, width)
    page = level + rng.uniform(0, 50) * ramp
    if rng.random() < 0.5:  # low-frequency blotches: a small random grid, upsampled smoothly
        gh, gw = max(2, height // 48), max(2, width // 48)
        grid = rng.uniform(0, 1, (gh, gw)).astype(np.float32)
        blotch = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC))
        page += rng.uniform(0, 40) * blotch
    page += rng.normal(0, rng.uniform(0, 25), (height, width))
    if rng.random() < 0.3:  # speckle
        mask = rng.random((height, width)) < rng.uniform(0, 0.02)
        page[mask] = rng.uniform(100, 255)
    return np.clip(page, 0, 255).astype(np.float32)


def paste_digit(page: np.ndarray, digit: np.ndarray, x: int, y: int, ink: float) -> None:
    """Alpha-blend a (h, w) uint8 digit into a float page at (x, y): the digit's intensity is its alpha."""
    h, w = digit.shape
    alpha = digit.astype(np.float32) / 255
    region = page[y : y + h, x : x + w]
    region[:] = region * (1 - alpha) + ink * alpha


def synth_page(
    rng: np.random.Generator,
    digits: np.ndarray,
    labels: np.ndarray,
    height: int = 256,
    width: int = 256,
    n_digits: int = 10,
    scales: tuple[float, float] = (1.0, 1.0),
    spacing: float = 0.0,
) -> Page:
    """Place up to `n_digits` random digits (drawn from `digits`, (N, 28, 28) uint8) at random positions
    and scales. Frames never overlap; `spacing` is the extra gap between frames as a fraction of a
    frame (negative lets frames overlap by that fraction)."""
    page = background(rng, height, width)
    boxes, chosen = [], []
    for _ in range(n_digits * 20):  # rejection sampling; gives up quietly on a crowded page
        if len(boxes) == n_digits:
            break
        size = int(round(WINDOW * rng.uniform(*scales)))
        if size > min(height, width):
            continue
        x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        gap = spacing * size
        if any(x < b[2] + gap and b[0] < x + size + gap and y < b[3] + gap and b[1] < y + size + gap
               for b in boxes):
            continue
        k = int(rng.integers(len(digits)))
        digit = digits[k]
        if size != WINDOW:
            digit = np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR))
        paste_digit(page, digit, x, y, ink=rng.uniform(140, 255))
        boxes.append((x, y, x + size, y + size))
        chosen.append(labels[k])
    image = np.clip(page, 0, 255).round().astype(np.uint8)
    return Page(image, np.array(boxes, np.float32).reshape(-1, 4), np.array(chosen, np.int64))


def _window_at(image: np.ndarray, centre: np.ndarray, dx: int, dy: int) -> tuple[np.ndarray, int, int]:
    """The window centred on `centre` moved by (dx, dy), clipped into the image: (crop, x, y)."""
    h, w = image.shape
    x = int(np.clip(round(centre[0]) - WINDOW // 2 + dx, 0, w - WINDOW))
    y = int(np.clip(round(centre[1]) - WINDOW // 2 + dy, 0, h - WINDOW))
    return image[y : y + WINDOW, x : x + WINDOW], x, y


def detector_patches(
    rng: np.random.Generator,
    digits: np.ndarray,
    labels: np.ndarray,
    n_pages: int,
    background_label: int,
    jitter: int = 2,
    min_offset: int = 7,
    negatives_per_page: int = 24,
    positive_scales: tuple[float, float] = (0.84, 1.19),
    ambiguous_scales: tuple[float, float] = (0.7, 1.45),
) -> tuple[np.ndarray, np.ndarray]:
    """28×28 training crops cut from synthesized pages, for a detector with a `background` class.

    Positives: a digit whose size is within `positive_scales` of the window (the half-step of a √2
    image pyramid), its centre moved by at most `jitter` px (a stride-4 map always has a cell that
    close). Negatives (`background_label`): crops whose centre is at least `min_offset` px (max-norm)
    from every digit of near-window size: blank paper, noise, off-centre and partial digits, and digits
    far too small or too large (strokes of a big digit; groups of small ones), which a pyramid finds at
    another scale. Crops in between (slightly off-centre, or sizes between the two ranges) are left out.
    Half the pages hold digits of positive size, half of any size from 0.4× to 2.5×.
    """
    xs, ys = [], []
    size = 160
    for i in range(n_pages):
        scales = positive_scales if i % 2 == 0 else (0.4, 2.5)
        page = synth_page(rng, digits, labels, size, size, n_digits=int(rng.integers(0, 10)),
                          scales=scales, spacing=float(rng.uniform(-0.15, 0.3)))
        h, w = page.image.shape
        sides = (page.boxes[:, 2] - page.boxes[:, 0]) / WINDOW
        centres = (page.boxes[:, :2] + page.boxes[:, 2:]) / 2
        near = (sides >= ambiguous_scales[0]) & (sides <= ambiguous_scales[1])
        for centre, side, label in zip(centres, sides, page.labels, strict=True):
            if not positive_scales[0] <= side <= positive_scales[1]:
                continue
            dx, dy = rng.integers(-jitter, jitter + 1, 2)
            xs.append(_window_at(page.image, centre, dx, dy)[0])
            ys.append(label)
        for centre, side in zip(centres, sides, strict=True):  # hard negatives: wrong-size digits
            if ambiguous_scales[0] <= side <= ambiguous_scales[1]:
                continue
            reach = max(1, int(WINDOW * side / 2)) if side > 1 else jitter + 1  # inside it / centred
            for _ in range(3 if side > 1 else 1):
                crop, x, y = _window_at(page.image, centre, *rng.integers(-reach, reach + 1, 2))
                offsets = np.abs(centres - (x + WINDOW / 2, y + WINDOW / 2)).max(1)
                if not np.any(near & (offsets < min_offset)):
                    xs.append(crop)
                    ys.append(background_label)
        found = 0
        for _ in range(negatives_per_page * 10):
            if found == negatives_per_page:
                break
            x, y = int(rng.integers(0, w - WINDOW + 1)), int(rng.integers(0, h - WINDOW + 1))
            offsets = np.abs(centres - (x + WINDOW / 2, y + WINDOW / 2)).max(1) if len(centres) else []
            if np.any(near & (np.asarray(offsets) < min_offset)):
                continue
            xs.append(page.image[y : y + WINDOW, x : x + WINDOW])
            ys.append(background_label)
            found += 1
    return np.stack(xs), np.array(ys, np.int64)
