"""Execution-provider choice and the CUDA path. The CUDA tests skip cleanly where onnxruntime has no
CUDA provider (CI, and every CPU machine); run them on a GPU machine with the `gpu` extra."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.convolutionalize import convolutionalize
from export.onnx_export import export_onnx
from models.registry import build
from service.engine import provider as sessions
from service.settings import Settings

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_settings():
    settings = Settings(providers="cpu", workers=2, threads=0)
    assert sessions.providers(settings) == ["CPUExecutionProvider"]
    options = sessions.session_options(settings)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == settings.intra_op_threads >= 1


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_asking_for_cuda_without_it_says_what_to_install():
    with pytest.raises(RuntimeError, match="gpu"):
        sessions.providers(Settings(providers="cuda"))
    assert sessions.providers(Settings(providers="auto")) == ["CPUExecutionProvider"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA execution provider (CPU-only onnxruntime or no GPU)")
def test_cuda_matches_cpu(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "lenet.onnx"
    export_onnx(convolutionalize(build("lenet5-relu").eval(), (28, 28)), 1, 28, path)
    settings = Settings(providers="cuda")
    options = sessions.session_options(settings)
    cuda = ort.InferenceSession(str(path), options, providers=sessions.providers(settings))
    cpu = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert cuda.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(0).normal(size=(8, 1, 92, 60)).astype(np.float32)
    np.testing.assert_allclose(cuda.run(None, {"input": x})[0], cpu.run(None, {"input": x})[0],
                               rtol=1e-3, atol=1e-4)
