"""The model card, typed and torch-free: the contract between export/ (which writes it) and everything
that reads it (service/, bench/, loadtest/, batch/). numpy only.

    card = ModelCard.from_dict(stored.info.metadata)   # checks the schema; ValueError says what is wrong
    card.input.normalize(pixels)                        # uint8 (N, C, H, W) → float32, as training did
    card.dense.cells(512), card.is_detector, card.onnx.classify.k
    card.to_dict() == stored.info.metadata              # today's JSON, key for key and in order

reference.py holds the numpy twin of every graph head export/heads.py adds (normalize, softmax, top-k,
objectness peaks): the service's fallback path and export's verification both use it.
"""

from modelcard.card import (
    BACKGROUND,
    ClassifyHead,
    DenseGeometry,
    InputSpec,
    ModelCard,
    OnnxGraph,
    PeaksHead,
)

__all__ = ["BACKGROUND", "ClassifyHead", "DenseGeometry", "InputSpec", "ModelCard", "OnnxGraph", "PeaksHead"]
