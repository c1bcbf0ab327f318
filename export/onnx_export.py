"""ONNX export with dynamic batch/height/width, and the verification that runs on every export.

Verification, with onnxruntime (what the service runs):
(a) at the window size, the ONNX logits equal the original PyTorch classifier's;
(b) on an image larger than the window, every score-map cell equals the original classifier run on
    that cell's crop. For padding-free nets this must hold to 1e-4 (relative to the largest logit);
    for padded nets the deviation is measured and returned for the model card.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim

from export.geometry import Geometry

INPUT, OUTPUT = "input", "scores"
TOLERANCE = 1e-4  # relative max abs diff allowed where the maths says "equal"

# The dynamo exporter logs one warning per torchvision op it cannot register; we use none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class VerificationError(RuntimeError):
    """The exported model does not compute what the PyTorch model computes."""


def export_onnx(fcn: nn.Sequential, channels: int, window: int, path: Path) -> onnx.ModelProto:
    """Write `fcn` to one self-contained ONNX file with dynamic N, H ≥ window and W ≥ window."""
    example = (torch.zeros(1, channels, window, window),)
    dims = {0: Dim("N"), 2: Dim("H", min=window), 3: Dim("W", min=window)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export-internal deprecation chatter
        program = torch.onnx.export(fcn, example, dynamo=True, external_data=False,
                                    input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=(dims,), verbose=False)
    program.save(str(path), external_data=False)
    return onnx.load(str(path))


def session(model: Path | str | bytes) -> ort.InferenceSession:
    """A CPU session on a file or on ONNX bytes."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # not the optional `pixels` input's warning on every load (heads.py)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


@dataclass
class Deviation:
    """Dense score map vs the classifier on each cell's crop."""

    image_size: list[int]
    cells: int
    max_abs_diff: float
    relative_diff: float  # max abs diff / max |crop logit|
    argmax_agreement: float


@torch.no_grad()
def crops_logits(model: nn.Module, x: torch.Tensor, geo: Geometry) -> np.ndarray:
    """The original classifier on every cell's crop: (N, K, h, w), h/w from the geometry rule."""
    n, _, height, width = x.shape
    h, w = geo.map_size(height), geo.map_size(width)
    s, win, o = geo.stride, geo.window, geo.offset
    crops = torch.stack([x[:, :, o + i * s : o + i * s + win, o + j * s : o + j * s + win]
                         for i in range(h) for j in range(w)], 1)  # (N, h·w, C, win, win)
    logits = torch.cat([model(c) for c in crops.flatten(0, 1).split(64)])  # (N·h·w, K)
    return logits.view(n, h, w, -1).permute(0, 3, 1, 2).numpy()


def dense_map(sess: ort.InferenceSession, x: np.ndarray, geo: Geometry) -> np.ndarray:
    """Run the ONNX model and keep the cells whose window lies inside the image. (Padded nets can
    emit one more cell that overhangs the border: AlexNet does when (size − 224) % 32 == 31.)"""
    scores = sess.run([OUTPUT], {INPUT: x})[0]
    return scores[:, :, : geo.map_size(x.shape[2]), : geo.map_size(x.shape[3])]


def verify(model: nn.Module, onnx_path: Path, geo: Geometry, window_inputs: torch.Tensor,
           dense_inputs: list[torch.Tensor]) -> Deviation:
    """Check (a) and (b) of the module docstring; raise VerificationError where they must hold."""
    model = model.eval()
    sess = session(onnx_path)
    with torch.no_grad():
        expected = model(window_inputs).numpy()
    got = sess.run([OUTPUT], {INPUT: window_inputs.numpy()})[0]
    if got.shape != (*expected.shape, 1, 1):
        raise VerificationError(f"window-size output {got.shape}, expected {(*expected.shape, 1, 1)}")
    diff = relative_diff(got[:, :, 0, 0], expected)
    if diff > TOLERANCE:
        raise VerificationError(f"at the window size ONNX differs from PyTorch by {diff:.2e} (relative)")

    worst = None
    agree = cells = 0
    for x in dense_inputs:
        onnx_map, crop_map = dense_map(sess, x.numpy(), geo), crops_logits(model, x, geo)
        if onnx_map.shape != crop_map.shape:
            raise VerificationError(f"score map {onnx_map.shape} != per-crop map {crop_map.shape}")
        dev = Deviation(list(x.shape[2:]), int(np.prod(crop_map.shape[2:]) * len(x)),
                        float(np.abs(onnx_map - crop_map).max()), relative_diff(onnx_map, crop_map), 0)
        agree += int((onnx_map.argmax(1) == crop_map.argmax(1)).sum())
        cells += dev.cells
        worst = dev if worst is None or dev.relative_diff > worst.relative_diff else worst
    assert worst is not None, "verify needs at least one dense input"
    worst.argmax_agreement = round(agree / cells, 5)
    worst.cells = cells
    if geo.exact and worst.relative_diff > TOLERANCE:
        raise VerificationError(
            f"padding-free net, but a score-map cell differs from its crop by {worst.relative_diff:.2e}")
    return worst


def deviation_dict(dev: Deviation) -> dict:
    d = asdict(dev)
    d["max_abs_diff"] = float(f"{d['max_abs_diff']:.3g}")
    d["relative_diff"] = float(f"{d['relative_diff']:.3g}")
    return d
