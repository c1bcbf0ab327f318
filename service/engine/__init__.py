"""The engine: one narrow contract between the HTTP fronts and onnxruntime.

    engine = Engine.from_store(settings)
    scores = await engine.infer("lenet5", pixels)   # uint8 (N, C, H, W) → float32 (N, K, h, w)
    probs, classes = await engine.infer("lenet5", pixels, "topk", k=3)   # (N, k) each, best first
    scores = engine.infer_blocking("digit-detector", tile)   # from a thread that is not the loop
    cells, scores = engine.infer_blocking("digit-detector", page, "peaks", threshold=0.8)
    call = engine.bind("digit-detector")   # call(x): scores, call.peaks(x, t): peaks (pipeline/dense.py)
    side = engine.tile_side("digit-detector")                     # dense tiles' one shape, or 0

It owns what makes a model call fast and safe, so that nothing above it repeats it: a queue per model and the
batches formed from it (batcher.py), batch-size buckets (buckets.py), the sessions and their provider
options (sessions.py), one inference thread per model (worker.py), warm-up, and per-model metrics
(metrics.py). Inputs are uint8 pixels, normalized here once per batch as the model card says (or fed
as they are to graphs that normalize them: export/heads.py), or float32 already normalized. The engine
imports nothing above it (the model card, settings and domain errors only), neither BentoML nor
Starlette (store.py reads the model store, lazily); the pipeline and the fronts never import
onnxruntime.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

import numpy as np

from modelcard.reference import topk
from service.engine import metrics
from service.engine.bound import BoundModel
from service.engine.buckets import bucket_sizes
from service.engine.inline import LoopBatcher
from service.engine.metrics import Batch
from service.engine.provider import CUDA
from service.engine.remote import RemoteEngine
from service.engine.sessions import Model, Output
from service.engine.store import check_store
from service.engine.supervisor import supervise
from service.engine.worker import ModelWorker
from service.settings import Settings

__all__ = ["BoundModel", "Engine", "Model", "Output", "RemoteEngine", "build", "check_store", "supervise"]
log = logging.getLogger("convserve")


def build(settings: Settings) -> Engine | RemoteEngine:
    """This worker's engine: its own (CONVSERVE_ENGINE=local), or a connection to the engine process
    of its device (process: started by supervise() in the server's main process). Call in the event
    loop that will serve (RemoteEngine answers on it)."""
    if settings.engine == "process":
        return RemoteEngine.connect(settings)
    return Engine.from_store(settings)


class Engine:
    ready = True  # in-process: there as long as this process is (RemoteEngine: while connected)

    def __init__(self, models: list[Model], settings: Settings,
                 observe: Callable[[Batch], None] = metrics.observe) -> None:
        switch_ms = settings.switch_interval_ms
        if switch_ms is None:  # 0.2 ms on every provider now (worker.py: what was measured)
            switch_ms = 0.2
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
        self.inline: dict[str, LoopBatcher] = {}  # models whose window batches run on the loop (warm_up)

    @classmethod
    def from_store(cls, settings: Settings) -> Engine:
        from service.engine.store import load

        return cls([load(tag, settings) for tag in settings.model_tags], settings)

    @property
    def models(self) -> dict[str, Model]:
        return {name: worker.model for name, worker in self.workers.items()}

    async def infer(self, model: str, x: np.ndarray, output: Output = "scores",
                    k: int = 0) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """x (N, C, H, W) through `model`, batched with whatever else waits for it; sheds: raises
        errors.Overloaded when the model's queue is past its bound (CONVSERVE_MAX_QUEUE_MS), at once
        or once it has waited that long. A cancelled caller's images are dropped from the queue if
        they have not started.

        output="scores": (N, K, h, w). output="topk": the k most probable classes of each window-size
        image, (probabilities (N, k), class indices (N, k)), best first, ties in class order; from
        the graph's top-k head where the model has one that reaches k (only those numbers leave the
        device), else from its scores in numpy: the same answers (tests/test_heads.py)."""
        worker, inline = self.workers[model], self.inline.get(model)
        if output not in ("scores", "topk"):
            raise ValueError(f"Engine.infer answers scores or topk, not {output!r}: peaks come from "
                             f"infer_blocking in a dense pipeline's thread")
        if output == "topk" and k > worker.model.card.topk_k > 0:  # a head, but too short for this k
            return topk((await self.infer(model, x))[:, :, 0, 0], k)
        if inline is not None and x.shape[1:] == worker.model.window_shape:
            futures = inline.submit(x, output)
        else:
            futures = [asyncio.wrap_future(f) for f in worker.enqueue(x, shed=True, output=output)]
        parts = [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
        if output == "scores":
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        values = np.concatenate([v for v, _ in parts]) if len(parts) > 1 else parts[0][0]
        indices = np.concatenate([i for _, i in parts]) if len(parts) > 1 else parts[0][1]
        if values.shape[1] < k:  # a version with a shorter head was rolled out meanwhile
            return topk((await self.infer(model, x))[:, :, 0, 0], k)
        return values[:, :k], indices[:, :k]

    def infer_blocking(self, model: str, x: np.ndarray, output: Output = "scores",
                       threshold: float | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """As infer, blocking and never shed: for dense pipelines running in a thread (tiles).
        output="peaks": a detector's objectness peaks at `threshold`, (cells (M, 3) as (n, y, x), their
        raw class scores (M, K)), from the graph's peak head (only those leave the device), else from
        the scores in numpy (sessions.Model.infer)."""
        if output == "scores":
            parts = [f.result() for f in self.workers[model].enqueue(x)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        if output != "peaks":
            raise ValueError(f"Engine.infer_blocking answers scores or peaks, not {output!r}")
        parts = [f.result() for f in self.workers[model].enqueue(x, output="peaks",
                                                                threshold=float(threshold))]
        step = self.workers[model].queue.max_items  # each part's n counts from its own first row
        cells = [c + np.array([i * step, 0, 0], c.dtype) for i, (c, _) in enumerate(parts)]
        return (cells[0], parts[0][1]) if len(parts) == 1 else (np.concatenate(cells),
                                                                np.concatenate([p for _, p in parts]))

    def tile_side(self, model: str) -> int:
        """The side of the one tile shape dense pipelines cut `model`'s large images into
        (pipeline/dense.py tiles()), warmed at start; 0: tiles cut to the image (CONVSERVE_FIXED_TILES;
        auto: on CUDA)."""
        return self._tile_side(self.workers[model].model)

    def _tile_side(self, model: Model) -> int:
        mode = self.settings.fixed_tiles
        if mode == "off" or (mode == "auto" and model.provider != CUDA):
            return 0
        return model.card.dense.fixed_tile_side(self.settings.tile_pixels)

    def _dense_sides(self, model: Model) -> list[int]:
        """The dense shapes warmed: a small page, and the tile shape where tiles have one."""
        side = self._tile_side(model)
        return [4 * model.window, side] if side else [4 * model.window]

    def bind(self, model: str) -> BoundModel:
        return BoundModel(self, model)

    def warm_up(self) -> None:
        for worker in self.workers.values():
            worker.warm_up(self.settings.warmup_rounds, self._dense_sides(worker.model))
            self._choose_loop(worker)

    def _choose_loop(self, worker: ModelWorker) -> None:
        """Run `worker`'s window batches on the event loop (inline.py) when its model is a CPU one whose
        batch-1 call took at most CONVSERVE_INLINE_MAX_MS at warm-up, else on its inference thread."""
        model = worker.model
        if model.provider != CUDA and 0 < model.call_ms <= self.settings.inline_max_ms:
            self.inline.setdefault(model.name, LoopBatcher(worker))
        else:
            self.inline.pop(model.name, None)
        log.info("%s: batch-1 call %.3f ms: window batches run on %s", model.tag, model.call_ms,
                 "the event loop" if model.name in self.inline else "its inference thread")

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
        old = worker.replace(model)
        self._choose_loop(worker)
        return model, old

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()

