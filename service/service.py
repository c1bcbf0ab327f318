"""The entry point: `bentoml serve service.service:ConvServe` (make serve). The service itself is
service/fronts/bento.py; the layers are engine/ → pipeline/ → fronts/ (README, "Where things live")."""

from service.fronts.bento import ConvServe

__all__ = ["ConvServe"]
