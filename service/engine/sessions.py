"""onnxruntime sessions: the provider chosen at start, its options, and one model's call.

CUDA when onnxruntime-gpu is installed and sees a GPU (cuDNN's conv algorithm search set explicitly,
arena growth bounded), else CPU with every graph optimization (layout transforms matter: measured
~30 % on AlexNet) and intra-op threads sized so that workers × threads = cores.

A session that was meant for CUDA but came up on CPU (onnxruntime falls back with only a log line) is
an error with CONVSERVE_PROVIDERS=cuda and a warning with auto, in the log and in GET /models
(create_session; cuda.py says why and what to install).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from service.card import InputSpec
from service.engine import cuda as cuda_check
from service.engine.binding import Binder
from service.settings import Settings

log = logging.getLogger("convserve")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """CONVSERVE_PROVIDERS=cuda, and CUDA is not what onnxruntime can run here."""


def wants_cuda(settings: Settings) -> bool:
    return settings.providers == "cuda" or (settings.providers == "auto"
                                            and CUDA in ort.get_available_providers())


def providers(settings: Settings) -> list:
    if not wants_cuda(settings):
        return [CPU]
    if CUDA not in ort.get_available_providers():
        raise ProviderError("CONVSERVE_PROVIDERS=cuda, but this onnxruntime has no CUDA provider: "
                            "install the `gpu` extra (onnxruntime-gpu) instead of `cpu`. "
                            + cuda_check.ADVICE)
    cuda = {
        "device_id": settings.cuda_device,
        # EXHAUSTIVE benchmarks every conv algorithm once per new input shape: worth it for the few
        # shapes /classify sees (warmed up), costly for arbitrary /score_map sizes; HEURISTIC is the
        # middle ground and the choice is explicit either way.
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",  # grow by what is asked, not by doubling
        "gpu_mem_limit": int(settings.cuda_mem_limit_gb * 2**30),
        "do_copy_in_default_stream": True,
        "use_tf32": int(settings.cuda_tf32),
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
    provider_warning: str = ""  # CUDA was wanted (auto) but the session came up on CPU: why
    binder: Binder | None = None  # IO binding for window batches (CUDA by default: binding.py)

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

    @property
    def takes_pixels(self) -> bool:
        """The graph normalizes uint8 pixels itself (export/heads.py); older cards: float32 only."""
        return "pixels" in self.card["onnx"]

    @property
    def topk_k(self) -> int:
        """How many classes the in-graph top-k head returns per image; 0: no head (older cards)."""
        return int(self.card["onnx"].get("heads", {}).get("classify", {}).get("k", 0))

    def run(self, x: np.ndarray) -> np.ndarray:
        """uint8 pixels or float32 already normalized, (N, C, H, W) → scores (N, K, h, w), cropped to
        the cells inside the image."""
        return self.infer(x, {"scores"})["scores"]

    @property
    def peaks_head(self) -> dict | None:
        """The card's dense peak head (export/heads.py add_dense_head), None for models without."""
        return self.card["onnx"].get("heads", {}).get("peaks")

    def infer(self, x: np.ndarray, wants: set[str], params: dict | None = None) -> dict:
        """The one onnxruntime call. `wants`: "scores" (as run) and/or "topk": (probabilities (N, k),
        class indices (N, k)) of the first cell, best first, from the graph's head when it has one
        (k = topk_k; only those leave the device), else from the scores in numpy (k = K); and/or
        "peaks" (params["threshold"]): a detector's objectness peaks, (cells (M, 3) as (n, y, x),
        their raw scores (M, K)), from the graph's peak head, else from the scores in numpy
        (service/dense.py's path). Pixels are fed as uint8 to graphs that normalize them, else
        normalized here as the card says."""
        onnx = self.card["onnx"]
        if self.takes_pixels and x.dtype == np.uint8:  # the float `input` is required: an empty one
            feeds = {onnx["pixels"]: x, onnx["input"]: np.empty((0, *x.shape[1:]), np.float32)}
        else:  # `pixels`, where the graph has it, is optional and empty unless fed
            feeds = {onnx["input"]: self.input.normalize(x) if x.dtype == np.uint8 else x}
        head = onnx.get("heads", {}).get("classify") if "topk" in wants else None
        peaks = self.peaks_head if "peaks" in wants else None
        names = [onnx["output"]] if "scores" in wants or ("topk" in wants and not head) or \
            ("peaks" in wants and not peaks) else []
        if head:
            names += [head["values"], head["indices"]]
        if peaks:
            names += [peaks["cells"], peaks["scores"]]
            feeds[peaks["threshold"]] = np.array((params or {})["threshold"], np.float32)
        if self.binder and x.shape[1:] == self.window_shape and not peaks:  # peaks: shapes unknown
            n, labels = len(x), len(self.card["labels"])
            shapes = {onnx["output"]: (n, labels, 1, 1)}
            if head:
                shapes[head["values"]] = shapes[head["indices"]] = (n, head["k"])
            values = self.binder.run(feeds, names, shapes)
        else:
            values = self.session.run(names, feeds)
        got = dict(zip(names, values, strict=True))
        out = {}
        if onnx["output"] in got:
            dense = self.card["dense"]
            h = (x.shape[2] - dense["window"]) // dense["stride"] + 1
            w = (x.shape[3] - dense["window"]) // dense["stride"] + 1
            out["scores"] = got[onnx["output"]][:, :, :h, :w]
        if "topk" in wants:
            out["topk"] = (got[head["values"]], got[head["indices"]]) if head else \
                topk(got[onnx["output"]][:, :, 0, 0], len(self.card["labels"]))
        if "peaks" in wants:
            out["peaks"] = (got[peaks["cells"]], got[peaks["scores"]]) if peaks else \
                dense_peaks(out["scores"], self.card["labels"], (params or {})["threshold"])
        if "scores" not in wants:
            out.pop("scores", None)
        return out

    def describe(self) -> dict:
        return {**self.card, "tag": self.tag, "provider": self.provider,
                "provider_warning": self.provider_warning, "io_binding": self.binder is not None,
                "warmup_ms": self.warmup_ms,
                "warmed_shapes": self.shapes_warmed}


def softmax(scores: np.ndarray) -> np.ndarray:
    """Over axis 1 of (N, K)."""
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) scores → the k most probable classes' (probabilities, indices), best first; ties in
    class order, as ONNX TopK breaks them (a stable sort), so both paths name the same classes."""
    probs = softmax(scores)
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(probs, indices, 1), indices


def dense_peaks(scores: np.ndarray, labels: list[str], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The peak head's answer computed from the scores (N, K, h, w) in numpy, for a detector without
    the head (a version exported before it): service/dense.py's reference path."""
    from service.dense import BACKGROUND, reference_peaks

    return reference_peaks(scores, labels.index(BACKGROUND), threshold)


def create_session(model: str | bytes, settings: Settings,
                   quiet: bool = False) -> tuple[ort.InferenceSession, str]:
    """The session for `model` (a path or ONNX bytes), and "" or why it runs on CPU although CUDA was
    wanted (auto). Raises ProviderError for that with CONVSERVE_PROVIDERS=cuda. `quiet`: only errors
    from the session's own log (for graphs with an optional input: onnxruntime warns about it on every
    load; export/heads.py). The provider's load errors come from onnxruntime's default log, kept."""
    options = session_options(settings)
    if quiet:
        options.log_severity_level = 3
    chosen = providers(settings)
    if chosen == [CPU]:
        return ort.InferenceSession(model, options, providers=chosen), ""
    with cuda_check.stderr_captured() as said:
        session = ort.InferenceSession(model, options, providers=chosen)
    got = session.get_providers()[0]
    if got == CUDA:
        return session, ""
    why = (f"the CUDA provider did not load, so the session runs on {got}. onnxruntime said: "
           f"{cuda_check.onnxruntime_said(said)}. {cuda_check.ADVICE}")
    if settings.providers == "cuda":
        raise ProviderError(f"CONVSERVE_PROVIDERS=cuda, but {why}")
    log.warning("CONVSERVE_PROVIDERS=auto: %s", why)
    return session, why


def open_model(tag: str, card: dict, onnx_path: str, settings: Settings) -> Model:
    session, warning = create_session(onnx_path, settings, quiet="pixels" in card["onnx"])
    model = Model(tag, card, session, provider_warning=warning)
    if settings.io_binding == "on" or (settings.io_binding == "auto" and model.provider == CUDA):
        model.binder = Binder(session, "cuda" if model.provider == CUDA else "cpu", settings.cuda_device)
    log.info("loaded %s (%s) on %s with %d intra-op threads", tag, card["arch"], model.provider,
             settings.intra_op_threads)
    return model
