"""Sub-millisecond models run on the event loop itself, batched by loop turn.

Why: for LeNet (0.09 ms a call at batch 1, 0.7 ms at 32, 2 threads) the hand-off to the inference
thread cost more than the model: a Condition notify, a thread wake-up, the GIL taken back from the busy
loop (what /metrics called compute was ~5 ms for a ~0.4 ms batch: ../shared/field-notes.md), then
call_soon_threadsafe and a loop wake-up for every answer. Here a request's images join a list; the
first to join in a loop turn schedules one `call_soon` flush, which runs after every callback of this
turn, so whatever requests reached the engine in the same turn form one batch (up to max_batch_size).
The loop is blocked for that call: bounded by choosing this only for models whose batch-1 call took at
most CONVSERVE_INLINE_MAX_MS at warm-up (Engine.warm_up), and measured in BENCHMARKS.md ("The lean hot
path").

What the thread path does that this keeps: one model version per batch (a rollout swaps
ModelWorker.model between turns), cancelled requests are skipped, per-batch metrics. What it does not
need: shedding, since nothing waits beyond the next turn (overload shows as requests waiting in the
gate's admission, which answers 429 beyond CONVSERVE_MAX_CONCURRENCY).
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from service.engine.batcher import Request, batch_key
from service.engine.sessions import Output

log = logging.getLogger("convserve")


class LoopBatcher:
    def __init__(self, worker) -> None:  # a ModelWorker: its model, queue and run()
        self.worker = worker
        self.max_items = worker.queue.max_items
        self._pending: list[Request] = []

    def submit(self, x: np.ndarray, output: Output = "scores") -> list[asyncio.Future]:
        """(n, C, H, W) → futures of consecutive slices' outputs, answered in the next loop turn."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        loop, now, futures = asyncio.get_running_loop(), time.perf_counter(), []
        for i in range(0, len(x), self.max_items):
            future = loop.create_future()
            self._pending.append(Request(x[i : i + self.max_items], future, now, True, output))
            futures.append(future)
        return futures

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        run_pending(self.worker, pending)


def run_pending(worker, pending: list[Request]) -> None:
    """Run `pending` as few batches as their shapes and max_batch_size allow; cancelled ones are
    skipped, and a failed batch's requests hear of its exception."""
    max_items = worker.queue.max_items
    while pending:
        batch, rest, items = [], [], 0
        key = batch_key(pending[0])
        for request in pending:
            if request.future.cancelled():
                continue
            if batch_key(request) == key and items + len(request.x) <= max_items:
                batch.append(request)
                items += len(request.x)
            else:
                rest.append(request)
        pending = rest
        if not batch:
            continue
        try:
            worker.run(batch)
        except Exception as e:  # noqa: BLE001 - every waiter hears of it
            log.exception("%s: a batch of %d requests failed", worker.model.name, len(batch))
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(e)
