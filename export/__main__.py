"""Export a trained classifier as a verified fully-convolutional ONNX model into BentoML's store.

    python -m export --arch lenet5-relu --weights artifacts/lenet5.pt [--int8] [--fp16] [--name lenet5]

Reads the training record beside the weights (`artifacts/lenet5.json`) for labels, data and accuracy.
Writes `<out>/<name>.onnx` (and `<name>-int8.onnx`, `<name>-fp16.onnx`), verifies each with onnxruntime
against PyTorch (export/onnx_export.py), adds the uint8 input head and the classification head to each
(export/heads.py, verified against the model without them) and, for a detector (a `background` label),
the dense peak head (verified against the numpy path), and saves each to the store with its model
card unless --no-store.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import onnx
import onnxruntime
import torch

from export import fp16, heads, quantize
from export.card import CARD_SCHEMA, embed, save_to_store
from export.convolutionalize import convolutionalize
from export.geometry import geometry
from export.onnx_export import deviation_dict, export_onnx, verify
from export.samples import dense_samples, real_pixels, window_samples
from modelcard import DenseGeometry, ModelCard, OnnxGraph
from models import cli
from models.registry import get_arch, list_archs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True, help=f"one of {', '.join(list_archs())}")
    p.add_argument("--weights", type=Path, help="state_dict file (.pt); omit only with --random-init")
    p.add_argument("--random-init", action="store_true", help="export untrained weights (testing)")
    p.add_argument("--record", type=Path, help="training record (default: WEIGHTS with .json)")
    p.add_argument("--labels", type=Path, help="text file, one class name per line (overrides)")
    p.add_argument("--name", help="store name (default: the weights file's stem, else the arch)")
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="where the .onnx files go")
    p.add_argument("--int8", action="store_true", help="also export a static int8 model <name>-int8")
    p.add_argument("--fp16", action="store_true",
                   help="also export an fp16 model <name>-fp16 (for CUDA; fp32 inputs and outputs)")
    p.add_argument("--top-k", type=int, default=heads.DEFAULT_TOP_K,
                   help="scores per image the in-graph classification head returns (default %(default)s)")
    p.add_argument("--no-heads", action="store_true",
                   help="export the plain network: float32 input only, no heads (as before issue 14)")
    p.add_argument("--no-store", action="store_true", help="write files only, skip the model store")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def read_record(args: argparse.Namespace) -> dict:
    path = args.record or (args.weights.with_suffix(".json") if args.weights else None)
    if args.record and not args.record.is_file():
        raise cli.UsageError(f"training record {args.record} does not exist")
    if path and path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise cli.UsageError(f"{path} is not a JSON training record: {e}") from e
    return {}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = get_arch(args.arch)
    if not args.weights and not args.random_init:
        raise cli.UsageError("give --weights FILE (or --random-init to export untrained weights)")
    record = read_record(args)
    if record and record.get("arch") != spec.name:
        raise cli.UsageError(f"the training record says arch {record.get('arch')!r}, not {spec.name!r}")
    labels = record.get("labels") or spec.labels
    if args.labels:
        if not args.labels.is_file():
            raise cli.UsageError(f"labels file {args.labels} does not exist")
        labels = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]
    name = args.name or (args.weights.stem if args.weights else spec.name)

    torch.manual_seed(args.seed)
    model = spec.build(num_classes=len(labels)).eval()
    if args.weights:
        cli.load_weights(model, args.weights)
    window = spec.input.height
    if spec.input.width != window:
        raise cli.UsageError(f"{spec.name}: only square windows are supported")
    started = time.perf_counter()
    fcn = convolutionalize(model, (window, window))
    geo = geometry(fcn, window)
    args.out.mkdir(parents=True, exist_ok=True)
    fp32_path = args.out / f"{name}.onnx"
    opset = max(o.version for o in export_onnx(fcn, spec.input.channels, window, fp32_path).opset_import
                if o.domain in ("", "ai.onnx"))

    data = record.get("data", "")
    noise, real, real_labels, calib = window_samples(spec, data, args.seed)
    dense_inputs = dense_samples(spec, geo, data, args.seed)
    deviation = verify(model, fp32_path, geo, torch.cat([noise, real]), dense_inputs)

    card = ModelCard(
        schema=CARD_SCHEMA,
        name=name,
        version="file",  # replaced by the store version in save_to_store
        arch=spec.name,
        description=spec.description,
        labels=labels,
        input=spec.input,
        dense=DenseGeometry.from_dict({**geo.to_dict(), "deviation": deviation_dict(deviation),
                                       "output_size": "floor((size - window) / stride) + 1 per axis"}),
        onnx=OnnxGraph(input="input", output="scores", layout="NCHW", opset=opset),
        provenance={
            "data": data or "none (untrained or external weights)",
            "held_out_accuracy": record.get("held_out_accuracy", -1.0),
            "train_record": {k: record[k] for k in ("seed", "epochs", "train_seconds", "git_commit",
                                                    "held_out_patch_accuracy") if k in record},
            "weights": str(args.weights) if args.weights else "random init",
            "versions": {"torch": str(torch.__version__), "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "quantization": "none (fp32)",
        },
    )
    outputs = [(name, fp32_path, card)]
    print(f"{name}: stride {geo.stride}, window {geo.window}, receptive field {geo.receptive_field}, "
          f"exact={geo.exact}; dense deviation {deviation.relative_diff:.2e} (relative), argmax "
          f"agreement {deviation.argmax_agreement:.4f} → {fp32_path}")

    held_labels = real_labels.numpy() if real_labels is not None else None
    if args.int8:  # from the plain fp32 network: the quantizer calibrates its float input
        int8_path = args.out / f"{name}-int8.onnx"
        quantize.quantize(fp32_path, int8_path, calib.numpy())
        report = quantize.compare(fp32_path, int8_path, real.numpy(), held_labels)
        outputs.append((f"{name}-int8", int8_path,
                        replace(card, provenance={**card.provenance, "quantization": report})))
        print(f"{name}-int8: top-1 agreement with fp32 {report['top1_agreement']:.4f} → {int8_path}")
    if args.fp16:
        fp16_path = args.out / f"{name}-fp16.onnx"
        fp16.convert(fp32_path, fp16_path)
        report = fp16.compare(fp32_path, fp16_path, real.numpy(), held_labels,
                              [x.numpy() for x in dense_inputs])
        outputs.append((f"{name}-fp16", fp16_path,
                        replace(card, provenance={**card.provenance, "quantization": report})))
        print(f"{name}-fp16: top-1 agreement with fp32 {report['top1_agreement']:.4f}, relative score "
              f"difference {report['relative_diff']:.2e} → {fp16_path}")

    if not args.no_heads:
        window_px, page_px = real_pixels(spec, geo, data, args.seed)
        for i, (out_name, path, out_card) in enumerate(outputs):
            before = path.read_bytes()
            classify = heads.add_heads(path, out_card.input, len(labels), args.top_k)
            checked = heads.verify_heads(before, path, out_card.input, window_px, page_px)
            peaks = None
            if out_card.is_detector:  # a detector: its peaks in the graph too
                peaks = heads.add_dense_head(path, out_card.dense, labels)
                peaks = replace(peaks, verified=heads.verify_dense_head(path, labels, [page_px, window_px]))
            outputs[i] = (out_name, path, heads.with_heads(out_card, classify, checked, peaks))
        print(f"heads: uint8 input and top-{min(args.top_k, len(labels))} in the graph, verified on "
              f"{checked['images']} real images (worst relative difference {checked['pixels_vs_float']:.1e})")
        if card.is_detector:
            print(f"dense head: objectness peaks in the graph, verified: {peaks.verified}")
    for _, path, out_card in outputs:
        embed(path, out_card)

    if not args.no_store:
        for store_name, path, model_card in outputs:
            print(f"saved {save_to_store(store_name, path, model_card)} to the BentoML model store")
    print(f"export took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    cli.run(main)
