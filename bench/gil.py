"""What the GIL and new batch shapes cost a model call, in-process (no HTTP):

    python -m bench.gil --model lenet5 [--threads 1] [--batch 32] [--max-batch 64]

Why: the service calls `session.run` from a worker thread while the event loop thread is busy in Python
(HTTP parsing, image decoding). onnxruntime releases the GIL while it computes and must take it back
when done; with another Python thread running, that re-take waits for the holder to hit the switch
interval (5 ms by default), which for a small model is more than the model itself. `gil_pressure`
measures one call from each kind of caller: the main thread, a worker thread (idle / next to a busy
thread / with a shorter switch interval), and a child process that owns its own session and gets its
inputs through shared memory. `shape_cost` answers the batching question on CPU: does a batch size the
session has not seen before cost anything, and what would padding batches up to powers of two cost.

Timing reuses bench.inprocess (best of `rounds` rounds of at least `min_s` seconds). Two figures per
caller: `call_ms`, the wall time the caller sees per call, and `run_ms`, the time from just before
`session.run` to just after it returns, taken in the thread (or process) that runs it, so it includes
re-taking the GIL but not the hand-off to and from the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import queue
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from bench.inprocess import best_seconds, session
from modelcard import ModelCard
from service.engine import Engine
from service.engine.sessions import Model, open_model
from service.settings import Settings

# -----------------------------------------------------------------------------
# the pieces: a busy Python thread, a worker thread, a worker process


@contextmanager
def busy_thread() -> Iterator[None]:
    """A thread burning CPU in pure Python while the block runs: stands in for a busy event loop."""
    stop = False

    def burn():
        x = 0
        while not stop:
            x += 1

    thread = threading.Thread(target=burn, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop = True
        thread.join()


@contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """sys.setswitchinterval for the block only; the old value is restored whatever happens."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@contextmanager
def worker_thread(sess, name: str) -> Iterator[Callable[[np.ndarray], tuple[np.ndarray, float]]]:
    """A dedicated thread fed by a queue, like the service's executor thread. Yields call(x) →
    (scores, run seconds): submit, the thread runs, the result comes back through a Future."""
    jobs: queue.Queue = queue.Queue()

    def loop():
        while (job := jobs.get()) is not None:
            x, future = job
            start = time.perf_counter()
            out = sess.run(None, {name: x})[0]
            future.set_result((out, time.perf_counter() - start))

    def call(x):
        future = Future()
        jobs.put((x, future))
        return future.result()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield call
    finally:
        jobs.put(None)
        thread.join()


def _child(path: str, threads: int, shm_name: str, x_shape, y_shape, y_dtype: str, conn) -> None:
    """The worker process: its own session; inputs and outputs in shared memory, b"run" / b"stop"
    and the run time (a packed double) through the pipe."""
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    shm = SharedMemory(name=shm_name)
    x = np.ndarray(x_shape, np.float32, shm.buf)  # (N, C, H, W)
    y = np.ndarray(y_shape, y_dtype, shm.buf, offset=x.nbytes)  # the first output
    conn.send_bytes(b"ready")
    while conn.recv_bytes() == b"run":
        start = time.perf_counter()
        out = sess.run(None, {name: x})[0]
        seconds = time.perf_counter() - start
        y[...] = out
        conn.send_bytes(struct.pack("d", seconds))
    del x, y  # no views may outlive close()
    shm.close()
    conn.close()


@contextmanager
def worker_process(path: str, threads: int, x_shape: tuple[int, ...], y_shape: tuple[int, ...],
                   y_dtype: np.dtype, start_s: float = 120) -> Iterator[Callable]:
    """A child process (spawn) owning its own session, with preallocated shared-memory buffers for one
    input batch and its scores. Yields call(x) → (scores, run seconds in the child): copy in, signal,
    wait, copy out. The child is stopped and joined, and the memory unlinked, on the way out."""
    ctx = mp.get_context("spawn")
    x_bytes = int(np.prod(x_shape)) * 4
    shm = SharedMemory(create=True, size=x_bytes + int(np.prod(y_shape)) * np.dtype(y_dtype).itemsize)
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_child, daemon=True, args=(path, threads, shm.name, x_shape, y_shape,
                                                         np.dtype(y_dtype).str, child_conn))
    proc.start()
    x = np.ndarray(x_shape, np.float32, shm.buf)
    y = np.ndarray(y_shape, y_dtype, shm.buf, offset=x_bytes)

    def call(batch):
        x[...] = batch
        conn.send_bytes(b"run")
        seconds = struct.unpack("d", conn.recv_bytes())[0]
        return y.copy(), seconds

    try:
        if not conn.poll(start_s) or conn.recv_bytes() != b"ready":
            raise RuntimeError(f"worker process did not start within {start_s} s")
        yield call
    finally:
        try:
            conn.send_bytes(b"stop")
        except OSError:  # already gone
            pass
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join()
        conn.close()
        child_conn.close()
        x = y = None  # release the views (the closure shares these cells) before close()
        shm.close()
        shm.unlink()


def per_call(call: Callable[[], float], min_s: float) -> tuple[float, float]:
    """(wall, run) seconds per call over one best_seconds round; `call` returns its run seconds (the
    round's warm-up call is left out of the run mean)."""
    runs: list[float] = []
    wall = best_seconds(lambda: runs.append(call()), min_s=min_s, rounds=1)
    return wall, sum(runs[1:]) / len(runs[1:])


# -----------------------------------------------------------------------------
# 1. one call from each kind of caller


def gil_pressure(path: str, batch: int, shape: tuple[int, int, int], threads: int,
                 min_s: float = 0.5, rounds: int = 3) -> dict:
    """Per-call ms of `session.run` on one (batch, C, H, W) input from each kind of caller: the main
    thread; a worker thread alone, next to a busy Python thread, and the same with a 0.2 ms switch
    interval; a worker process with and without the busy thread in this (the calling) process.
    `call_ms` is what the caller sees, `run_ms` the time around session.run where it runs. Note that
    the process caller also re-takes the GIL (after its pipe read) while the busy thread runs here;
    in a server whose event loop awaited the pipe itself, that hand-off would not happen."""
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)  # (N, C, H, W)
    expected = sess.run(None, {name: x})[0]  # (N, classes, ...)

    def direct():
        start = time.perf_counter()
        sess.run(None, {name: x})
        return time.perf_counter() - start

    def checked(call):  # the same scores from every caller; then only its run seconds
        np.testing.assert_allclose(call(x)[0], expected, rtol=1e-4, atol=1e-5)
        return lambda: call(x)[1]

    old_interval = sys.getswitchinterval()

    # one round of every caller, `rounds` times (fair under a drifting load); the best round counts
    with worker_thread(sess, name) as in_thread, \
            worker_process(path, threads, x.shape, expected.shape, expected.dtype) as in_process:
        callers = {  # name: (call, busy thread?, switch interval)
            "main_thread": (direct, False, None),
            "worker_idle": (checked(in_thread), False, None),
            "worker_busy": (checked(in_thread), True, None),
            "worker_busy_switch_0.2ms": (checked(in_thread), True, 2e-4),
            "process_idle": (checked(in_process), False, None),
            "process_busy": (checked(in_process), True, None),
        }
        timings = {caller: (float("inf"), float("inf")) for caller in callers}
        for _ in range(rounds):
            for caller, (call, busy, interval) in callers.items():
                with busy_thread() if busy else nullcontext(), switch_interval(interval or old_interval):
                    timings[caller] = min(timings[caller], per_call(call, min_s))
    return {"batch": batch, "shape": list(shape), "threads": threads,
            "switch_interval_ms": old_interval * 1e3,
            "callers": {caller: {"call_ms": round(wall * 1e3, 3), "run_ms": round(run * 1e3, 3)}
                        for caller, (wall, run) in timings.items()}}


# -----------------------------------------------------------------------------
# 2. batch sizes: new shapes and padding


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def shape_cost(path: str, shape: tuple[int, int, int], threads: int,
               sizes: tuple[int, ...] = tuple(range(1, 65)), fresh: tuple[int, ...] = (7, 13, 29, 47, 61),
               pad: tuple[int, ...] = (3, 5, 9, 17, 33), min_s: float = 0.2, rounds: int = 3) -> dict:
    """Per-image µs on CPU over one pass through `sizes` (every size once): each size timed on its own,
    many calls in a row (fixed), vs a different size every call (cycling, after each was seen once);
    the first call at a size the session has never seen (sizes in `fresh` below the largest, in a
    session warmed at the largest; and sizes above anything seen) vs the median of the next calls at
    that size; and what padding each batch up to the next power of two would cost (per size in `pad`,
    and over the pass). First-call minus steady-state differences rest on single calls: noisy, and
    of either sign."""
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    inputs: dict[int, np.ndarray] = {}

    def run(n, s=sess):  # one call at batch size n: (n, C, H, W)
        if n not in inputs:
            inputs[n] = rng.standard_normal((n, *shape), dtype=np.float32)
        return s.run(None, {name: inputs[n]})

    def once(n, s):  # seconds for one call
        start = time.perf_counter()
        run(n, s)
        return time.perf_counter() - start

    # (a) fixed: each size many calls in a row; (b) cycling: a different size every call. One round of
    # each, `rounds` times (fair under a drifting load); every figure is its best round
    timed = sorted({*sizes, *pad, *(pow2(n) for n in (*sizes, *pad))})
    fixed = dict.fromkeys(timed, float("inf"))
    cycling = float("inf")
    for _ in range(rounds):
        for n in timed:
            fixed[n] = min(fixed[n], best_seconds(lambda n=n: run(n), min_s, rounds=1))
        cycling = min(cycling, best_seconds(lambda: [run(n) for n in sizes], min_s, rounds=1))
    images = sum(sizes)

    # (c) first call at a never-seen size, in a fresh session that has run only the largest size;
    # steady state = the median of the next single calls (a median: a shared CPU preempts some calls)
    top = max(sizes)
    fresh_sess = session(path, threads)
    for _ in range(3):
        run(top, fresh_sess)
    new, larger = {}, {}
    for n in [n for n in fresh if n < top]:
        new[n] = (once(n, fresh_sess), float(np.median([once(n, fresh_sess) for _ in range(11)])))
    for n in (top + 1, 2 * top):  # each above anything seen so far
        larger[n] = (once(n, fresh_sess), float(np.median([once(n, fresh_sess) for _ in range(11)])))

    # (d) padding each batch up to the next power of two, over the pass through `sizes`
    padded = sum(fixed[pow2(n)] for n in sizes)

    def firsts(table):
        return {"first_ms": round(float(np.mean([f for f, _ in table.values()])) * 1e3, 3),
                "steady_ms": round(float(np.mean([s for _, s in table.values()])) * 1e3, 3),
                "extra_ms": round(float(np.mean([f - s for f, s in table.values()])) * 1e3, 3),
                "sizes": sorted(table)}

    return {
        "shape": list(shape), "threads": threads, "sizes": [min(sizes), top, len(sizes)],
        "fixed_us_per_image": round(sum(fixed[n] for n in sizes) / images * 1e6, 2),
        "cycling_us_per_image": round(cycling / images * 1e6, 2),
        "cycling_over_fixed": round(cycling / sum(fixed[n] for n in sizes), 3),
        "new_size": firsts(new) if new else None,
        "larger_size": firsts(larger),
        "pow2_padded_us_per_image": round(padded / images * 1e6, 2),
        "pow2_padded_over_fixed": round(padded / sum(fixed[n] for n in sizes), 3),
        "padding": {n: {"ms": round(fixed[n] * 1e3, 3), "pow2": pow2(n),
                        "pow2_ms": round(fixed[pow2(n)] * 1e3, 3),
                        "extra_pct": round((fixed[pow2(n)] / fixed[n] - 1) * 100, 1)} for n in pad},
    }


# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# the service's own engine under a busy event loop (what `make bench` reports)


async def _drive(call: Callable[[], Awaitable], calls: int, busy: bool, max_s: float = 3.0) -> float:
    """Mean wall ms per `await call()` over `calls` calls (or as many as fit in `max_s`: under GIL
    pressure one call can take a second), the event loop meanwhile idle or busy in Python (2 ms slices of
    pure Python between yields, like a loop parsing and decoding requests)."""
    stop = False

    async def busy_loop() -> None:
        while not stop:
            until = time.perf_counter() + 0.002
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    burner = asyncio.ensure_future(busy_loop()) if busy else None
    await call()  # warm-up
    started, done = time.perf_counter(), 0
    while done < calls and (done < 3 or time.perf_counter() - started < max_s):
        await call()
        done += 1
    wall = (time.perf_counter() - started) / done
    stop = True
    if burner:
        await burner
    return wall * 1e3


def engine_pressure(model: Model, batch: int, calls: int = 200) -> dict:
    """Per-call ms through service.engine (an asyncio caller, the model on its inference thread): the
    event loop idle or busy, at Python's default switch interval (5 ms) and at the engine's (0.2 ms).
    `compute_ms` is what /metrics reports as convserve_compute_seconds (median over the calls).
    `to_thread_busy_5ms`: the design before the engine, `await asyncio.to_thread(model.infer, x)`."""
    x = np.zeros((batch, *model.window_shape), np.uint8)
    with switch_interval(0.005):
        rows = {"to_thread_busy_5ms": {
            "call_ms": round(asyncio.run(_drive(lambda: asyncio.to_thread(model.infer, x), calls, True)), 3)}}
    for label, busy, switch_ms in [("idle_5ms", False, 0), ("busy_5ms", True, 0), ("busy_0.2ms", True, 0.2)]:
        seen: list = []
        with switch_interval(0.005):  # the engine sets its own (process-wide) when switch_ms > 0
            # never shed: a busy loop at 5 ms makes calls slow enough to pass the 1 s queue bound,
            # and what is measured here is the call, not the shedding
            engine = Engine([model], Settings(max_batch_size=batch, batch_buckets="none", max_queue_ms=1e9,
                                              switch_interval_ms=switch_ms), observe=seen.append)
            try:
                call_ms = asyncio.run(_drive(lambda e=engine: e.infer(model.name, x), calls, busy))
            finally:
                engine.close()
        rows[label] = {"call_ms": round(call_ms, 3),
                       "compute_ms": round(float(np.median([b.compute_s for b in seen[1:]])) * 1e3, 3)}
    return {"batch": batch, **rows}


def stored(name: str) -> tuple[str, ModelCard]:
    """The ONNX file and card of `name:latest` in BentoML's store (as bench/__main__.py does)."""
    import bentoml

    model = bentoml.models.get(f"{name}:latest")
    return model.path_of("model.onnx"), ModelCard.from_dict(dict(model.info.metadata))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gil", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lenet5", help="a model in BentoML's store")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--batch", type=int, default=32, help="batch size for the GIL measurements")
    p.add_argument("--max-batch", type=int, default=64, help="shape_cost cycles through 1..this")
    p.add_argument("--min-s", type=float, default=0.5, help="least seconds per timing round")
    p.add_argument("--skip", choices=["gil", "engine", "shapes"], help="leave one measurement out")
    args = p.parse_args(argv)
    path, card = stored(args.model)
    shape = (card.input.channels, card.input.height, card.input.width)  # (C, H, W)
    out = {"model": args.model}
    if args.skip != "gil":
        out["gil_pressure"] = gil_pressure(path, args.batch, shape, args.threads, min_s=args.min_s)
    if args.skip != "engine":
        model = open_model(args.model, card, path, Settings(threads=args.threads))
        out["engine_pressure"] = engine_pressure(model, args.batch)
    if args.skip != "shapes":
        top = args.max_batch
        out["shape_cost"] = shape_cost(path, shape, args.threads, sizes=tuple(range(1, top + 1)),
                                       fresh=tuple(sorted({max(2, top * k // 9) for k in (1, 2, 4, 6, 8)})),
                                       pad=tuple(n for n in (3, 5, 9, 17, 33) if n < top),
                                       min_s=args.min_s / 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
