"""onnxruntime sessions for the models in BentoML's store, with the provider chosen at start.

CUDA when onnxruntime-gpu is installed and sees a GPU (cuDNN's conv algorithm search set explicitly,
arena growth bounded), else CPU with every graph optimization (layout transforms matter: measured
~30 % on AlexNet) and intra-op threads sized so that workers × threads = cores.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from service.settings import Settings

log = logging.getLogger("convserve")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def providers(settings: Settings) -> list:
    available = ort.get_available_providers()
    want_cuda = settings.providers == "cuda" or (settings.providers == "auto" and CUDA in available)
    if want_cuda and CUDA not in available:
        raise RuntimeError("CONVSERVE_PROVIDERS=cuda, but this onnxruntime has no CUDA provider: "
                           "install the `gpu` extra (onnxruntime-gpu) instead of `cpu`")
    if not want_cuda:
        return [CPU]
    cuda = {
        "device_id": settings.cuda_device,
        # EXHAUSTIVE benchmarks every conv algorithm once per new input shape: worth it for the few
        # shapes /classify sees (warmed up), costly for arbitrary /score_map sizes; HEURISTIC is the
        # middle ground and the choice is explicit either way.
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",  # grow by what is asked, not by doubling
        "gpu_mem_limit": int(settings.cuda_mem_limit_gb * 2**30),
        "do_copy_in_default_stream": True,
    }
    return [(CUDA, cuda), CPU]


def session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads spin for work by default: with a small model that is a core burnt while the
    # event loop (decode, HTTP) starves; measured 152 % vs 103 % worker CPU for the same load.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass
class ServedModel:
    """One model from the store: its card (all the service knows about it) and its session."""

    tag: str
    card: dict
    session: ort.InferenceSession
    warmup_ms: float = 0.0
    shapes_warmed: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def window(self) -> int:
        return int(self.card["dense"]["window"])

    @property
    def channels(self) -> int:
        return int(self.card["input"]["channels"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 → scores (N, K, h, w), cropped to the cells inside the image."""
        scores = self.session.run([self.card["onnx"]["output"]], {self.card["onnx"]["input"]: x})[0]
        dense = self.card["dense"]
        h = (x.shape[2] - dense["window"]) // dense["stride"] + 1
        w = (x.shape[3] - dense["window"]) // dense["stride"] + 1
        return scores[:, :, :h, :w]

    def warm_up(self, batch_sizes: list[int], dense_size: int, rounds: int) -> None:
        """Run every shape the service will see first, so the first requests pay no set-up cost."""
        start = time.perf_counter()
        shapes = [(n, self.channels, self.window, self.window) for n in batch_sizes]
        shapes.append((1, self.channels, dense_size, dense_size))
        for _ in range(rounds):
            for shape in shapes:
                self.run(np.zeros(shape, np.float32))
        self.warmup_ms = round((time.perf_counter() - start) * 1000, 1)
        self.shapes_warmed = [list(s) for s in shapes]

    def describe(self) -> dict:
        return {**self.card, "tag": self.tag, "provider": self.provider, "warmup_ms": self.warmup_ms,
                "warmed_shapes": self.shapes_warmed}


def check_store(tags: list[str]) -> None:
    """Exit with a clear message when the store lacks a model. Called at import, so `bentoml serve`
    stops before it starts workers (a worker failing later leaves the server up, serving nothing)."""
    import bentoml

    if not tags:
        raise SystemExit("error: CONVSERVE_MODELS names no model")
    missing = []
    for tag in tags:
        try:
            bentoml.models.get(tag)
        except bentoml.exceptions.NotFound:
            missing.append(tag)
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not in the BentoML model store "
                         f"(BENTOML_HOME="
                         f"{os.environ.get('BENTOML_HOME', '~/bentoml')}); run `make artifacts` (or "
                         f"`python -m export ...`), or set CONVSERVE_MODELS to models you have")


def load(tag: str, settings: Settings) -> ServedModel:
    import bentoml  # the store only; no framework runner

    stored = bentoml.models.get(tag)
    card = dict(stored.info.metadata)
    session = ort.InferenceSession(stored.path_of("model.onnx"), session_options(settings),
                                   providers=providers(settings))
    model = ServedModel(str(stored.tag), card, session)
    log.info("loaded %s (%s) on %s with %d intra-op threads", model.tag, card["arch"], model.provider,
             settings.intra_op_threads)
    return model
