"""The numpy twin of every head export/heads.py puts in the graph, written once. The service falls back
to these for models exported without a head, and export verifies each head against them, so the two
paths give the same answers (tests/test_heads.py, tests/test_dense_heads.py)."""

from __future__ import annotations

import numpy as np


def normalize(pixels: np.ndarray, scale: float, mean, std) -> np.ndarray:
    """uint8 (N, C, H, W) → float32 (N, C, H, W): x = (pixel·scale − mean) / std per channel, the
    formula training uses (models.registry.to_tensor calls it), written with `out=` so a batch costs
    one allocation."""
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    x = np.multiply(pixels, np.float32(scale), dtype=np.float32)
    np.subtract(x, mean, out=x)
    np.divide(x, std, out=x)
    return x


def softmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) scores → the k most probable classes' (probabilities, indices), best first; ties in
    class order, as ONNX TopK breaks them (a stable sort), so both paths name the same classes."""
    probs = softmax(scores, axis=1)
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(probs, indices, 1), indices


def local_peaks(p: np.ndarray) -> np.ndarray:
    """True where p is the maximum of its 3×3 neighbourhood (written with numpy: no scipy in the
    serving image)."""
    padded = np.pad(p, 1, constant_values=-np.inf)
    neighbourhood = np.lib.stride_tricks.sliding_window_view(padded, (3, 3)).max(axis=(2, 3))
    return p >= neighbourhood


def reference_peaks(scores: np.ndarray, bg: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The peak head's answer, from a detector's scores (N, K, h, w): the cells (M, 3) as (n, y, x)
    where objectness 1 − p(background) is ≥ threshold and a 3×3 peak, and the raw scores there (M, K),
    as export/heads.py's graph returns them."""
    cells, rows = [], []
    for n, scores_n in enumerate(scores):
        objectness = 1.0 - softmax(scores_n)[bg]
        ys, xs = np.nonzero((objectness >= threshold) & local_peaks(objectness))
        cells.append(np.stack([np.full_like(ys, n), ys, xs], 1))
        rows.append(scores_n[:, ys, xs].T)
    return np.concatenate(cells).astype(np.int64), np.concatenate(rows)
