"""The engine (service/engine): batch assembly, buckets, errors, cancellation and metrics, with a model
whose calls we hold on an event; then the whole engine on a real onnxruntime session."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelcard import InputSpec, ModelCard
from service.engine import Engine
from service.engine.buckets import bucket_for, bucket_sizes, pad, warm_sizes
from service.engine.sessions import open_model
from service.engine.worker import ModelWorker
from service.errors import Overloaded
from service.settings import Settings

WINDOW = (1, 4, 4)


class HeldModel:
    """Stands in for sessions.Model: each call records its batch shape and waits for `gate`; the score
    of an image is its first pixel, so every caller can check it got its own rows back."""

    name, window_shape = "held", WINDOW
    input = InputSpec("L", 4, 4, (0.0,), (1.0,), 1 / 255, 1)
    card = ModelCard.from_dict({"name": "held", "labels": ["a"], "input": input.to_dict(),
                                "dense": {"window": 4, "stride": 1, "offset": 0, "receptive_field": 4},
                                "onnx": {"input": "input", "output": "scores"}})

    def infer(self, x: np.ndarray, outputs=frozenset({"scores"}), threshold=None) -> dict:
        return {"scores": self.run(x)}

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.fail_when = lambda x: False

    def run(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(x.shape)
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        if self.fail_when(x):
            raise RuntimeError("onnxruntime said no")
        return x[:, :1, :1, :1].copy()  # (n, 1, 1, 1)


def images(first: float, n: int = 1, shape=WINDOW) -> np.ndarray:
    """n float32 images whose first pixels are first, first + 1, …"""
    x = np.zeros((n, *shape), np.float32)
    x[:, 0, 0, 0] = first + np.arange(n)
    return x


@pytest.fixture
def held():
    model, seen = HeldModel(), []
    worker = ModelWorker(model, max_batch_size=8, buckets=list(range(1, 9)), wait_ms=0, observe=seen.append)
    yield model, worker, seen
    model.gate.set()
    worker.close()


def block_on_first_call(model: HeldModel, worker: ModelWorker):
    """Submit one image and wait until the model is busy with it (the gate still closed)."""
    first = worker.enqueue(images(100))
    assert model.entered.wait(10)
    return first


def test_first_request_runs_alone_then_the_queue_in_full_batches(held):
    model, worker, seen = held
    first = block_on_first_call(model, worker)
    waiting = [worker.enqueue(images(10 * i, 2)) for i in range(5)]  # 10 images queue while it runs
    model.gate.set()
    assert first[0].result(10).ravel().tolist() == [100]
    for i, (future,) in enumerate(waiting):
        assert future.result(10).ravel().tolist() == [10 * i, 10 * i + 1]  # its own rows, in order
    assert [shape[0] for shape in model.calls] == [1, 8, 2]  # max 8 images a call; none split
    assert [(b.images, b.padded, b.kind) for b in seen] == [(1, 1, "window"), (8, 8, "window"),
                                                            (2, 2, "window")]
    assert all(b.queue_s >= 0 and b.compute_s > 0 and b.model == "held" for b in seen)
    assert seen[1].queue_s > 0  # they waited for the first call


def test_batches_are_padded_to_buckets_and_unpadded_after():
    model, seen = HeldModel(), []
    model.gate.set()
    worker = ModelWorker(model, 8, bucket_sizes("pow2", 8, on_gpu=False), 0, seen.append)
    try:
        scores = worker.enqueue(images(1, 3))[0].result(10)
    finally:
        worker.close()
    assert model.calls == [(4, *WINDOW)] and scores.ravel().tolist() == [1, 2, 3]
    assert (seen[0].images, seen[0].padded) == (3, 4)


def test_an_error_reaches_every_waiter_of_that_batch_and_the_next_batch_runs(held):
    model, worker, _ = held
    model.fail_when = lambda x: x.shape[0] == 3
    first = block_on_first_call(model, worker)
    doomed = [worker.enqueue(images(i))[0] for i in range(3)]
    model.gate.set()
    assert first[0].result(10).ravel().tolist() == [100]
    for future in doomed:
        with pytest.raises(RuntimeError, match="said no"):
            future.result(10)
    assert worker.enqueue(images(7))[0].result(10).ravel().tolist() == [7]


def test_a_cancelled_request_never_runs_and_the_loop_lives_on(held):
    model, worker, _ = held
    block_on_first_call(model, worker)
    (gone,), (kept,) = worker.enqueue(images(1)), worker.enqueue(images(2))
    assert gone.cancel()
    model.gate.set()
    assert kept.result(10).ravel().tolist() == [2]
    assert [shape[0] for shape in model.calls] == [1, 1]  # the cancelled image was not computed
    with pytest.raises(CancelledError):
        gone.result()


def test_dense_images_never_join_a_batch_of_windows_and_nothing_overtakes(held):
    model, worker, seen = held
    block_on_first_call(model, worker)
    a = worker.enqueue(images(1))
    page = worker.enqueue(images(50, 1, (1, 12, 20)))
    b = worker.enqueue(images(2))
    model.gate.set()
    assert [f[0].result(10).ravel().tolist() for f in (a, page, b)] == [[1], [50], [2]]
    assert model.calls[1:] == [(2, *WINDOW), (1, 1, 12, 20)]
    assert [b.kind for b in seen] == ["window", "window", "dense"]


def test_requests_over_the_batch_limit_are_split(held):
    model, worker, _ = held
    model.gate.set()
    futures = worker.enqueue(images(0, 20))
    assert len(futures) == 3
    assert np.concatenate([f.result(10) for f in futures]).ravel().tolist() == list(range(20))


def test_close_fails_the_waiting_requests_instead_of_dropping_them(held):
    model, worker, _ = held
    block_on_first_call(model, worker)
    (waiting,) = worker.enqueue(images(1))
    worker.queue.close()
    with pytest.raises(RuntimeError, match="shut down"):
        waiting.result(10)
    with pytest.raises(RuntimeError, match="shut down"):
        worker.enqueue(images(2))


def test_bucket_sizes():
    assert bucket_sizes("pow2", 64, on_gpu=False) == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_sizes("pow2", 48, on_gpu=False) == [1, 2, 4, 8, 16, 32, 48]
    assert bucket_sizes("auto", 8, on_gpu=True) == [1, 2, 4, 8]
    assert bucket_sizes("auto", 8, on_gpu=False) == bucket_sizes("none", 8, False) == list(range(1, 9))
    assert bucket_sizes("8,1,4", 16, on_gpu=False) == [1, 4, 8, 16]
    with pytest.raises(ValueError, match="pow2"):
        bucket_sizes("big", 16, on_gpu=False)
    assert [bucket_for(n, [1, 4, 8]) for n in (1, 2, 4, 5, 8, 9)] == [1, 4, 4, 8, 8, 9]
    assert pad(np.ones((3, 2)), 4).tolist() == [[1, 1], [1, 1], [1, 1], [0, 0]]
    assert warm_sizes(list(range(1, 65))) == [1, 2, 4, 8, 16, 32, 64]
    assert warm_sizes([1, 4, 8]) == [1, 4, 8]


# The real thing: an ONNX model (one 4×4 conv: a "classifier" with window 4, stride 1) in onnxruntime.
CARD = {"name": "tiny", "arch": "tiny-conv", "labels": ["a", "b"],
        "input": {"channels": 1, "mode": "L", "height": 4, "width": 4, "scale": 1 / 255, "mean": [0.5],
                  "std": [0.25]},
        "dense": {"window": 4, "stride": 1, "offset": 0, "receptive_field": 4, "exact": True},
        "onnx": {"input": "input", "output": "scores"}}
TINY = ModelCard.from_dict(CARD)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    weight = np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["scores"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")])
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path), weight


def test_engine_on_onnxruntime_batches_normalizes_and_answers_each_caller(tiny_onnx):
    path, weight = tiny_onnx
    settings = Settings(threads=1, max_batch_size=8, batch_buckets="pow2", warmup_rounds=1,
                        switch_interval_ms=0)
    seen = []
    engine = Engine([open_model("tiny:1", TINY, path, settings)], settings, observe=seen.append)
    try:
        engine.warm_up()
        rng = np.random.default_rng(1)
        pixels = [rng.integers(0, 256, (int(rng.integers(1, 6)), 1, 4, 4), dtype=np.uint8) for _ in range(30)]

        async def all_at_once():
            return await asyncio.gather(*(engine.infer("tiny", p) for p in pixels))

        answers = asyncio.run(all_at_once())
        page = rng.integers(0, 256, (1, 1, 9, 13), dtype=np.uint8)
        dense = engine.infer_blocking("tiny", page)
    finally:
        engine.close()
    spec = ModelCard.from_dict(CARD).input
    for p, got in zip(pixels, answers, strict=True):  # a direct convolution of the normalized pixels
        x = spec.normalize(p)
        expected = np.einsum("nchw,kchw->nk", x, weight)[:, :, None, None]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert dense.shape == (1, 2, 6, 10)
    assert sum(b.images for b in seen if b.kind == "window") == sum(len(p) for p in pixels)
    assert all(b.padded in (1, 2, 4, 8) for b in seen if b.kind == "window")
    assert engine.models["tiny"].shapes_warmed[0] == [1, 1, 4, 4]


def test_an_asyncio_caller_that_goes_away_is_never_computed(tiny_onnx):
    """Engine.submit cancelled (the client disconnected) while its images wait: they are dropped."""
    path, _ = tiny_onnx
    settings = Settings(threads=1, max_batch_size=4, batch_buckets="none", switch_interval_ms=0)
    engine = Engine([open_model("tiny:1", TINY, path, settings)], settings, observe=lambda b: None)
    held = HeldModel()
    engine.workers["held"] = ModelWorker(held, 4, [1, 2, 3, 4], 0, lambda b: None)

    async def cancel_one_then_ask_again():
        first = asyncio.ensure_future(engine.infer("held", images(100)))
        while not held.entered.is_set():  # the model is busy with `first`, its gate closed
            await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(engine.infer("held", images(1)))
        await asyncio.sleep(0.01)  # `gone` is queued
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        held.gate.set()
        return await first, await engine.infer("held", images(2))

    try:
        first, again = asyncio.run(cancel_one_then_ask_again())
    finally:
        held.gate.set()
        engine.close()
    assert first.ravel().tolist() == [100] and again.ravel().tolist() == [2]
    assert [shape[0] for shape in held.calls] == [1, 1]  # the cancelled image never reached the model


def test_with_a_batch_wait_late_requests_join_and_close_does_not_hang():
    model, seen = HeldModel(), []
    model.gate.set()
    worker = ModelWorker(model, 8, list(range(1, 9)), wait_ms=2000, observe=seen.append)
    try:
        (a,), (b,) = worker.enqueue(images(1)), worker.enqueue(images(2))  # b arrives within a's wait
        assert [a.result(10).item(), b.result(10).item()] == [1, 2]
        assert [shape[0] for shape in model.calls] == [2]
        (waiting,) = worker.enqueue(images(3))
    finally:
        worker.close()  # during the 2 s wait: returns at once, and the waiting request hears why
    assert not worker.thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        waiting.result(10)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_inference_thread_fails_its_waiters_and_refuses_new_requests(held):
    model, worker, _ = held
    block_on_first_call(model, worker)
    (waiting,) = worker.enqueue(images(1))

    def broken_take():
        raise RuntimeError("a bug in the queue")  # outside the per-batch handler: the thread dies

    worker.queue.take = broken_take
    model.gate.set()
    with pytest.raises(RuntimeError, match="shut down"):
        waiting.result(10)
    worker.thread.join(10)
    with pytest.raises(RuntimeError, match="shut down"):
        worker.enqueue(images(2))


def test_metrics_observe_records_every_series():
    from prometheus_client import REGISTRY

    from service.engine import metrics

    def value(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, {"model": "m-test", "kind": "window", **labels}) or 0.0

    metrics.observe(metrics.Batch("m-test", "window", 3, 4, 0.002, 0.001))
    assert value("convserve_batch_size_count") == 1 and value("convserve_batch_size_sum") == 3
    assert value("convserve_padding_images_total") == 1
    assert value("convserve_queue_seconds_sum") == pytest.approx(0.002)
    assert value("convserve_compute_seconds_sum") == pytest.approx(0.001)


def test_a_full_queue_refuses_at_once_and_a_request_that_waited_too_long_is_not_run(held):
    """Shedding (service/engine/batcher.py): over the estimated-wait bound → Overloaded at put; a
    queued request older than the bound → Overloaded when its turn comes, and the model never sees it.
    Dense work (shed=False) is never shed."""
    model, _, _ = held
    worker = ModelWorker(model, 8, list(range(1, 9)), 0, lambda b: None, max_queue_ms=100)
    try:
        (busy,) = worker.enqueue(images(1), shed=True)
        assert model.entered.wait(10)  # the model holds `busy`; what follows queues
        worker.queue.seconds_per_item = 0.04  # as if measured: 2 images ≈ 0.08 s, 3 ≈ 0.12 s > 0.1 s
        (stale,) = worker.enqueue(images(2), shed=True)
        with pytest.raises(Overloaded) as refused:
            worker.enqueue(images(3, n=2), shed=True)
        assert refused.value.retry_after_s > 0
        (dense,) = worker.enqueue(images(5, shape=(1, 9, 9)))  # unshed: queued whatever the estimate
        time.sleep(0.3)  # `stale` is now older than the 0.1 s bound
        model.gate.set()
        assert busy.result(10).item() == 1 and dense.result(10).shape == (1, 1, 1, 1)
        with pytest.raises(Overloaded, match="waited"):
            stale.result(10)
    finally:
        model.gate.set()
        worker.close()
    assert [shape[0] for shape in model.calls] == [1, 1] and model.calls[1][2:] == (9, 9)


def test_an_onnxruntime_error_fails_only_its_request_and_the_model_serves_on(tmp_path):
    """A real onnxruntime failure: Gather with an index out of range (the image's largest pixel)."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["input"], ["peak"], axes=[1, 2, 3], keepdims=1),
         helper.make_node("Cast", ["peak"], ["index"], to=TensorProto.INT64),
         helper.make_node("Gather", ["table", "index"], ["scores"])], "gather",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.arange(10, dtype=np.float32) * 10, "table")])
    path = tmp_path / "gather.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    settings = Settings(threads=1, max_batch_size=4, batch_buckets="none", switch_interval_ms=0)
    engine = Engine([open_model("tiny:1", TINY, str(path), settings)], settings, observe=lambda b: None)
    try:
        assert engine.infer_blocking("tiny", images(3)).item() == 30
        with pytest.raises(Exception, match="(?i)out of (data )?bounds|indices"):
            engine.infer_blocking("tiny", images(50))
        assert engine.infer_blocking("tiny", images(4)).item() == 40
        assert engine.workers["tiny"].thread.is_alive()
    finally:
        engine.close()


def test_replace_takes_only_a_version_with_the_same_inputs_and_labels(tiny_onnx):
    path, _ = tiny_onnx
    settings = Settings(threads=1, switch_interval_ms=0)
    engine = Engine([open_model("tiny:1", TINY, path, settings)], settings, observe=lambda b: None)
    worker = engine.workers["tiny"]
    try:
        same = open_model("tiny:2", ModelCard.from_dict({**CARD, "version": "2"}), path, settings)
        assert worker.replace(same).tag == "tiny:1" and engine.models["tiny"] is same
        relabelled = open_model("tiny:3", ModelCard.from_dict({**CARD, "labels": ["x", "y"]}), path, settings)
        with pytest.raises(ValueError, match="labels"):
            worker.replace(relabelled)
        resized = open_model("tiny:4", ModelCard.from_dict({**CARD, "dense": {**CARD["dense"], "window": 5}}),
                             path, settings)
        with pytest.raises(ValueError, match="window_shape"):
            worker.replace(resized)
        assert engine.infer_blocking("tiny", images(1)).shape == (1, 2, 1, 1)
    finally:
        engine.close()
