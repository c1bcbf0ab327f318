"""fp16 export, for CUDA: weights and activations in half precision, inputs and outputs still float32
(the service and its clients see no difference), with onnxruntime's own converter
(onnxruntime.transformers.float16; the same code as onnxconverter-common's, and no new dependency).

Why only an option: on an H100 it gave 15.7k vs 13.7k img/s for AlexNet batch 64 (field notes), little,
because onnxruntime's CUDA provider already runs fp32 convolutions and GEMMs in TF32 (10-bit mantissa,
like fp16's) unless told not to (CONVSERVE_CUDA_TF32=false). On a CPU it runs, but is no faster. How far
it strays from fp32 is measured on real images and written into its card, as int8's is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from export.heads import INPUT, OUTPUT

METHOD = "fp16 weights and activations, fp32 inputs and outputs (onnxruntime.transformers.float16)"


def convert(fp32_path: Path, fp16_path: Path) -> None:
    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    _sort_nodes(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(fp16_path))


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """The converter appends its input casts after the nodes that read them; onnxruntime does not mind,
    the ONNX checker (and export/heads.py's rewrite) do. Stable topological order."""
    known = {"", *(i.name for i in graph.input), *(t.name for t in graph.initializer)}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in known for name in n.input)]
        if not ready:
            raise ValueError("the fp16 graph has a cycle or an input nothing produces")
        for node in ready:
            ordered.append(node)
            known.update(node.output)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    del graph.node[:]
    graph.node.extend(ordered)


def _scores(path: Path, images: np.ndarray) -> np.ndarray:
    from export.onnx_export import session  # torch, only for the export's checks

    sess = session(path)
    return np.concatenate([sess.run([OUTPUT], {INPUT: images[i : i + 256]})[0]
                           for i in range(0, len(images), 256)])


def compare(fp32_path: Path, fp16_path: Path, images: np.ndarray, labels: np.ndarray | None,
            dense: list[np.ndarray]) -> dict:
    """fp16 vs fp32 on normalized real window-size images (top-1 agreement, accuracy when labels
    exist, worst relative score difference) and on larger images (the dense map's worst relative
    difference and argmax agreement per cell)."""
    from export.onnx_export import relative_diff
    a, b = _scores(fp32_path, images), _scores(fp16_path, images)
    top_a, top_b = a.reshape(len(a), -1).argmax(1), b.reshape(len(b), -1).argmax(1)
    out = {"method": METHOD, "images": int(len(images)),
           "top1_agreement": round(float((top_a == top_b).mean()), 5),
           "relative_diff": float(f"{relative_diff(b, a):.3g}")}
    if labels is not None:
        out["fp32_accuracy"] = round(float((top_a == labels).mean()), 5)
        out["fp16_accuracy"] = round(float((top_b == labels).mean()), 5)
    pairs = [(_scores(fp32_path, x), _scores(fp16_path, x)) for x in dense]
    out["dense_relative_diff"] = float(f"{max(relative_diff(y, x) for x, y in pairs):.3g}")
    agree = sum(int((x.argmax(1) == y.argmax(1)).sum()) for x, y in pairs)
    out["dense_argmax_agreement"] = round(agree / sum(x[:, 0].size for x, _ in pairs), 5)
    return out
