"""Domain errors: what went wrong with a request, in words that say what to change, and no HTTP.

The engine and the pipeline raise these; each front maps them to its protocol's statuses with one
table (fronts/asgi.py REST_STATUS for /classify, /score_map and the BentoML APIs; fronts/kserve_v2.py
V2_STATUS for the Open Inference Protocol), as KServe maps its InvalidInput to 400 in one handler.
`kind` is the machine-readable type the REST error body carries (e.g. invalid_image).
"""

from __future__ import annotations


class DomainError(Exception):
    kind = "error"

    def __init__(self, message: str, kind: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message, self.retry_after = message, retry_after
        if kind:
            self.kind = kind


class InvalidInput(DomainError):
    """Values that cannot be used: a corrupt image, an image too small, an unknown option."""

    kind = "invalid_input"


class TooLarge(DomainError):
    """More images, pixels or work than this server takes in one request."""

    kind = "payload_too_large"


class Unsupported(DomainError):
    """Not an image in a format or pixel mode we serve."""

    kind = "unsupported_media_type"


class UnknownModel(DomainError):
    kind = "unknown_model"


class Overloaded(DomainError):
    """The model's queue is past its bound: retry after `retry_after` seconds."""

    kind = "overloaded"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)

    @property
    def retry_after_s(self) -> float:
        return self.retry_after


class EngineUnavailable(Overloaded):
    """The engine process is gone (restarting): 503 with Retry-After, like any overload, so every
    front's table already maps it; `kind` tells the two apart."""

    kind = "engine_unavailable"
