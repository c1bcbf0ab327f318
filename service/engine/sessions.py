"""onnxruntime sessions: the provider chosen at start, its options, and one model's call.

CUDA when onnxruntime-gpu is installed and sees a GPU (cuDNN's conv algorithm search set explicitly,
arena growth bounded), else CPU with every graph optimization (layout transforms matter: measured
~30 % on AlexNet) and intra-op threads sized so that workers × threads = cores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from service.card import InputSpec
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
class Model:
    """One model: its card (all the engine knows about it) and its onnxruntime session."""

    tag: str
    card: dict
    session: ort.InferenceSession
    input: InputSpec = field(init=False)
    warmup_ms: float = 0.0
    shapes_warmed: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.input = InputSpec.from_card(self.card)

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
    def window_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image at the size the classifier was trained on."""
        return self.input.channels, self.window, self.window

    def run(self, x: np.ndarray) -> np.ndarray:
        """uint8 pixels (normalized here, as the card says) or float32 already normalized, (N, C, H, W)
        → scores (N, K, h, w), cropped to the cells inside the image. The only onnxruntime call."""
        if x.dtype == np.uint8:
            x = self.input.normalize(x)
        scores = self.session.run([self.card["onnx"]["output"]], {self.card["onnx"]["input"]: x})[0]
        dense = self.card["dense"]
        h = (x.shape[2] - dense["window"]) // dense["stride"] + 1
        w = (x.shape[3] - dense["window"]) // dense["stride"] + 1
        return scores[:, :, :h, :w]

    def describe(self) -> dict:
        return {**self.card, "tag": self.tag, "provider": self.provider, "warmup_ms": self.warmup_ms,
                "warmed_shapes": self.shapes_warmed}


def open_model(tag: str, card: dict, onnx_path: str, settings: Settings) -> Model:
    session = ort.InferenceSession(onnx_path, session_options(settings), providers=providers(settings))
    model = Model(tag, card, session)
    log.info("loaded %s (%s) on %s with %d intra-op threads", tag, card["arch"], model.provider,
             settings.intra_op_threads)
    return model
