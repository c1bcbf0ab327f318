"""What a request will cost, known before it runs: its peak memory and its compute, estimated from what
it asks, and the budgets that admit it (../shared/design.md, "What a request costs").

Bytes and pixels are not work: a 16 KB black 4096² PNG asked for `scales=0.25` made the server score a
16384² image (1.6 GB, then a 504 while the work went on). So before decoding a page the data plane
prices it (dense_cost) and refuses, with a 413 that says what to change, what is over the per-request
budget; what fits is admitted against this worker's budget (MemoryBudget), shared with the bodies the
gate is buffering, or refused with 503 and Retry-After while the worker is full.

The constants were measured here (2 cores, the shipped digit detector, peak RSS growth of one
score_page in a fresh process, /tmp scripts in the closing note of issue 21):
- one onnxruntime call holds ~130 bytes per input pixel (2048² in one call: +544 MB; 1024²: +136 MB):
  DENSE_BYTES_PER_PIXEL, with margin. Tiles bound the pixels per call (CONVSERVE_TILE_PIXELS).
- a heat map costs ~71 bytes per image pixel (2048²: +298 MB over detections alone);
- `argmax` ~136 bytes per map cell (two lists of Python numbers and their JSON);
- `scores` ~3.7× the raw float32 map (base64, then the JSON string around it).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from modelcard import ModelCard
from service.errors import Overloaded, TooLarge

DENSE_BYTES_PER_PIXEL = 160  # measured ~130 (digit detector); AlexNet's first layer is 4× smaller
HEATMAP_BYTES_PER_PIXEL = 80  # measured ~71
ARGMAX_BYTES_PER_CELL = 150  # measured ~136
SCORES_COPIES = 5  # measured ~3.7× the raw map
MAP_COPIES = 3  # a map, its softmax (exp, then the division) while detections or outputs are made
PROCESS_BASELINE_MB = 400  # a warmed worker: Python, BentoML, onnxruntime and the models (~300 MB seen)
MiB = 2**20


def memory_limit_bytes() -> int:
    """The memory this process may use: the container's cgroup limit where there is one (v2, then v1),
    else the machine's physical memory."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max", or v1's 2^63 rounded down: no limit
            return int(text)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Budgets:
    """Per request: peak bytes (request_bytes) and pixels scored (scored_pixels); per worker: the
    bytes of everything admitted at once (worker_bytes: dense jobs running or waiting, bodies being
    read)."""

    request_bytes: int
    worker_bytes: int
    scored_pixels: int

    @classmethod
    def from_settings(cls, settings) -> Budgets:
        """Explicit settings win; 0 derives each from the memory limit (CONVSERVE_MEMORY_LIMIT_MB, else
        the cgroup's, else physical): per worker, the limit's share less a warmed process and the
        model's working set for one tile; per request, half of that (room for others' bodies)."""
        limit = settings.memory_limit_mb * MiB or memory_limit_bytes()
        working_set = settings.tile_pixels * DENSE_BYTES_PER_PIXEL
        derived = limit // settings.workers - PROCESS_BASELINE_MB * MiB - working_set
        worker = settings.worker_memory_mb * MiB or max(derived, 256 * MiB)
        request = settings.request_memory_mb * MiB or worker // 2
        return cls(request, worker, settings.max_scored_pixels)


@dataclass(frozen=True)
class Cost:
    memory: int  # peak bytes, estimated
    scored_pixels: int  # input pixels through the model, over every scale and shift: its compute
    parts: dict[str, int]  # what the memory is made of, for the message

    def check(self, budgets: Budgets, advice: str) -> None:
        """TooLarge (413) when over a per-request budget, saying by how much and what to change."""
        if self.scored_pixels > budgets.scored_pixels:
            raise TooLarge(f"this request scores {self.scored_pixels / 1e6:.0f} M pixels, over this "
                           f"server's {budgets.scored_pixels / 1e6:.0f} M per request; {advice}",
                           "too_much_work")
        if self.memory > budgets.request_bytes:
            biggest = max(self.parts, key=self.parts.get)
            raise TooLarge(f"this request needs about {self.memory / MiB:.0f} MiB (most of it {biggest}), "
                           f"over this server's {budgets.request_bytes / MiB:.0f} MiB per request; "
                           f"{advice}", "too_much_memory")


DENSE_ADVICE = ("send a smaller image, fewer or larger scales (each scale σ scores 1/σ² of the pixels), "
                "a smaller stride_factor (k costs k² passes), or outputs=detections instead of maps and "
                "heat maps")


def dense_cost(card: ModelCard, width: int, height: int, bands: int, scales: list[float],
               stride_factor: int, outputs: set[str], peaks_only: bool) -> Cost:
    """The cost of scoring one width × height image (`bands` bytes per decoded pixel) at each scale
    and shift, and of the outputs asked for (pipeline/score.py: what it builds, in that order)."""
    channels, labels, dense = card.input.channels, len(card.labels), card.dense
    step = dense.stride // stride_factor if dense.stride % stride_factor == 0 else dense.stride
    parts = {"the decoded image": width * height * (bands + channels)}
    scaled = maps = scored = 0
    nearest = min(scales, key=lambda s: abs(math.log(s)))
    out_cells = 0
    for scale in scales:
        w, h = round(width / scale), round(height / scale)
        if min(w, h) < dense.window:
            continue
        scaled = max(scaled, 2 * w * h * channels)  # the resized image and its pixels
        scored += stride_factor**2 * w * h
        cells = dense.cells(h, step) * dense.cells(w, step)
        if not peaks_only:
            maps += 4 * labels * cells
        if scale == nearest:
            out_cells = cells
    parts["the resized image"] = scaled
    # The model's working memory (≤ one tile's: largest_call · DENSE_BYTES_PER_PIXEL) is set aside from
    # the worker's budget once (Budgets.from_settings): onnxruntime's arena keeps it between calls.
    parts["the score maps"] = maps * MAP_COPIES
    if "scores" in outputs:
        parts["outputs=scores"] = SCORES_COPIES * 4 * labels * out_cells
    if "argmax" in outputs:
        parts["outputs=argmax"] = ARGMAX_BYTES_PER_CELL * out_cells
    if "heatmap" in outputs:
        parts["outputs=heatmap"] = HEATMAP_BYTES_PER_PIXEL * width * height
    return Cost(sum(parts.values()), scored, parts)


def pixels_cost(card: ModelCard, count: int, height: int, width: int) -> Cost:
    """The cost of scoring `count` images already in pixels (/v2 `pixels` or FP32 inputs) whole."""
    channels, labels, dense = card.input.channels, len(card.labels), card.dense
    cells = dense.cells(height) * dense.cells(width)
    parts = {"the input": count * height * width * channels * 4,
             "the score maps": count * 4 * labels * cells * SCORES_COPIES}
    return Cost(sum(parts.values()), count * height * width, parts)


class MemoryBudget:
    """This worker's bytes in use by admitted work: dense jobs (running or waiting for the dense lock)
    and request bodies being read. Used from the event loop and from the gate; a lock keeps it right
    if a thread ever releases."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def reserve(self, n: int, retry_after_s: float, what: str) -> None:
        """Take n bytes, or raise Overloaded (503 with Retry-After) when they do not fit now."""
        with self._lock:
            if self.used + n > self.limit:
                raise Overloaded(f"this worker is busy with {self.used / MiB:.0f} MiB of work and "
                                 f"bodies; {what} needs {n / MiB:.0f} MiB more than its "
                                 f"{self.limit / MiB:.0f} MiB allow now; retry after the Retry-After "
                                 f"seconds", retry_after_s)
            self.used += n

    def release(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)
