"""The inference thread of one model: it takes batches from the model's queue, runs them, and hands
each request its rows of the scores.

Why a thread of its own: batch assembly, padding and normalization stay off the event loop, and the
model's calls do not queue behind the event loop's own work in a shared thread pool.

Why the engine may shorten the GIL switch interval: onnxruntime releases the GIL while it computes and
must take it back to return. With the event loop busy in Python (parsing, decoding), that re-take waits
for the loop to give the GIL up, up to the interpreter's switch interval (5 ms). On an H100, LeNet
batch 32: 0.33 ms per call alone, 14.9 ms beside a busy Python thread, 0.46 ms with a 0.2 ms interval.
In-process on this 2-core CPU the same effect is stark (LeNet batch 32 beside a busy event loop: 587 ms
per call at 5 ms, 6.1 ms at 0.2 ms). Served under load it made no measurable difference to LeNet
(0.95–1.01× the req/s, and LeNet now runs on the event loop: engine/inline.py), but AlexNet, which
does run here, served 134 vs 117 img/s at 1 worker (+15 %, 3 alternating rounds). So the default is
0.2 ms on every provider (BENCHMARKS.md, "The lean hot path").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from service.engine.batcher import BatchQueue, Request
from service.engine.buckets import bucket_for, pad, warm_sizes
from service.engine.metrics import Batch
from service.engine.sessions import Model, Output

log = logging.getLogger("convserve")


class ModelWorker:
    def __init__(self, model: Model, max_batch_size: int, buckets: list[int], wait_ms: float,
                 observe: Callable[[Batch], None], max_queue_ms: float = float("inf")) -> None:
        self.model, self.buckets, self.observe = model, buckets, observe
        self.queue = BatchQueue(max_batch_size, wait_ms / 1000, max_queue_ms / 1000)
        self.thread = threading.Thread(target=self._loop, name=f"infer-{model.name}", daemon=True)
        self.thread.start()

    def enqueue(self, x: np.ndarray, shed: bool = False, output: Output = "scores",
                threshold: float | None = None) -> list[Future]:
        """(n, C, H, W) → futures of the scores (or of `output`, with `threshold`: sessions.Model.infer)
        of consecutive slices of at most max_batch_size rows. With `shed`, raises errors.Overloaded
        instead of queueing past the queue bound."""
        step = self.queue.max_items
        futures: list[Future] = []
        try:
            for i in range(0, len(x), step):
                futures.append(self.queue.put(x[i : i + step], shed, output, threshold))
        except Exception:
            for future in futures:  # all or nothing: the slices already queued are withdrawn
                future.cancel()
            raise
        return futures

    def close(self) -> None:
        self.queue.close()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        try:
            while batch := self.queue.take():
                try:
                    self.run(batch)
                except Exception as e:  # noqa: BLE001 - every waiter hears of it; the thread lives on
                    log.exception("%s: a batch of %d requests failed", self.model.name, len(batch))
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(e)
        finally:  # however this thread ends, nobody waits on it: the waiting fail, new requests are refused
            self.queue.close()

    def run(self, batch: list[Request]) -> None:
        model = self.model  # one version for the whole batch, even if replace() swaps it meanwhile
        x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])  # (n, C, H, W)
        n = len(x)
        window = x.shape[1:] == model.window_shape
        size = bucket_for(n, self.buckets) if window else n  # dense images run alone, at their size
        if x.dtype == np.uint8 and not model.card.takes_pixels:
            x = model.input.normalize(x)  # once per batch, vectorized; newer graphs normalize inside
        x = pad(x, size)
        wanted = {request.output for request in batch}  # only these leave the device
        started = time.perf_counter()
        outputs = model.infer(x, wanted, batch[0].threshold)  # scores: (size, K, h, w)
        finished = time.perf_counter()
        if window:
            self.queue.observe(n, finished - started)
        row = 0
        for request in batch:
            request.future.set_result(_rows(outputs[request.output], request.output, row, len(request.x)))
            row += len(request.x)
        try:
            self.observe(Batch(model.name, "window" if window else "dense", n, size,
                               started - batch[0].enqueued, finished - started))
        except Exception:  # noqa: BLE001 - the answers are out; a metrics failure is only logged
            log.exception("%s: metrics not recorded", self.model.name)

    def warm_up(self, rounds: int, dense_sides: list[int], model: Model | None = None) -> None:
        """Run each bucket size and each dense side (and a detector's peak head there) `rounds` times,
        so the first requests pay no set-up; called before the server says ready, and for a new
        version before replace()."""
        model = model or self.model
        started = time.perf_counter()
        shapes = [(n, *model.window_shape) for n in warm_sizes(self.buckets)]
        shapes += [(1, model.input.channels, side, side) for side in dense_sides]
        single = float("inf")  # the fastest batch-1 call: what running it inline would block the loop
        for _ in range(rounds):
            for shape in shapes:
                x = np.zeros(shape, np.uint8)
                called = time.perf_counter()
                model.infer(x)
                if shape[0] == 1 and shape[1:] == model.window_shape:
                    single = min(single, time.perf_counter() - called)
                if model.card.has_peak_head and shape[2:] != model.window_shape[1:]:
                    model.infer(x, {"peaks"}, threshold=1.0)
        model.warmup_ms = round((time.perf_counter() - started) * 1000, 1)
        model.call_ms = round(single * 1000, 3)
        model.shapes_warmed = [list(s) for s in shapes]
        log.info("warmed up %s in %.0f ms (%d shapes)", model.tag, model.warmup_ms, len(shapes))

    def replace(self, model: Model) -> Model:
        """Serve `model` (warmed) from the next batch on; the batch running now finishes on the old
        version, which is freed once nothing holds it. One attribute swap: atomic under the GIL.
        Only a version with the same inputs and labels: queued images and the fronts' label lookups
        must mean the same thing before and after."""
        old = self.model
        for what in ("input", "window_shape"):
            if getattr(model, what) != getattr(old, what):
                raise ValueError(f"{model.tag} has another {what} than {old.tag}; serve it under a new name")
        if model.card.labels != old.card.labels:
            raise ValueError(f"{model.tag} has other labels than {old.tag}; serve it under a new name")
        self.model = model
        return old


def _rows(out, output: Output, start: int, count: int):
    """A request's share of a batch's output: its rows (padding rows belong to nobody)."""
    if output == "peaks":  # cells (M, 3) of the whole batch, image index first: this request's, renumbered
        cells, scores = out
        mine = (cells[:, 0] >= start) & (cells[:, 0] < start + count)
        return cells[mine] - np.array([start, 0, 0], cells.dtype), scores[mine]
    rows = slice(start, start + count)
    return tuple(a[rows] for a in out) if isinstance(out, tuple) else out[rows]
