"""The queue of one model's requests, and how a batch is assembled from it.

Policy: a batch closes as soon as the model is free (plus `wait_s`, default 0). At low load a request
runs alone with no added latency; under load requests queue while the model is busy and the next batch
takes all of them, up to `max_items` images: batch size adapts to load. A batch holds requests of one
item shape only (a dense tile never joins a batch of digits); requests of other shapes keep their
place in the queue.

Written by hand rather than using BentoML's batchable APIs, which take exactly one argument and reach
the batched method through a serializing proxy (measured 1.4–4 ms per call, more than LeNet's whole
forward pass), and thread-safe rather than asyncio, because the model runs on its own thread (see
worker.py for why).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import NamedTuple

import numpy as np


class Request(NamedTuple):
    x: np.ndarray  # (n, C, H, W), n ≤ max_items
    future: Future  # receives the scores (n, K, h, w), or the model's exception
    enqueued: float  # time.perf_counter() at submit


class BatchQueue:
    def __init__(self, max_items: int, wait_s: float = 0.0) -> None:
        self.max_items, self.wait_s = max_items, wait_s
        self._queue: deque[Request] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def put(self, x: np.ndarray) -> Future:
        if len(x) > self.max_items:
            raise ValueError(f"{len(x)} items in one request; split it into at most {self.max_items}")
        request = Request(x, Future(), time.perf_counter())
        with self._ready:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._queue.append(request)
            self._ready.notify()
        return request.future

    def _items(self) -> int:
        """Images queued (called with the lock held)."""
        return sum(len(r.x) for r in self._queue)

    def close(self) -> None:
        """Stop taking requests; the waiting ones get an error, not silence."""
        with self._ready:
            self._closed = True
            while self._queue:
                request = self._queue.popleft()
                if request.future.set_running_or_notify_cancel():
                    request.future.set_exception(RuntimeError("the engine shut down first"))
            self._ready.notify_all()

    def take(self) -> list[Request]:
        """Block until requests wait; return the oldest with every queued request of its item shape, up
        to max_items images in all. Cancelled requests (their client went away) are dropped here and
        never run. Returns [] once closed."""
        with self._ready:
            while True:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self.wait_s and not self._closed:
                    deadline = self._queue[0].enqueued + self.wait_s
                    while not self._closed and self._items() < self.max_items and \
                            (left := deadline - time.perf_counter()) > 0:
                        self._ready.wait(left)
                if self._closed:
                    return []
                batch = self._assemble()
                if batch:
                    return batch

    def _assemble(self) -> list[Request]:
        """Called with the lock held: the batch, in arrival order; everything else stays queued."""
        key = self._queue[0].x.shape[1:], self._queue[0].x.dtype
        batch, kept, items = [], deque(), 0
        while self._queue:
            request = self._queue.popleft()
            if (request.x.shape[1:], request.x.dtype) != key:
                kept.append(request)
            elif items + len(request.x) > self.max_items:  # full: this one goes first next time
                kept.append(request)
                kept.extend(self._queue)
                self._queue.clear()
            elif request.future.set_running_or_notify_cancel():
                batch.append(request)
                items += len(request.x)
        self._queue = kept
        return batch
