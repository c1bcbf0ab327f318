"""bench.gil's measuring code on a one-Conv model built here (seconds): every figure is there and
positive, the worker process is gone afterwards and the switch interval is back. No timings asserted."""

from __future__ import annotations

import math
import multiprocessing as mp
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench import gil


@pytest.fixture
def conv_model(tmp_path) -> str:
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 1, 3, 3), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "one-conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    return str(path)


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_gil_pressure_times_every_caller_and_cleans_up(conv_model):
    interval = sys.getswitchinterval()
    row = gil.gil_pressure(conv_model, 4, (1, 8, 8), threads=1, min_s=0.02, rounds=2)
    assert set(row["callers"]) == {"main_thread", "worker_idle", "worker_busy", "worker_busy_switch_0.2ms",
                                   "process_idle", "process_busy"}
    for caller, times in row["callers"].items():
        assert set(times) == {"call_ms", "run_ms"}, caller
        assert all(positive(t) for t in times.values()), (caller, times)
    assert row["batch"] == 4 and row["threads"] == 1
    # CPython keeps the interval in whole microseconds (0.2 ms, which an Engine built earlier in this
    # process set, comes back a microsecond or two short)
    assert sys.getswitchinterval() == pytest.approx(interval, abs=1e-5)
    assert mp.active_children() == []


def test_switch_interval_is_restored_after_an_error():
    interval = sys.getswitchinterval()
    with pytest.raises(ValueError), gil.switch_interval(1e-4):
        assert sys.getswitchinterval() == pytest.approx(1e-4)
        raise ValueError
    assert sys.getswitchinterval() == pytest.approx(interval, abs=1e-5)


def test_worker_process_is_stopped_and_its_memory_released(conv_model):
    x = np.ones((2, 1, 8, 8), np.float32)
    with gil.worker_process(conv_model, 1, x.shape, (2, 4, 6, 6), np.float32) as call:
        scores, seconds = call(x)
    assert scores.shape == (2, 4, 6, 6) and positive(seconds)
    assert mp.active_children() == []


def test_shape_cost_reports_every_figure(conv_model):
    row = gil.shape_cost(conv_model, (1, 8, 8), threads=1, sizes=(1, 2, 3, 4, 5, 6), fresh=(3, 4),
                         pad=(3, 5), min_s=0.01, rounds=2)
    for key in ("fixed_us_per_image", "cycling_us_per_image", "cycling_over_fixed",
                "pow2_padded_us_per_image", "pow2_padded_over_fixed"):
        assert positive(row[key]), key
    for key in ("new_size", "larger_size"):
        part = row[key]
        assert positive(part["first_ms"]) and positive(part["steady_ms"]), part
        assert math.isfinite(part["extra_ms"])  # a difference of two timings: either sign
    assert row["new_size"]["sizes"] == [3, 4] and row["larger_size"]["sizes"] == [7, 12]
    assert set(row["padding"]) == {3, 5}
    for n, pad in row["padding"].items():
        assert pad["pow2"] == {3: 4, 5: 8}[n] and positive(pad["ms"]) and positive(pad["pow2_ms"])
        assert math.isfinite(pad["extra_pct"])
