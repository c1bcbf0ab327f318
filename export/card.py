"""The model card: the contract between export and service (../shared/design.md). It is stored as
the BentoML model's metadata and mirrored in the ONNX file's `metadata_props` under `model_card`, so
an .onnx file carried elsewhere still explains itself. Card values are JSON without nulls (BentoML
metadata refuses None)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import onnx

from modelcard import ModelCard

CARD_KEY = "model_card"
ONNX_FILE = "model.onnx"
CARD_SCHEMA = 1


def embed(onnx_path: Path, card: ModelCard) -> None:
    """Write the card into the ONNX file's metadata_props (replacing an older one)."""
    card = card.to_dict()
    model = onnx.load(str(onnx_path))
    kept = [p for p in model.metadata_props if p.key != CARD_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=CARD_KEY, value=json.dumps(card, sort_keys=True))
    onnx.save(model, str(onnx_path))


def read_embedded(onnx_path: Path) -> dict:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return json.loads(next(p.value for p in model.metadata_props if p.key == CARD_KEY))


def save_to_store(name: str, onnx_path: Path, card: ModelCard) -> str:
    """Import into BentoML's model store (BENTOML_HOME) and return the tag. The card's `version` is
    the store's version, so it is filled in here and embedded in the stored ONNX file too."""
    import bentoml  # imported here: exporting to a file alone does not need the store

    card = replace(card, name=name, exported_at=datetime.now(UTC).isoformat(timespec="seconds"))
    with bentoml.models.create(name, module="convserve.export", labels={"arch": card.arch},
                               metadata=card.to_dict()) as model:
        card = card.with_version(model.tag.version)
        model.info.metadata["version"] = model.tag.version
        stored = Path(model.path_of(ONNX_FILE))
        shutil.copyfile(onnx_path, stored)
        embed(stored, card)
    return str(model.tag)
