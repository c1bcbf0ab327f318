"""The GPU image can load its CUDA provider: the Dockerfile's CUDA base has the CUDA and cuDNN majors
that the pinned onnxruntime-gpu was built for. (A CUDA 12.8 base under a CUDA 13 build made the service
run on CPU.) Text only: no Docker engine and no network here. What the wheel needs is read from an
excerpt of its own files, committed under tests/data/ (its header says how it was made): pin another
version and this test asks for that version's excerpt."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT

from service.engine import provider as cuda

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def pinned(extra: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    (dep,) = [d for d in deps if d.startswith("onnxruntime-gpu")]
    match = re.fullmatch(r"onnxruntime-gpu(?:\[[\w,]+\])?==([\w.]+)", dep)
    assert match, f"pin onnxruntime-gpu exactly in the `{extra}` extra (==X.Y.Z), not {dep!r}"
    return match[1]


def wheel_needs(version: str) -> dict[str, int]:
    excerpt = ROOT / "tests" / "data" / f"onnxruntime_gpu-{version}.txt"
    assert excerpt.is_file(), (f"no {excerpt.name}: make it as tests/data/onnxruntime_gpu-1.31.1.txt "
                               f"says, for onnxruntime-gpu=={version}")
    text = excerpt.read_text()
    assert re.search(rf"^Version: {re.escape(version)}$", text, re.MULTILINE)
    runtime = int(re.search(r"^Requires-Dist: nvidia-cuda-runtime~=(\d+)\.", text, re.MULTILINE)[1])
    built = int(re.search(r"^cuda_version = '(\d+)\.", text, re.MULTILINE)[1])
    cudart = int(re.search(r"^NEEDED: libcudart\.so\.(\d+)$", text, re.MULTILINE)[1])
    cudnn = re.search(r"^Requires-Dist: nvidia-cudnn-cu(\d+)~=(\d+)\.", text, re.MULTILINE)
    assert runtime == built == cudart == int(cudnn[1]), "the excerpt disagrees with itself"
    return {"cuda": built, "cudnn": int(cudnn[2])}


def gpu_base() -> tuple[int, str]:
    """(CUDA major, tag) of the image the gpu variant builds on."""
    match = re.search(r"^FROM nvidia/cuda:((\d+)\.\d+\.\d+-[\w.-]+) AS base-gpu$", DOCKERFILE, re.MULTILINE)
    assert match, "the Dockerfile has no `FROM nvidia/cuda:X.Y.Z-... AS base-gpu` stage"
    return int(match[2]), match[1]


def test_the_gpu_base_has_the_cuda_major_of_the_pinned_onnxruntime_gpu():
    version = pinned("gpu")
    assert pinned("gpu-pip") == version
    needs = wheel_needs(version)
    major, tag = gpu_base()
    assert major == needs["cuda"], f"nvidia/cuda:{tag} is CUDA {major}; onnxruntime-gpu {version}: {needs}"
    # cuDNN: NVIDIA's CUDA 13 `cudnn` images carry cuDNN 9, the one cuDNN major for CUDA 13 so far.
    assert "-cudnn-runtime-" in tag and needs["cudnn"] == 9
    # The service's advice names the same majors.
    assert (cuda.CUDA_MAJOR, cuda.CUDNN_MAJOR) == (needs["cuda"], needs["cudnn"])


def test_the_gpu_variant_installs_the_gpu_extra_and_refuses_to_run_on_cpu():
    assert re.search(r"^ARG EXTRAS=\$\{VARIANT\}$", DOCKERFILE, re.MULTILINE)
    gpu_stage = DOCKERFILE.split("AS base-gpu", 1)[1].split("\nFROM ", 1)[0]
    assert "ENV CONVSERVE_PROVIDERS=cuda" in gpu_stage
    assert re.search(r"^FROM base-\$\{VARIANT\}$", DOCKERFILE, re.MULTILINE)
    # the driver requirement is stated where the image is described
    assert f">= {cuda.MIN_DRIVER}" in DOCKERFILE and "CUDA 13" in DOCKERFILE
