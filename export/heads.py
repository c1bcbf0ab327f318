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
- dense peak head, detectors only (a `background` label): softmax over the classes of every cell,
  objectness 1 − p(background), its 3×3 peaks at or above an optional `threshold` input → `peak_cells`
  (M, 3) and the raw scores there, `peak_scores` (M, K): /score_map's detections need only these, not
  the (K, h, w) map (service/pipeline/dense.py tiled_peaks). Scores rather than probabilities: numpy's softmax
  of them is bit for bit the numpy path's, so detections tied at a score of 1.0 keep the same order.
  It runs on every dense call, plain score calls too (see above): bench/datapath.py measures it.

The network itself is untouched; its float input and `scores` output mean what they meant.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelcard import BACKGROUND, ClassifyHead, DenseGeometry, InputSpec, ModelCard, PeaksHead
from modelcard.card import Heads
from modelcard.reference import reference_peaks, softmax

INPUT, OUTPUT = "input", "scores"  # export/onnx_export.py's names (not imported: it needs torch, this
PIXELS = "pixels"                   # module does not, so that bench/datapath.py runs without it)
PROBS, TOPK_VALUES, TOPK_INDICES = "probs", "topk_values", "topk_indices"
DEFAULT_TOP_K = 20  # the server's default CONVSERVE_MAX_TOP_K; larger asks fall back to the full scores


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def add_heads(path: Path, input_spec: InputSpec, num_labels: int, top_k: int = DEFAULT_TOP_K) -> ClassifyHead:
    """Rewrite the ONNX file at `path` with both heads (uint8 `pixels` in, top-k out); return the
    classify head for the card (with_heads)."""
    model = onnx.load(str(path))
    graph = model.graph
    if any(i.name == PIXELS for i in graph.input):
        raise ValueError(f"{path} already has the heads")
    (float_input,) = [i for i in graph.input if i.name == INPUT]
    channels = input_spec.channels
    k = min(top_k, num_labels)
    dims = [d.dim_param or d.dim_value for d in float_input.type.tensor_type.shape.dim]

    joined = "head_x"  # what the network now reads instead of `input`
    for node in graph.node:
        node.input[:] = [joined if name == INPUT else name for name in node.input]
    per_channel = (channels, 1, 1)
    graph.initializer.extend([
        _const("head_scale", np.float32(input_spec.scale)),
        _const("head_mean", np.asarray(input_spec.mean, np.float32).reshape(per_channel)),
        _const("head_std", np.asarray(input_spec.std, np.float32).reshape(per_channel)),
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
    window = (0, channels, input_spec.height, input_spec.width)
    graph.initializer.append(_const(PIXELS, np.zeros(window, np.uint8)))  # the default: no pixels
    n = dims[0]
    graph.output.extend([
        helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, [n, num_labels]),
        helper.make_tensor_value_info(TOPK_VALUES, TensorProto.FLOAT, [n, k]),
        helper.make_tensor_value_info(TOPK_INDICES, TensorProto.INT64, [n, k]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return ClassifyHead(probs=PROBS, values=TOPK_VALUES, indices=TOPK_INDICES, k=k, of="first cell")


def with_heads(card: ModelCard, classify: ClassifyHead, verified: dict,
               peaks: PeaksHead | None = None) -> ModelCard:
    """The card of the graph add_heads (and add_dense_head) rewrote: uint8 pixels in, the heads out."""
    return replace(card, input=replace(card.input, dtype="uint8", layout="NCHW"),
                   onnx=replace(card.onnx, pixels=PIXELS,
                                heads=Heads(classify=classify, verified=verified, peaks=peaks)))


def verify_heads(before: bytes, after: Path, spec: InputSpec, window: np.ndarray, page: np.ndarray) -> dict:
    """The model with heads (`after`) against the same model without (`before`, ONNX bytes), on real
    uint8 images: scores from pixels equal scores from the numpy-normalized floats, the float input
    still works, and probs/top-k equal softmax and a sort of the first cell's scores. Raises
    VerificationError; returns the worst differences for the card."""
    from export.onnx_export import VerificationError, relative_diff, session

    plain, headed = session(before), session(after)
    worst = {"pixels_vs_float": 0.0, "float_input": 0.0, "probs": 0.0}
    for pixels in (window, page):
        x = spec.normalize(pixels)  # the service's numpy normalization: the reference
        ref = plain.run([OUTPUT], {INPUT: x})[0]
        got = headed.run([OUTPUT], {PIXELS: pixels, INPUT: x[:0]})[0]
        again = headed.run([OUTPUT], {INPUT: x})[0]  # as before the heads: `pixels` left out
        worst["pixels_vs_float"] = max(worst["pixels_vs_float"], relative_diff(got, ref))
        worst["float_input"] = max(worst["float_input"], relative_diff(again, ref))
    x = spec.normalize(window)
    probs, values, indices = headed.run([PROBS, TOPK_VALUES, TOPK_INDICES], {PIXELS: window, INPUT: x[:0]})
    ref_probs = softmax(plain.run([OUTPUT], {INPUT: x})[0][:, :, 0, 0], axis=1)
    worst["probs"] = float(np.abs(probs - ref_probs).max())
    expected = -np.sort(-ref_probs, axis=1)[:, : values.shape[1]]
    picked = np.take_along_axis(ref_probs, indices, 1)
    if worst["pixels_vs_float"] > 1e-5 or worst["float_input"] > 1e-6 or worst["probs"] > 1e-5:
        raise VerificationError(f"the heads change the model's answers: {worst}")
    if np.abs(values - expected).max() > 1e-5 or np.abs(picked - values).max() > 1e-5:
        raise VerificationError("TopK in the graph disagrees with sorting the softmax")
    return {name: float(f"{v:.3g}") for name, v in worst.items()} | {"images": int(len(window) + len(page))}


PEAK_CELLS, PEAK_SCORES, THRESHOLD = "peak_cells", "peak_scores", "threshold"
DEFAULT_THRESHOLD = 0.8  # /score_map's default (service/options.py); the caller feeds its own


def add_dense_head(path: Path, dense: DenseGeometry, labels: list[str],
                   threshold: float = DEFAULT_THRESHOLD) -> PeaksHead:
    """Rewrite the ONNX file at `path` (already with add_heads' `head_x`) with the dense peak head of a
    detector (a `background` label): softmax over the classes, objectness 1 − p(background), its 3×3
    peaks at or above `threshold` (an optional scalar input) → `peak_cells` (M, 3) int64 (n, y, x) and
    their raw scores `peak_scores` (M, K): modelcard.reference's numpy path in the graph. The scores are
    first cropped to the cells inside the image (Model.infer crops the same way), so that no cell
    outside takes part in a neighbourhood. Returns the peak head for the card (with_heads)."""
    model = onnx.load(str(path))
    graph = model.graph
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    bg = labels.index(BACKGROUND)
    graph.initializer.extend([
        _const("peak_hw_start", np.array([2], np.int64)),
        _const("peak_hw_end", np.array([4], np.int64)),
        _const("peak_window", np.int64(dense.window)),
        _const("peak_stride", np.int64(dense.stride)),
        _const("peak_one_i", np.int64(1)),
        _const("peak_zeros", np.zeros(2, np.int64)),
        _const("peak_axes", np.array([2, 3], np.int64)),
        _const("peak_bg", np.array([bg], np.int64)),
        _const("peak_classes", np.array([1], np.int64)),
        _const("peak_one", np.float32(1)),
        _const("peak_nyx", np.array([0, 2, 3], np.int64)),
        _const(THRESHOLD, np.float32(threshold)),
    ])
    node = helper.make_node
    head = [  # cells per axis: (size − window) // stride + 1, from the joined input's shape
        node("Shape", ["head_x"], ["peak_shape"]),
        node("Slice", ["peak_shape", "peak_hw_start", "peak_hw_end"], ["peak_size"]),
        node("Sub", ["peak_size", "peak_window"], ["peak_span"]),
        node("Div", ["peak_span", "peak_stride"], ["peak_steps"]),  # integer division: floor (span ≥ 0)
        node("Add", ["peak_steps", "peak_one_i"], ["peak_hw"]),
        node("Slice", [OUTPUT, "peak_zeros", "peak_hw", "peak_axes"], ["peak_map"]),
        # p(background) as numpy's softmax computes it, spelled out: ONNX Softmax over axis 1 of NCHW
        # transposes twice and computes every class's p (measured: +9 % on a 2048² page, vs +2 %)
        _reduce("ReduceMax", "peak_map", "peak_max", opset),
        node("Sub", ["peak_map", "peak_max"], ["peak_shifted"]),
        node("Exp", ["peak_shifted"], ["peak_exp"]),
        _reduce("ReduceSum", "peak_exp", "peak_sum", opset),
        node("Gather", ["peak_exp", "peak_bg"], ["peak_bg_exp"], axis=1),
        node("Div", ["peak_bg_exp", "peak_sum"], ["peak_background"]),
        node("Sub", ["peak_one", "peak_background"], ["peak_objectness"]),
        # padding never wins a max, as local_peaks' −inf padding
        node("MaxPool", ["peak_objectness"], ["peak_pooled"], kernel_shape=[3, 3], strides=[1, 1],
             pads=[1, 1, 1, 1]),
        node("GreaterOrEqual", ["peak_objectness", "peak_pooled"], ["peak_is_max"]),
        node("GreaterOrEqual", ["peak_objectness", THRESHOLD], ["peak_strong"]),
        node("And", ["peak_is_max", "peak_strong"], ["peak_mask"]),
        node("NonZero", ["peak_mask"], ["peak_where"]),  # (4, M): n, 0, y, x
        node("Transpose", ["peak_where"], ["peak_rows"], perm=[1, 0]),
        node("Gather", ["peak_rows", "peak_nyx"], [PEAK_CELLS], axis=1),
        node("Transpose", ["peak_map"], ["peak_last"], perm=[0, 2, 3, 1]),
        node("GatherND", ["peak_last", PEAK_CELLS], [PEAK_SCORES]),
    ]
    graph.node.extend(head)
    graph.input.append(helper.make_tensor_value_info(THRESHOLD, TensorProto.FLOAT, []))
    graph.output.extend([
        helper.make_tensor_value_info(PEAK_CELLS, TensorProto.INT64, ["peaks", 3]),
        helper.make_tensor_value_info(PEAK_SCORES, TensorProto.FLOAT, ["peaks", len(labels)]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return PeaksHead(cells=PEAK_CELLS, scores=PEAK_SCORES, threshold=THRESHOLD, of="objectness 3x3 peaks")


def _reduce(op: str, x: str, out: str, opset: int) -> onnx.NodeProto:
    """`op` over the class axis, kept: axes an input from opset 18 (ReduceSum: 13), an attribute before."""
    if opset >= (13 if op == "ReduceSum" else 18):
        return helper.make_node(op, [x, "peak_classes"], [out], keepdims=1)
    return helper.make_node(op, [x], [out], axes=[1], keepdims=1)


TIE = 1e-6  # objectness this close to a neighbour's or the threshold: float rounding decides


def _near_tie(objectness: np.ndarray, y: int, x: int, threshold: float) -> bool:
    """Whether the peak test of cell (y, x) is decided by float rounding: the graph's softmax and
    numpy's differ in the last bits, so a cell within TIE of its strongest neighbour (or of the
    threshold) may be a peak in one and not in the other (seen on background, where objectness is
    ~1e-7 everywhere)."""
    around = objectness[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].copy()
    around[min(y, 1), min(x, 1)] = -np.inf  # the cell itself
    o = objectness[y, x]
    return bool(abs(o - around.max()) <= TIE or abs(o - threshold) <= TIE)


def verify_dense_head(path: Path, labels: list[str], batches: list[np.ndarray]) -> dict:
    """The peak head against the numpy path on the model's own scores for real images (uint8 batches
    (N, C, H, W): a page, and window-size images whose one cell is its own peak), at a few thresholds:
    the same cells, except near-ties (_near_tie), and the same scores there (bits). Raises
    VerificationError; returns how many peaks were checked and how many near-ties went the other way."""
    from export.onnx_export import VerificationError, session
    sess, bg = session(path), labels.index(BACKGROUND)
    peaks, ties = 0, 0
    for threshold in (0.0, 0.5, DEFAULT_THRESHOLD):
        for batch in batches:
            feeds = {PIXELS: batch, INPUT: np.empty((0, *batch.shape[1:]), np.float32),
                     THRESHOLD: np.array(threshold, np.float32)}
            scores, cells, at_cells = sess.run([OUTPUT, PEAK_CELLS, PEAK_SCORES], feeds)
            ref_cells, _ = reference_peaks(scores, bg, threshold)  # the service's numpy path
            got = {tuple(c) for c in cells}
            objectness = 1.0 - softmax(scores, axis=1)[:, bg]
            for n, y, x in got ^ {tuple(c) for c in ref_cells}:
                if not _near_tie(objectness[n], y, x, threshold):
                    raise VerificationError(f"the peak head finds other peaks than numpy at threshold "
                                            f"{threshold}: cell {(n, y, x)}")
                ties += 1
            n, y, x = cells.T
            if not np.array_equal(at_cells, scores[n, :, y, x]):
                raise VerificationError("the peak head's scores are not the map's at its cells")
            peaks += len(cells)
    return {"peaks": peaks, "near_ties": ties, "images": sum(map(len, batches))}
