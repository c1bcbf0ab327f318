"""Dense scoring of one image, the whole of /score_map's work after decoding: validate the options
against the model's card, run the pyramid (dense.py), and build the answer. Shared by the service and
the batch scorer on Ray (batch/), so both give the same detections for the same page. Errors are
domain errors (service/errors.py)."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from modelcard import ModelCard
from modelcard.reference import softmax
from service.errors import InvalidInput
from service.pipeline import dense, detect, heatmap, options


def uses_peak_head(infer, card: ModelCard, opts: options.ScoreOptions) -> bool:
    """Whether the detections can come from the graph's peak head (export/heads.py): a detector
    exported with it, a caller that can ask for it (Engine.bind), the model's own stride, and no
    output that needs the whole map. Otherwise the maps come back and numpy finds the peaks: the
    same detections (tests/test_dense_heads.py)."""
    return (opts.outputs == {"detections"} and opts.stride_factor == 1 and hasattr(infer, "peaks")
            and card.has_peak_head)


def score_page(infer: Callable[[np.ndarray], np.ndarray], im: Image.Image, card: ModelCard,
               opts: options.ScoreOptions, tile_pixels: int, tile_side: int = 0) -> dict:
    """One image through the dense model (`infer`: pixels → scores, e.g. Engine.bind) → the answer of
    /score_map as a dict: geometry, scales, labels and the outputs `opts` asks for. Detections alone
    come from the graph's peak head where the model has one (uses_peak_head). Large images go in tiles
    of ~tile_pixels, all tile_side a side where that is set (Engine.tile_side): the same answer."""
    labels, name = list(card.labels), card.name
    stride, win = card.dense.stride, card.dense.window
    if stride % opts.stride_factor:
        raise InvalidInput(f"stride_factor={opts.stride_factor} must divide {name}'s "
                           f"stride {stride} (try 1, 2 or 4)", "invalid_parameter")
    unknown = [c for c in [*opts.classes, opts.heatmap_class] if c and c not in labels]
    if unknown:
        raise InvalidInput(f"unknown class {', '.join(unknown)}; {name} has "
                           f"{', '.join(labels)}", "invalid_parameter")
    wanted = {labels.index(c) for c in opts.classes} or card.object_classes
    if uses_peak_head(infer, card, opts):  # only the peak cells come back from the model
        maps = dense.pyramid_peaks(infer.peaks, im, card, opts.scales, tile_pixels, opts.threshold,
                                   opts.invert, tile_side)
    else:
        maps = dense.pyramid(infer, im, card, opts.scales, opts.stride_factor, tile_pixels, opts.invert,
                             tile_side)
    if not maps:
        need = math.ceil(win * min(opts.scales))
        raise InvalidInput(f"image is {im.size[0]}×{im.size[1]}; at scale {min(opts.scales)} "
                           f"{name} needs sides of at least {need} px (window {win})",
                           "image_too_small")
    usable = list(maps)
    scale = min(usable, key=lambda s: abs(math.log(s)))  # map outputs: the scale nearest 1
    m = maps[scale]
    out: dict[str, Any] = {
        "model": name, "version": card.version,
        "image": {"width": im.size[0], "height": im.size[1]},
        "geometry": {"window": win, "stride": m.stride, "offset": m.offset, "scale": scale,
                     "receptive_field": card.dense.receptive_field,
                     "exact": card.dense.exact,
                     "map_height": int(m.shape[0]), "map_width": int(m.shape[1])},
        "scales": usable,
        "labels": labels,
    }
    if "detections" in opts.outputs:
        out["detections"] = detect.detections(maps, labels, opts.threshold, wanted, opts.nms_iou)
    probs = softmax(m.scores) if {"argmax", "heatmap"} & opts.outputs else None
    if "argmax" in opts.outputs:
        best = probs.argmax(0)
        out["argmax"] = best.tolist()
        confidence = np.take_along_axis(probs, best[None], 0)[0].astype(np.float64)
        out["confidence"] = np.round(confidence, 4).tolist()
    if "scores" in opts.outputs:
        raw = np.ascontiguousarray(m.scores, dtype="<f4")
        out["scores"] = {"encoding": "base64", "dtype": "float32", "byte_order": "little",
                         "shape": list(raw.shape), "data": base64.b64encode(raw.tobytes()).decode()}
    if "heatmap" in opts.outputs:
        if opts.heatmap_class:
            prob = probs[labels.index(opts.heatmap_class)]
        else:
            prob = probs[sorted(wanted)].max(0)
        png = heatmap.render(im, prob, m, scale)
        out["heatmap"] = {"encoding": "base64", "media_type": "image/png",
                          "class": opts.heatmap_class or "strongest",
                          "data": base64.b64encode(png).decode()}
    return out
