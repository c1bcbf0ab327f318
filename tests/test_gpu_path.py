"""Failing loudly when CUDA does not load (issue 14, item 5), on a CPU-only machine: onnxruntime's
CPU build falls back from a CUDA provider it lacks the same way onnxruntime-gpu falls back from one whose
libraries cannot load (the session comes up on CPU, with only a log line), so the check is exercised by
telling the engine that CUDA is available."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ROOT

from loadtest.servers import Server
from modelcard import ModelCard
from service.engine import provider as cuda
from service.engine import sessions
from service.settings import Settings

TINY = {"name": "probe", "arch": "probe", "labels": ["a"],
             "input": {"channels": 1, "mode": "L", "height": 4, "width": 4, "scale": 1 / 255,
                       "mean": [0.0], "std": [1.0]},
             "dense": {"window": 2, "stride": 1, "offset": 0, "receptive_field": 3, "exact": True},
             "onnx": {"input": "x", "output": "y"}}
TINY_CARD = ModelCard.from_dict(TINY)
# What onnxruntime-gpu 1.31.1 wrote to stderr on this machine (no CUDA libraries), captured for real
# (PYTHONPATH=<the wheel unpacked> python -m service.engine.cuda).
REAL_LINES = [
    "2026-12-02 21:43:54.448520552 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:856 operator()] "
    "No registered plugin EP device found for 'CUDAExecutionProvider' with device_id=0",
    "2026-12-02 21:43:54.449093924 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open "
    "shared object file: No such file or directory",
    "2026-12-02 21:43:54.449103448 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* "
    "and CUDA 13.*.",
]


@pytest.fixture
def cuda_listed(monkeypatch):
    """onnxruntime says CUDA is available; creating the session then falls back to CPU."""
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_the_probe_model_is_what_onnx_builds():
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="convserve")
    assert model.SerializeToString() == cuda.PROBE_MODEL, base64.b64encode(model.SerializeToString())


def test_cuda_required_and_a_session_on_cpu_is_an_error_with_onnxruntimes_words(cuda_listed):
    with pytest.raises(cuda.ProviderError) as caught:
        cuda.create_session(cuda.PROBE_MODEL, Settings(providers="cuda", threads=1))
    message = str(caught.value)
    assert "runs on CPUExecutionProvider" in message
    assert "not in available provider names" in message  # onnxruntime's own words
    assert f"CUDA {cuda.CUDA_MAJOR}" in message and f">= {cuda.MIN_DRIVER}" in message  # what to do


def test_auto_and_a_session_on_cpu_warns_in_the_log_and_in_models(cuda_listed, tmp_path, caplog):
    path = tmp_path / "probe.onnx"
    path.write_bytes(cuda.PROBE_MODEL)
    model = sessions.open_model("probe:1", TINY_CARD, str(path), Settings(providers="auto", threads=1))
    assert model.provider == "CPUExecutionProvider"
    assert "did not load" in model.describe()["provider_warning"]
    assert any("did not load" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    scores = model.infer(np.ones((1, 1, 4, 4), np.uint8))["scores"]
    assert scores.shape == (1, 1, 2, 2)


def test_cpu_sessions_carry_no_warning(tmp_path):
    path = tmp_path / "probe.onnx"
    path.write_bytes(cuda.PROBE_MODEL)
    for providers in ("cpu", "auto"):
        model = sessions.open_model("probe:1", TINY_CARD, str(path), Settings(providers=providers, threads=1))
        assert model.describe()["provider_warning"] == ""


def test_stderr_is_captured_and_still_written(capfd):
    import warnings

    with cuda.stderr_captured() as said:
        os.write(2, b"\x1b[1;31mfrom C++\x1b[m\n")
        warnings.warn("from Python", stacklevel=1)
    assert said == ["from C++", "from Python"]
    assert "from C++" in capfd.readouterr().err  # the log keeps it


def test_onnxruntimes_words_without_timestamps_or_noise():
    said = cuda.onnxruntime_said(REAL_LINES)
    assert said.startswith("[E] Failed to load library") and "libcublasLt.so.13" in said
    assert "[W] Failed to create CUDAExecutionProvider" in said
    assert "plugin EP" not in said and "2026-" not in said
    assert cuda.onnxruntime_said(["something else"]) == "something else"


def test_the_probe_reports_the_provider_as_json():
    import json
    import subprocess

    env = {**os.environ, "CONVSERVE_PROVIDERS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "service.engine.provider"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == {"provider": "CPUExecutionProvider", "error": ""}


def test_a_server_asked_for_cuda_without_it_exits_at_start_with_advice(store, tmp_path):
    """Before: the worker raised in ConvServe.__init__ and BentoML restarted it every 10 s, forever.
    Now the check runs where `bentoml serve` imports the service, before any worker."""
    srv = Server(store, tmp_path / "serve.log", providers="cuda")
    try:
        assert srv.process.wait(timeout=60) != 0
        log = (tmp_path / "serve.log").read_text()
        assert "CONVSERVE_PROVIDERS=cuda" in log and "onnxruntime-gpu" in log
        assert f"CUDA {cuda.CUDA_MAJOR}" in log and "Traceback" not in log
    finally:
        srv.stop()


# onnxruntime-gpu itself on a machine without CUDA libraries: the real fallback. Needs the wheel
# unpacked somewhere (pip install --no-deps --target DIR onnxruntime-gpu==<the pin>), given as
# CONVSERVE_TEST_ORT_GPU_SITE=DIR; skipped otherwise (CI has no 250 MB wheel to spare).
GPU_SITE = os.environ.get("CONVSERVE_TEST_ORT_GPU_SITE", "")


@pytest.mark.skipif(not GPU_SITE or not Path(GPU_SITE, "onnxruntime").is_dir(),
                    reason="set CONVSERVE_TEST_ORT_GPU_SITE to an unpacked onnxruntime-gpu")
def test_real_onnxruntime_gpu_without_cuda_libraries(store, tmp_path, monkeypatch):
    import httpx

    monkeypatch.setenv("PYTHONPATH", GPU_SITE)
    strict = Server(store, tmp_path / "cuda.log", providers="cuda")
    try:
        assert strict.process.wait(timeout=90) != 0
        assert "cannot open shared object file" in (tmp_path / "cuda.log").read_text()
    finally:
        strict.stop()
    auto = Server(store, tmp_path / "auto.log", providers="auto")
    try:
        auto.readiness(timeout=120)
        models = httpx.get(f"{auto.url}/models").json()["models"]
        assert all("did not load" in m["provider_warning"] for m in models)
    finally:
        auto.stop()
