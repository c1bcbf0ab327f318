"""Models from BentoML's model store: checked before the server starts, then opened."""

from __future__ import annotations

import os

from service.engine.sessions import Model, open_model
from service.settings import Settings


def check_store(tags: list[str]) -> None:
    """Exit with a clear message when the store lacks a model. Called at import, so `bentoml serve`
    stops before it starts workers (a worker failing later leaves the server up, serving nothing)."""
    import bentoml  # here, not at the top: the engine's other modules never need BentoML

    if not tags:
        raise SystemExit("error: CONVSERVE_MODELS names no model")
    missing = []
    for tag in tags:
        try:
            bentoml.models.get(tag)
        except bentoml.exceptions.NotFound:
            missing.append(tag)
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not in the BentoML model store "
                         f"(BENTOML_HOME={os.environ.get('BENTOML_HOME', '~/bentoml')}); run "
                         f"`make artifacts` (or `python -m export ...`), or set CONVSERVE_MODELS to "
                         f"models you have")


def load(tag: str, settings: Settings) -> Model:
    """The stored ONNX file and its card (the store's metadata) as a Model. Only the store is used
    from BentoML here, no framework runner."""
    import bentoml

    stored = bentoml.models.get(tag)
    return open_model(str(stored.tag), dict(stored.info.metadata), stored.path_of("model.onnx"), settings)
