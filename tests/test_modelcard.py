"""The typed model card (modelcard/): every shipped card round-trips to the same JSON, key order
included, from the store's metadata and from the copy inside the ONNX file; from_dict refuses what the
service could not read."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import onnx
import pytest
import yaml
from conftest import ROOT

from modelcard import BACKGROUND, ModelCard
from modelcard.reference import normalize, reference_peaks, softmax, topk

SHIPPED = sorted((ROOT / "bentomodels").glob("*.bentomodel"))


def shipped_cards(path) -> tuple[dict, dict]:
    """(the store's metadata, the card embedded in model.onnx) of a shipped store export."""
    with tarfile.open(path) as tar:
        stored = yaml.safe_load(tar.extractfile("./model.yaml"))["metadata"]
        graph = onnx.load_from_string(tar.extractfile("./model.onnx").read())
    embedded = json.loads(next(p.value for p in graph.metadata_props if p.key == "model_card"))
    return stored, embedded


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_card_round_trips(path):
    stored, embedded = shipped_cards(path)
    again = ModelCard.from_dict(stored).to_dict()
    assert again == stored and json.dumps(again) == json.dumps(stored)  # the same keys in the same order
    # inside the ONNX file the card is written with sorted keys (export/card.py embed)
    again = ModelCard.from_dict(embedded).to_dict()
    assert json.dumps(again, sort_keys=True) == json.dumps(embedded, sort_keys=True)
    card = ModelCard.from_dict(stored)
    assert card.name == path.stem
    assert card.is_detector == (BACKGROUND in stored["labels"])
    assert card.topk_k == stored["onnx"]["heads"]["classify"]["k"]
    assert card.has_peak_head == ("peaks" in stored["onnx"]["heads"])
    assert card.dense.cells(512) == (512 - stored["dense"]["window"]) // stored["dense"]["stride"] + 1


def test_the_card_refuses_what_the_service_cannot_read():
    stored, _ = shipped_cards(ROOT / "bentomodels" / "lenet5.bentomodel")
    with pytest.raises(ValueError, match="unknown keys"):
        ModelCard.from_dict({**stored, "inputs": {}})
    with pytest.raises(ValueError, match="lacks"):
        ModelCard.from_dict({k: v for k, v in stored.items() if k != "dense"})
    with pytest.raises(ValueError, match=r"card\.dense lacks \['stride'\]"):
        ModelCard.from_dict({**stored, "dense": {k: v for k, v in stored["dense"].items() if k != "stride"}})
    with pytest.raises(ValueError, match="schema"):
        ModelCard.from_dict({**stored, "schema": 2})
    with pytest.raises(ValueError, match="labels"):
        ModelCard.from_dict({**stored, "labels": []})


def test_geometry_of_a_padded_net_needs_context_and_no_fixed_tiles():
    stored, _ = shipped_cards(ROOT / "bentomodels" / "lenet5.bentomodel")
    padded = ModelCard.from_dict({**stored, "dense": {**stored["dense"], "receptive_field": 36,
                                                      "receptive_field_offset": -4}}).dense
    assert padded.context_margin == 4 and padded.fixed_tile_side(4 * 2**20) == 0
    exact = ModelCard.from_dict(stored).dense
    assert exact.context_margin == 0 and exact.fixed_tile_side(4 * 2**20) == 2048 + 28 + 4


def test_reference_heads():
    """The numpy twins: normalization as training did it, softmax, top-k in class order on ties, and
    objectness peaks."""
    pixels = np.array([[[[0, 255]]]], np.uint8)
    assert normalize(pixels, 1 / 255, [0.5], [0.5]).tolist() == [[[[-1.0, 1.0]]]]
    probs, classes = topk(np.array([[1.0, 3.0, 3.0, 0.0]]), 2)
    assert classes.tolist() == [[1, 2]] and np.allclose(probs.sum(), 2 * softmax(np.array([1, 3, 3, 0.0]))[1])
    scores = np.zeros((1, 2, 3, 3), np.float32)
    scores[0, 1] = 5.0  # background everywhere
    scores[0, 0, 1, 1] = 9.0  # one object in the middle
    cells, at = reference_peaks(scores, bg=1, threshold=0.5)
    assert cells.tolist() == [[0, 1, 1]] and at.tolist() == [[9.0, 5.0]]
