"""Models from BentoML's model store: checked before the server starts, then opened."""

from __future__ import annotations

import os

from modelcard import ModelCard
from service.engine import provider
from service.engine.provider import ProviderError, providers, wants_cuda
from service.engine.sessions import Model, open_model
from service.settings import Settings

# Set once the provider was checked in this process, so the server's workers (which import the service
# again, with this environment) do not each probe CUDA a second time.
_CHECKED = "_CONVSERVE_PROVIDER_CHECKED"


def check_store(tags: list[str], settings: Settings | None = None) -> None:
    """Exit with a clear message when the store lacks a model, or when CONVSERVE_PROVIDERS=cuda and
    no session can run on CUDA here. Called at import, so `bentoml serve` stops before it starts
    workers (a worker failing later leaves the server up, serving nothing: BentoML restarts it every
    10 s, forever)."""
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
    check_provider(settings or Settings())


def check_provider(settings: Settings) -> None:
    """CUDA wanted: can a session run on it? (provider.check_at_start: a probe in a subprocess.)"""
    if not wants_cuda(settings) or os.environ.get(_CHECKED):
        return
    try:
        providers(settings)
    except ProviderError as e:
        raise SystemExit(f"error: {e}") from None
    provider.check_at_start()
    os.environ[_CHECKED] = "1"


def load(tag: str, settings: Settings) -> Model:
    """The stored ONNX file and its card (the store's metadata) as a Model. Only the store is used
    from BentoML here, no framework runner."""
    import bentoml

    stored = bentoml.models.get(tag)
    card = ModelCard.from_dict(dict(stored.info.metadata), f"{stored.tag}'s card")
    return open_model(str(stored.tag), card, stored.path_of("model.onnx"), settings)


def read_card(tag: str) -> tuple[str, ModelCard]:
    """A stored model's full tag and card, without opening a session (an HTTP worker of an engine
    process knows its models this way before the engine is up: remote.py)."""
    import bentoml

    stored = bentoml.models.get(tag)
    return str(stored.tag), ModelCard.from_dict(dict(stored.info.metadata), f"{stored.tag}'s card")
