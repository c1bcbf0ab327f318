"""The engine: one narrow contract between the HTTP fronts and onnxruntime.

    engine = Engine.from_store(settings)
    scores = await engine.submit("lenet5", pixels)    # uint8 (N, C, H, W) → float32 (N, K, h, w)
    scores = engine.run("digit-detector", tile)       # the same, from a thread that is not the loop
    cells, scores = engine.run_peaks("digit-detector", page, 0.8)  # a detector's objectness peaks
    side = engine.tile_side("digit-detector")                     # dense tiles' one shape, or 0
    probs, classes = await engine.submit_topk("lenet5", pixels, k)   # (N, k) each, best first

It owns what makes a model call fast and safe, so that no front repeats it: a queue per model and the
batches formed from it (batcher.py), batch-size buckets (buckets.py), the sessions and their provider
options (sessions.py), one inference thread per model (worker.py), warm-up, and per-model metrics
(metrics.py). Inputs are uint8 pixels, normalized here once per batch as the model card says (or fed
as they are to graphs that normalize them: export/heads.py), or float32 already normalized. The engine
imports neither BentoML nor Starlette (store.py reads the model store, lazily); the fronts never import
onnxruntime.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import numpy as np

from service.card import fixed_tile_side
from service.engine import metrics
from service.engine.batcher import Overloaded  # noqa: F401 - the fronts catch it as engine.Overloaded
from service.engine.buckets import bucket_sizes
from service.engine.metrics import Batch
from service.engine.sessions import CUDA, Model, topk
from service.engine.worker import ModelWorker
from service.settings import Settings


class Engine:
    def __init__(self, models: list[Model], settings: Settings,
                 observe: Callable[[Batch], None] = metrics.observe) -> None:
        switch_ms = settings.switch_interval_ms
        if switch_ms is None:
            switch_ms = 0.2 if any(m.provider == CUDA for m in models) else 0
        if switch_ms:
            # Process-wide: how soon the inference thread gets the GIL back from a busy event loop
            # after onnxruntime returns (worker.py says why and what was measured).
            sys.setswitchinterval(switch_ms / 1000)
        self.settings = settings
        self.workers = {
            m.name: ModelWorker(m, settings.max_batch_size,
                                bucket_sizes(settings.batch_buckets, settings.max_batch_size,
                                             on_gpu=m.provider == CUDA),
                                settings.batch_wait_ms, observe, settings.max_queue_ms)
            for m in models}

    @classmethod
    def from_store(cls, settings: Settings) -> Engine:
        from service.engine.store import load

        return cls([load(tag, settings) for tag in settings.model_tags], settings)

    @property
    def models(self) -> dict[str, Model]:
        return {name: worker.model for name, worker in self.workers.items()}

    async def submit(self, model: str, x: np.ndarray) -> np.ndarray:
        """Scores of x (N, C, H, W), batched with whatever else waits for `model`. A cancelled caller's
        images are dropped from the queue if they have not started. Raises batcher.Overloaded when the
        model's queue is past its bound (CONVSERVE_MAX_QUEUE_MS), at once or once it has waited that
        long."""
        futures = self.workers[model].submit(x, shed=True)
        if len(futures) == 1:  # the common case, one event-loop hop fewer than gather
            return await asyncio.wrap_future(futures[0])
        return np.concatenate(await asyncio.gather(*map(asyncio.wrap_future, futures)))

    async def submit_topk(self, model: str, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most probable classes of each window-size image of x: (probabilities (N, k), class
        indices (N, k)), best first, ties in class order. From the graph's top-k head where the model
        has one that reaches k (only those numbers leave the device), else from its scores in numpy:
        the same answers either way (tests/test_heads.py)."""
        if k > self.workers[model].model.topk_k > 0:  # a head, but too short for this k
            return topk((await self.submit(model, x))[:, :, 0, 0], k)
        futures = self.workers[model].submit(x, shed=True, want="topk")
        parts = await asyncio.gather(*map(asyncio.wrap_future, futures))
        values = np.concatenate([v for v, _ in parts]) if len(parts) > 1 else parts[0][0]
        indices = np.concatenate([i for _, i in parts]) if len(parts) > 1 else parts[0][1]
        if values.shape[1] < k:  # a version with a shorter head was rolled out meanwhile
            return topk((await self.submit(model, x))[:, :, 0, 0], k)
        return values[:, :k], indices[:, :k]

    def run(self, model: str, x: np.ndarray) -> np.ndarray:
        """The same as submit, blocking: for pipelines running in a thread (dense tiles)."""
        parts = [f.result() for f in self.workers[model].submit(x)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def run_peaks(self, model: str, x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """A detector's objectness peaks in x (N, C, H, W), blocking: (cells (M, 3) as (n, y, x),
        their raw class scores (M, K)), from the graph's peak head (only those leave the device), else
        from the scores in numpy (sessions.Model.infer)."""
        parts = [f.result() for f in self.workers[model].submit(x, want="peaks",
                                                               params={"threshold": float(threshold)})]
        step = self.workers[model].queue.max_items  # each part's n counts from its own first row
        cells = [c + np.array([i * step, 0, 0], c.dtype) for i, (c, _) in enumerate(parts)]
        return (cells[0], parts[0][1]) if len(parts) == 1 else (np.concatenate(cells),
                                                                np.concatenate([p for _, p in parts]))

    def tile_side(self, model: str) -> int:
        """The side of the one tile shape dense pipelines cut `model`'s large images into
        (service/dense.py tiles()), warmed at start; 0: tiles cut to the image (CONVSERVE_FIXED_TILES;
        auto: on CUDA)."""
        return self._tile_side(self.workers[model].model)

    def _tile_side(self, model: Model) -> int:
        mode = self.settings.fixed_tiles
        if mode == "off" or (mode == "auto" and model.provider != CUDA):
            return 0
        return fixed_tile_side(model.card, self.settings.tile_pixels)

    def _dense_sides(self, model: Model) -> list[int]:
        """The dense shapes warmed: a small page, and the tile shape where tiles have one."""
        side = self._tile_side(model)
        return [4 * model.window, side] if side else [4 * model.window]

    def runner(self, model: str) -> Runner:
        return Runner(self, model)

    def warm_up(self) -> None:
        for worker in self.workers.values():
            worker.warm_up(self.settings.warmup_rounds, self._dense_sides(worker.model))

    def roll_out(self, tag: str) -> tuple[Model, Model]:
        """Load another version of a served model from the store, warm it, and serve it in place of
        the current one with no request lost (ModelWorker.replace). Blocking (seconds): call from a
        thread. Returns (new, old); raises KeyError for a model not served, ValueError for a version
        that cannot replace it."""
        from service.engine.store import load

        name = tag.partition(":")[0]
        if name not in self.workers:
            raise KeyError(name)
        worker = self.workers[name]
        model = load(tag, self.settings)
        worker.warm_up(self.settings.warmup_rounds, self._dense_sides(model), model=model)
        return model, worker.replace(model)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()


class Runner:
    """One model's blocking calls for dense pipelines in a thread: called, the scores (Engine.run);
    .peaks(x, threshold), a detector's peaks (Engine.run_peaks; service/dense.py RunPeaks)."""

    def __init__(self, engine: Engine, model: str) -> None:
        self.engine, self.model = engine, model

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.engine.run(self.model, x)

    def peaks(self, x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        return self.engine.run_peaks(self.model, x, threshold)
