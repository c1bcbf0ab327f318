"""ModelCard: the card export/ writes beside each ONNX file (BentoML metadata, and the ONNX file's
`metadata_props` under `model_card`), as frozen dataclasses.

Each section keeps its keys in the order export writes them; a key that a card lacks (older cards
have no heads; tests build small cards) stays absent in to_dict, so from_dict(d).to_dict() == d, in
order too (tests/test_modelcard.py round-trips every card in bentomodels/). Free-form reports
(verification results, provenance) stay plain dicts: nothing computes with them.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ClassVar

import numpy as np

from modelcard import reference

BACKGROUND = "background"  # the label a detector gives to "no object here"
SCHEMA = 1


class _Section:
    """from_dict/to_dict for a dataclass whose fields are its keys, in order. Fields without a default
    are required; optional ones are None when the card lacks them, and left out again by to_dict."""

    NESTED: ClassVar[dict[str, type]] = {}  # key → section class of a nested dict

    @classmethod
    def from_dict(cls, d: Any, where: str = "card"):
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be an object, not {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; known: {names}")
        missing = [f.name for f in fields(cls) if _required(f) and f.name not in d]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        values = {}
        for key, value in d.items():
            section = cls.NESTED.get(key)
            values[key] = section.from_dict(value, f"{where}.{key}") if section and value is not None \
                else value
        return cls(**values)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = value.to_dict() if isinstance(value, _Section) else _plain(value)
        return out


def _required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _plain(value):
    """Tuples back to JSON lists."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class InputSpec(_Section):
    """How a picture becomes the network's input: PIL mode, the window the classifier was trained on,
    then x = (pixel·scale − mean) / std per channel."""

    mode: str  # PIL mode the pixels are converted to: "L" or "RGB"
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    channels: int
    dtype: str | None = None  # "uint8" where the graph takes pixels (export/heads.py)
    layout: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) → float32 (N, C, H, W), as training did (reference.normalize)."""
        return reference.normalize(pixels, self.scale, self.mean, self.std)


@dataclass(frozen=True)
class DenseGeometry(_Section):
    """Where each score-map cell looks: cell (i, j) scores the window of side `window` whose top-left
    input pixel is (offset + i·stride, offset + j·stride)."""

    window: int
    stride: int
    offset: int
    receptive_field: int
    receptive_field_offset: int | None = None  # absent: 0
    padded: bool | None = None
    exact: bool | None = None
    deviation: dict | None = None  # export's measurement of dense cells vs crops
    output_size: str | None = None  # the formula, for people reading the card

    def cells(self, size: int, stride: int | None = None) -> int:
        """Score-map cells along an axis of `size` pixels (at `stride`, default the model's)."""
        return 0 if size < self.window else (size - self.window) // (stride or self.stride) + 1

    @property
    def context_margin(self) -> int:
        """Pixels of context a tile needs beyond its cells' windows so they see what they see in one
        pass: what the receptive field reaches past the window (into the net's padding), in whole
        strides; 0 for padding-free nets."""
        start = self.receptive_field_offset or 0
        reach = max(-start, start + self.receptive_field - self.window, 0)
        return math.ceil(reach / self.stride) * self.stride

    def fixed_tile_side(self, max_pixels: int) -> int:
        """The side of one-shape tiles (pipeline/dense.py tiles()) of about max_pixels; 0 where the net
        has padding: a tile moved back from the image's edge would leave its edge cells short of
        context, so those nets keep tiles cut to the image.

        Each tile owns a power-of-two side's cells (2048 px for 4 Mi) and reads window + one stride
        more, the overlap that tiles of the peak head need (dense.tiled_peaks): a 4096² page is then
        2 × 2 tiles, as tiles cut to it are, not 3 × 3."""
        win, s = self.window, self.stride
        if self.context_margin:
            return 0
        owned = max(2 ** int(math.log2(math.sqrt(max_pixels))) // s * s, s)
        return owned + win + s


@dataclass(frozen=True)
class ClassifyHead(_Section):
    """Softmax and TopK of the first cell in the graph: only k values and indices leave the device."""

    probs: str
    values: str
    indices: str
    k: int
    of: str | None = None


@dataclass(frozen=True)
class PeaksHead(_Section):
    """A detector's objectness 3×3 peaks in the graph: cells (M, 3) and their raw scores (M, K)."""

    cells: str
    scores: str
    threshold: str  # the name of the scalar threshold input
    of: str | None = None
    verified: dict | None = None


@dataclass(frozen=True)
class Heads(_Section):
    NESTED: ClassVar[dict[str, type]] = {"classify": ClassifyHead, "peaks": PeaksHead}
    classify: ClassifyHead | None = None
    verified: dict | None = None
    peaks: PeaksHead | None = None


@dataclass(frozen=True)
class OnnxGraph(_Section):
    """The graph's tensor names."""

    NESTED: ClassVar[dict[str, type]] = {"heads": Heads}
    input: str  # float32 (N, C, H, W), already normalized
    output: str  # raw class scores (N, K, h, w)
    layout: str | None = None
    opset: int | None = None
    pixels: str | None = None  # uint8 (N, C, H, W), normalized inside the graph (export/heads.py)
    heads: Heads | None = None

    @property
    def classify(self) -> ClassifyHead | None:
        return self.heads.classify if self.heads else None

    @property
    def peaks(self) -> PeaksHead | None:
        return self.heads.peaks if self.heads else None


@dataclass(frozen=True)
class ModelCard(_Section):
    NESTED: ClassVar[dict[str, type]] = {"input": InputSpec, "dense": DenseGeometry, "onnx": OnnxGraph}
    name: str
    labels: tuple[str, ...]
    input: InputSpec
    dense: DenseGeometry
    onnx: OnnxGraph
    schema: int | None = None
    version: str | None = None  # the store's version ("file" before it is stored)
    arch: str | None = None
    description: str | None = None
    provenance: dict | None = None  # data, accuracy, versions, quantization
    exported_at: str | None = None

    ORDER: ClassVar[tuple[str, ...]] = ("schema", "name", "version", "arch", "description", "labels",
                                        "input", "dense", "onnx", "provenance", "exported_at")

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if not self.labels or not all(isinstance(label, str) for label in self.labels):
            raise ValueError("card.labels must be a non-empty list of strings")
        if self.schema not in (None, SCHEMA):
            raise ValueError(f"card schema {self.schema}; this code reads schema {SCHEMA}")

    def to_dict(self) -> dict:
        """The stored JSON: keys in export's order (not the dataclass's, which puts required first)."""
        out = super().to_dict()
        return {k: out[k] for k in self.ORDER if k in out}

    @property
    def is_detector(self) -> bool:
        """Has a `background` class: scored whole (/score_map, /v2 pages), peaks of objectness."""
        return BACKGROUND in self.labels

    @property
    def background(self) -> int:
        return self.labels.index(BACKGROUND)

    @property
    def object_classes(self) -> set[int]:
        """Every class but background."""
        return {k for k, label in enumerate(self.labels) if label != BACKGROUND}

    @property
    def window(self) -> int:
        return self.dense.window

    @property
    def takes_pixels(self) -> bool:
        """The graph normalizes uint8 pixels itself (export/heads.py); older cards: float32 only."""
        return self.onnx.pixels is not None

    @property
    def topk_k(self) -> int:
        """How many classes the in-graph top-k head returns per image; 0: no head."""
        return self.onnx.classify.k if self.onnx.classify else 0

    @property
    def has_peak_head(self) -> bool:
        return self.onnx.peaks is not None

    def with_version(self, version: str) -> ModelCard:
        return replace(self, version=version)
