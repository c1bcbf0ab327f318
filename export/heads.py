"""Heads added around the exported network, so that less crosses between host and device (issue 14):

- input head: a second graph input `pixels`, uint8 (N, C, H, W), normalized inside the graph with the
  card's scale/mean/std (Cast → Mul → Sub → Div, the service's numpy order, so the scores are the same
  bits). A quarter of float32's bytes go to the device and Python does no per-pixel work. The float32
  input `input` stays as it was, already normalized (the Open Inference Protocol's FP32 input, the
  benchmarks, any ONNX consumer feed it alone): `pixels` is optional, an initializer that is also a graph
  input, empty (0, C, win, win) unless fed. The two are concatenated on the batch axis, so a caller of
  the pixel path feeds `pixels` and an empty (0, C, H, W) `input`. (onnxruntime logs one warning per
  session about that initializer: it only means `pixels` is not constant-folded, which it never could
  be.)
- classification head: softmax over the classes and ONNX TopK of the first score-map cell, the only one
  at the window size (`probs` (N, K), `topk_values`, `topk_indices` (N, k)): only k scores per image
  need leave the device. On the first cell only: onnxruntime computes every node on every call whatever
  outputs are asked for (measured), so a head over a whole dense map would cost every dense call.

The network itself is untouched; its float input and `scores` output mean what they meant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT, OUTPUT = "input", "scores"  # export/onnx_export.py's names (not imported: it needs torch, this
PIXELS = "pixels"                   # module does not, so that bench/datapath.py runs without it)
PROBS, TOPK_VALUES, TOPK_INDICES = "probs", "topk_values", "topk_indices"
DEFAULT_TOP_K = 20  # the server's default CONVSERVE_MAX_TOP_K; larger asks fall back to the full scores


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def add_heads(path: Path, input_spec: dict, num_labels: int, top_k: int = DEFAULT_TOP_K) -> dict:
    """Rewrite the ONNX file at `path` with both heads; return what the card gains (merged into its
    `input` and `onnx` sections by the caller)."""
    model = onnx.load(str(path))
    graph = model.graph
    if any(i.name == PIXELS for i in graph.input):
        raise ValueError(f"{path} already has the heads")
    (float_input,) = [i for i in graph.input if i.name == INPUT]
    channels = int(input_spec["channels"])
    k = min(top_k, num_labels)
    dims = [d.dim_param or d.dim_value for d in float_input.type.tensor_type.shape.dim]

    joined = "head_x"  # what the network now reads instead of `input`
    for node in graph.node:
        node.input[:] = [joined if name == INPUT else name for name in node.input]
    per_channel = (channels, 1, 1)
    graph.initializer.extend([
        _const("head_scale", np.float32(input_spec["scale"])),
        _const("head_mean", np.asarray(input_spec["mean"], np.float32).reshape(per_channel)),
        _const("head_std", np.asarray(input_spec["std"], np.float32).reshape(per_channel)),
        _const("head_cell_start", np.zeros(2, np.int64)),
        _const("head_cell_end", np.ones(2, np.int64)),
        _const("head_cell_axes", np.array([2, 3], np.int64)),
        _const("head_k", np.array([k], np.int64)),
    ])
    pixel_head = [
        helper.make_node("Cast", [PIXELS], ["head_pixels_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["head_pixels_f", "head_scale"], ["head_scaled"]),
        helper.make_node("Sub", ["head_scaled", "head_mean"], ["head_centred"]),
        helper.make_node("Div", ["head_centred", "head_std"], ["head_normalized"]),
        helper.make_node("Concat", ["head_normalized", INPUT], [joined], axis=0),
    ]
    class_head = [
        helper.make_node("Slice", [OUTPUT, "head_cell_start", "head_cell_end", "head_cell_axes"],
                         ["head_cell"]),
        helper.make_node("Flatten", ["head_cell"], ["head_logits"], axis=1),
        helper.make_node("Softmax", ["head_logits"], [PROBS], axis=1),
        helper.make_node("TopK", [PROBS, "head_k"], [TOPK_VALUES, TOPK_INDICES], axis=1, largest=1,
                         sorted=1),
    ]
    nodes = [*pixel_head, *graph.node, *class_head]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, dims))
    window = (0, channels, int(input_spec["height"]), int(input_spec["width"]))
    graph.initializer.append(_const(PIXELS, np.zeros(window, np.uint8)))  # the default: no pixels
    n = dims[0]
    graph.output.extend([
        helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, [n, num_labels]),
        helper.make_tensor_value_info(TOPK_VALUES, TensorProto.FLOAT, [n, k]),
        helper.make_tensor_value_info(TOPK_INDICES, TensorProto.INT64, [n, k]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"input": {"dtype": "uint8", "layout": "NCHW"},
            "onnx": {"pixels": PIXELS,
                     "heads": {"classify": {"probs": PROBS, "values": TOPK_VALUES,
                                            "indices": TOPK_INDICES, "k": k, "of": "first cell"}}}}


def merge_card(card: dict, added: dict) -> dict:
    """The card with add_heads' additions in their sections."""
    return {**card, "input": {**card["input"], **added["input"]}, "onnx": {**card["onnx"], **added["onnx"]}}


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _normalize(pixels: np.ndarray, spec: dict) -> np.ndarray:
    """The service's numpy normalization (service/card.py), the reference the pixel head must equal."""
    shape = (-1, 1, 1)
    x = np.multiply(pixels, np.float32(spec["scale"]), dtype=np.float32)
    np.subtract(x, np.asarray(spec["mean"], np.float32).reshape(shape), out=x)
    np.divide(x, np.asarray(spec["std"], np.float32).reshape(shape), out=x)
    return x


def verify_heads(before: bytes, after: Path, spec: dict, window: np.ndarray, page: np.ndarray) -> dict:
    """The model with heads (`after`) against the same model without (`before`, ONNX bytes), on real
    uint8 images: scores from pixels equal scores from the numpy-normalized floats, the float input
    still works, and probs/top-k equal softmax and a sort of the first cell's scores. Raises
    VerificationError; returns the worst differences for the card."""
    from export.onnx_export import VerificationError, relative_diff, session

    plain, headed = session(before), session(after)
    worst = {"pixels_vs_float": 0.0, "float_input": 0.0, "probs": 0.0}
    for pixels in (window, page):
        x = _normalize(pixels, spec)
        ref = plain.run([OUTPUT], {INPUT: x})[0]
        got = headed.run([OUTPUT], {PIXELS: pixels, INPUT: x[:0]})[0]
        again = headed.run([OUTPUT], {INPUT: x})[0]  # as before the heads: `pixels` left out
        worst["pixels_vs_float"] = max(worst["pixels_vs_float"], relative_diff(got, ref))
        worst["float_input"] = max(worst["float_input"], relative_diff(again, ref))
    x = _normalize(window, spec)
    probs, values, indices = headed.run([PROBS, TOPK_VALUES, TOPK_INDICES], {PIXELS: window, INPUT: x[:0]})
    ref_probs = softmax(plain.run([OUTPUT], {INPUT: x})[0][:, :, 0, 0])
    worst["probs"] = float(np.abs(probs - ref_probs).max())
    expected = -np.sort(-ref_probs, axis=1)[:, : values.shape[1]]
    picked = np.take_along_axis(ref_probs, indices, 1)
    if worst["pixels_vs_float"] > 1e-5 or worst["float_input"] > 1e-6 or worst["probs"] > 1e-5:
        raise VerificationError(f"the heads change the model's answers: {worst}")
    if np.abs(values - expected).max() > 1e-5 or np.abs(picked - values).max() > 1e-5:
        raise VerificationError("TopK in the graph disagrees with sorting the softmax")
    return {name: float(f"{v:.3g}") for name, v in worst.items()} | {"images": int(len(window) + len(page))}
