"""One model in onnxruntime: its card, its session, and the one call that runs it (Model.infer).

A session that was meant for CUDA but came up on CPU (onnxruntime falls back with only a log line) is
an error with CONVSERVE_PROVIDERS=cuda and a warning with auto, in the log and in GET /models
(provider.py says why and what to install).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnxruntime as ort

from modelcard import InputSpec, ModelCard
from modelcard.reference import reference_peaks, topk
from service.engine.binding import Binder
from service.engine.provider import CUDA, create_session
from service.settings import Settings

log = logging.getLogger("convserve")
# What a call returns: "scores" (N, K, h, w); "topk" (probabilities (N, k), class indices (N, k)) of
# the first cell; "peaks" (cells (M, 3) as (n, y, x), raw scores (M, K)), a detector's objectness peaks
Output = Literal["scores", "topk", "peaks"]


@dataclass
class Model:
    """One model: its card (all the engine knows about it) and its onnxruntime session."""

    tag: str
    card: ModelCard
    session: ort.InferenceSession
    warmup_ms: float = 0.0
    call_ms: float = 0.0  # the fastest batch-1 call at warm-up (Engine: inline or on a thread)
    shapes_warmed: list = field(default_factory=list)
    provider_warning: str = ""  # CUDA was wanted (auto) but the session came up on CPU: why
    binder: Binder | None = None  # IO binding for window batches (CUDA by default: binding.py)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def input(self) -> InputSpec:
        return self.card.input

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def window(self) -> int:
        return self.card.window

    @property
    def takes_pixels(self) -> bool:
        return self.card.takes_pixels

    @property
    def window_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image at the size the classifier was trained on."""
        return self.input.channels, self.window, self.window

    def infer(self, x: np.ndarray, outputs: frozenset[Output] | set[Output] = frozenset({"scores"}),
              threshold: float | None = None) -> dict[Output, object]:
        """The one onnxruntime call: uint8 pixels or float32 already normalized, (N, C, H, W) → each
        output asked for (see Output). Scores are cropped to the cells inside the image. Top-k comes
        from the graph's head when it has one (k = its k; only those numbers leave the device), else
        from the scores in numpy (k = K); peaks (at `threshold`) from the graph's peak head, else from
        the scores in numpy (modelcard.reference). Pixels are fed as uint8 to graphs that normalize
        them, else normalized here as the card says."""
        onnx = self.card.onnx
        if self.card.takes_pixels and x.dtype == np.uint8:  # the float `input` is required: an empty one
            feeds = {onnx.pixels: x, onnx.input: np.empty((0, *x.shape[1:]), np.float32)}
        else:  # `pixels`, where the graph has it, is optional and empty unless fed
            feeds = {onnx.input: self.input.normalize(x) if x.dtype == np.uint8 else x}
        head = onnx.classify if "topk" in outputs else None
        peaks = onnx.peaks if "peaks" in outputs else None
        names = [onnx.output] if "scores" in outputs or ("topk" in outputs and not head) or \
            ("peaks" in outputs and not peaks) else []
        if head:
            names += [head.values, head.indices]
        if peaks:
            names += [peaks.cells, peaks.scores]
            feeds[peaks.threshold] = np.array(threshold, np.float32)
        if self.binder and x.shape[1:] == self.window_shape and not peaks:  # peaks: shapes unknown
            n, labels = len(x), len(self.card.labels)
            shapes = {onnx.output: (n, labels, 1, 1)}
            if head:
                shapes[head.values] = shapes[head.indices] = (n, head.k)
            values = self.binder.run(feeds, names, shapes)
        else:
            values = self.session.run(names, feeds)
        got = dict(zip(names, values, strict=True))
        out: dict = {}
        if onnx.output in got:
            d = self.card.dense  # not d.cells(): the same slice as ever for inputs under the window
            h, w = (x.shape[2] - d.window) // d.stride + 1, (x.shape[3] - d.window) // d.stride + 1
            out["scores"] = got[onnx.output][:, :, :h, :w]
        if "topk" in outputs:
            out["topk"] = (got[head.values], got[head.indices]) if head else \
                topk(got[onnx.output][:, :, 0, 0], len(self.card.labels))
        if "peaks" in outputs:
            out["peaks"] = (got[peaks.cells], got[peaks.scores]) if peaks else \
                reference_peaks(out["scores"], self.card.background, threshold)
        if "scores" not in outputs:
            out.pop("scores", None)
        return out

    def describe(self) -> dict:
        return {**self.card.to_dict(), "tag": self.tag, "provider": self.provider,
                "provider_warning": self.provider_warning, "io_binding": self.binder is not None,
                "warmup_ms": self.warmup_ms,
                "warmed_shapes": self.shapes_warmed}


def open_model(tag: str, card: ModelCard, onnx_path: str, settings: Settings) -> Model:
    session, warning = create_session(onnx_path, settings, quiet=card.takes_pixels)
    model = Model(tag, card, session, provider_warning=warning)
    if settings.io_binding == "on" or (settings.io_binding == "auto" and model.provider == CUDA):
        model.binder = Binder(session, "cuda" if model.provider == CUDA else "cpu", settings.cuda_device)
    log.info("loaded %s (%s) on %s with %d intra-op threads", tag, card.arch, model.provider,
             settings.intra_op_threads)
    return model
