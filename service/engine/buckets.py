"""Batch-size buckets: a batch of n images runs padded to the smallest bucket ≥ n, so the model sees
only a few shapes, each warmed up before the server says ready.

Why it is a per-provider choice (BENCHMARKS.md, "few shapes"): on CUDA every new input shape costs set-up
once (cuDNN's algorithm choice, memory planning: ~30 ms measured on an H100) and padding costs almost
nothing, since a GPU runs a batch of 64 in about the time of 1; on a CPU compute grows with the batch, so
padding costs compute in proportion, while a new shape costs little.
"""

from __future__ import annotations

import numpy as np


def bucket_sizes(policy: str, max_batch_size: int, on_gpu: bool) -> list[int]:
    """The batch sizes a model runs at: `none` (every size 1..max, no padding), `pow2` (1, 2, 4, …, max)
    or an explicit comma-separated list; `auto` is pow2 on a GPU and none on a CPU."""
    if policy == "auto":
        policy = "pow2" if on_gpu else "none"
    if policy == "none":
        return list(range(1, max_batch_size + 1))
    if policy == "pow2":
        sizes = [1 << k for k in range(max_batch_size.bit_length()) if 1 << k < max_batch_size]
        return [*sizes, max_batch_size]
    try:
        sizes = sorted({int(v) for v in policy.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"batch buckets {policy!r}: give auto, none, pow2 or sizes like 1,8,32") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch buckets {policy!r}: sizes must be whole numbers ≥ 1")
    return [s for s in sizes if s < max_batch_size] + [max_batch_size]


def bucket_for(n: int, sizes: list[int]) -> int:
    """The smallest bucket that holds n images (n itself beyond the largest: never truncate)."""
    return next((s for s in sizes if s >= n), n)


def pad(x: np.ndarray, size: int) -> np.ndarray:
    """(n, ...) → (size, ...), the extra rows zeros (their scores are computed and dropped)."""
    if len(x) == size:
        return x
    padded = np.zeros((size, *x.shape[1:]), x.dtype)
    padded[: len(x)] = x
    return padded


def warm_sizes(sizes: list[int]) -> list[int]:
    """The batch sizes to run before ready: every bucket; with no buckets (every size is allowed), the
    powers of two, as a CPU needs no per-shape set-up beyond its first call at each size class."""
    if sizes == list(range(1, len(sizes) + 1)) and len(sizes) > 8:
        return bucket_sizes("pow2", len(sizes), on_gpu=True)
    return sizes
