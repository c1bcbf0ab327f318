"""In-process onnxruntime measurements (no HTTP): dense one pass vs every window as a crop, throughput
per batch size, and int8 vs fp32 (speed and agreement). Sessions get the service's exact options
(service.engine.provider.session_options), so "in-process" means "what the service's model call can do".

Timing: each figure is the best of several runs of at least `min_s` seconds (the minimum is the least
noisy estimator on a shared machine); ratios compare figures taken one right after the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper, shape_inference

from modelcard import ModelCard
from service.engine import provider
from service.settings import Settings


def session(path: str, threads: int) -> ort.InferenceSession:
    options = provider.session_options(Settings(threads=threads, workers=1))
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def best_seconds(fn: Callable[[], object], min_s: float = 0.3, rounds: int = 3) -> float:
    """Best (smallest) mean time per call over `rounds` rounds of at least `min_s` seconds each."""
    fn()  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_s or calls == 0:
            fn()
            calls += 1
        best = min(best, elapsed / calls)
    return best


def conv_macs(path: str, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates in every Conv of the ONNX model for one input of `shape` (N, C, H, W)."""
    model = onnx.load(path)
    # The float input gets `shape`; an empty uint8 `pixels` input beside it (export/heads.py: the two
    # are concatenated on the batch axis) gets (0, C, H, W), or shapes after the Concat stay unknown.
    # Its default value (an initializer of the window's size) goes, for the same reason.
    first = model.graph.input[0].name
    for graph_input in model.graph.input:
        sizes = shape if graph_input.name == first else (0, *shape[1:])
        for dim, size in zip(graph_input.type.tensor_type.shape.dim, sizes, strict=True):
            dim.ClearField("dim_param")
            dim.dim_value = size
    defaults = [w for w in model.graph.initializer
                if w.name != first and w.name in {i.name for i in model.graph.input}]
    for w in defaults:
        model.graph.initializer.remove(w)
    del model.graph.value_info[:]  # the exporter's symbolic shapes; re-infer them for this size
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.output]}
    weights = {w.name: numpy_helper.to_array(w).shape for w in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            _, cin_per_group, kh, kw = weights[node.input[1]]
            total += int(np.prod(shapes[node.output[0]])) * cin_per_group * kh * kw
    return total


def windows(image: np.ndarray, window: int, stride: int) -> np.ndarray:
    """(C, H, W) → every window at the stride as a crop: (n, C, window, window)."""
    view = np.lib.stride_tricks.sliding_window_view(image, (window, window), axis=(1, 2))
    view = view[:, ::stride, ::stride]  # (C, h, w, window, window)
    return np.ascontiguousarray(view.transpose(1, 2, 0, 3, 4).reshape(-1, image.shape[0], window, window))


def dense_vs_windows(path: str, card: ModelCard, image: np.ndarray, threads: int, batch: int = 64) -> dict:
    """One fully-convolutional pass over `image` (C, H, W) vs scoring each of its windows as a crop,
    batched `batch` at a time. Both give the same scores for an exact (padding-free) net."""
    sess, name = session(path, threads), card.onnx.input
    win, stride = card.dense.window, card.dense.stride
    crops = windows(image, win, stride)
    one = best_seconds(lambda: sess.run(None, {name: image[None]}))
    each = best_seconds(lambda: [sess.run(None, {name: crops[i:i + batch]})
                                 for i in range(0, len(crops), batch)], rounds=2)
    flops_windows = conv_macs(path, (1, *crops.shape[1:])) * len(crops)
    return {"model": card.name, "image": list(image.shape[1:]), "windows": len(crops),
            "one_pass_ms": round(one * 1e3, 2), "windows_ms": round(each * 1e3, 1),
            "speedup": round(each / one, 1),
            "flop_ratio": round(flops_windows / conv_macs(path, (1, *image.shape)), 1)}


def throughput_by_batch(path: str, shape: tuple[int, int, int], threads: int,
                        batches: tuple[int, ...] = (1, 4, 8, 16, 32, 64)) -> dict:
    """Images/s of one session at each batch size (random inputs: conv cost does not depend on values)."""
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    per_batch = {}
    for n in batches:
        x = rng.standard_normal((n, *shape), dtype=np.float32)
        per_batch[n] = round(n / best_seconds(lambda x=x: sess.run(None, {name: x})), 1)
    best = max(per_batch, key=per_batch.get)
    return {"threads": threads, "images_per_s": per_batch, "best_batch": best,
            "best_images_per_s": per_batch[best]}


def agreement(fp32_path: str, int8_path: str, images: np.ndarray, labels: np.ndarray | None,
              threads: int) -> dict:
    """int8 vs fp32 on normalized images (N, C, H, W): top-1 agreement, accuracy when labels exist,
    and how far the scores moved (relative L2 error): meaningful even for untrained weights."""
    outs = []
    for path in (fp32_path, int8_path):
        sess = session(path, threads)
        name = sess.get_inputs()[0].name
        outs.append(np.concatenate([sess.run(None, {name: images[i:i + 64]})[0]
                                    for i in range(0, len(images), 64)]).reshape(len(images), -1))
    fp32, int8 = outs
    agree = float((fp32.argmax(1) == int8.argmax(1)).mean())
    out = {"images": len(images), "top1_agreement": round(agree, 4),
           "relative_score_error": round(float(np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32)), 4)}
    if labels is not None:
        out["fp32_accuracy"] = round(float((fp32.argmax(1) == labels).mean()), 4)
        out["int8_accuracy"] = round(float((int8.argmax(1) == labels).mean()), 4)
    return out
