"""The queue of one model's requests, and how a batch is assembled from it.

Policy: a batch closes as soon as the model is free (plus `wait_s`, default 0). At low load a request
runs alone with no added latency; under load requests queue while the model is busy and the next batch
takes all of them, up to `max_items` images: batch size adapts to load. A batch holds requests of one
item shape (and threshold) only (a dense tile never joins a batch of digits); requests of other shapes
keep their place in the queue.

Shedding: a request that would wait longer than `max_queue_s` is refused at once with `Overloaded`
(the wait estimated from the images queued and the recent cost per image), and one that has waited
that long anyway is failed with it instead of run: work nobody will wait for is not done. Only
requests put with `shed=True` (the fronts' images) are shed; dense tiles are bounded by their own
front (service.py) and run once admitted.

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

from service.engine.sessions import Output
from service.errors import Overloaded


class Request(NamedTuple):
    x: np.ndarray  # (n, C, H, W), n ≤ max_items
    future: Future  # receives the scores (n, K, h, w), or the model's exception
    enqueued: float  # time.perf_counter() at submit
    shed: bool  # may be failed with Overloaded once it has waited max_queue_s
    output: Output = "scores"  # which output it receives (sessions.Model.infer)
    threshold: float | None = None  # peaks: what the call needs beside x; one per batch


class BatchQueue:
    def __init__(self, max_items: int, wait_s: float = 0.0, max_queue_s: float = float("inf")) -> None:
        self.max_items, self.wait_s, self.max_queue_s = max_items, wait_s, max_queue_s
        self.seconds_per_item = 0.0  # EWMA, from observe(): what one queued image costs to clear
        self._queue: deque[Request] = deque()
        self._items = 0  # images queued
        self._ready = threading.Condition()
        self._closed = False

    def put(self, x: np.ndarray, shed: bool = False, output: Output = "scores",
            threshold: float | None = None) -> Future:
        if len(x) > self.max_items:
            raise ValueError(f"{len(x)} items in one request; split it into at most {self.max_items}")
        request = Request(x, Future(), time.perf_counter(), shed, output, threshold)
        with self._ready:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            wait = (self._items + len(x)) * self.seconds_per_item
            if shed and wait > self.max_queue_s:
                raise Overloaded(f"{self._items} images queued, about {wait:.2f} s of work, over the "
                                 f"{self.max_queue_s:g} s queue bound", wait - self.max_queue_s)
            self._queue.append(request)
            self._items += len(x)
            self._ready.notify()
        return request.future

    def observe(self, items: int, seconds: float) -> None:
        """A batch of `items` took `seconds`: update the cost per image the shedding estimate uses."""
        self.seconds_per_item += 0.2 * (seconds / items - self.seconds_per_item)

    def close(self) -> None:
        """Stop taking requests; the waiting ones get an error, not silence."""
        with self._ready:
            self._closed = True
            while self._queue:
                request = self._queue.popleft()
                if request.future.set_running_or_notify_cancel():
                    request.future.set_exception(RuntimeError("the engine shut down first"))
            self._items = 0
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
                    while not self._closed and self._items < self.max_items and \
                            (left := deadline - time.perf_counter()) > 0:
                        self._ready.wait(left)
                if self._closed:
                    return []
                batch = self._assemble()
                if batch:
                    return batch

    def _assemble(self) -> list[Request]:
        """Called with the lock held: the batch, in arrival order; everything else stays queued.
        Requests that waited past the queue bound are failed here, not run."""
        key = batch_key(self._queue[0])
        batch, kept, items = [], deque(), 0
        expired = time.perf_counter() - self.max_queue_s
        while self._queue:
            request = self._queue.popleft()
            if request.shed and request.enqueued < expired:
                self._items -= len(request.x)
                if request.future.set_running_or_notify_cancel():
                    request.future.set_exception(Overloaded(
                        f"waited over the {self.max_queue_s:g} s queue bound", self.max_queue_s))
            elif batch_key(request) != key:
                kept.append(request)
            elif items + len(request.x) > self.max_items:  # full: this one goes first next time
                kept.append(request)
                kept.extend(self._queue)
                self._queue.clear()
            else:
                self._items -= len(request.x)
                if request.future.set_running_or_notify_cancel():
                    batch.append(request)
                    items += len(request.x)
        self._queue = kept
        return batch


def batch_key(request: Request) -> tuple:
    """What the requests of one batch share: item shape, dtype, and the call's threshold."""
    return request.x.shape[1:], request.x.dtype, request.threshold
