"""One JSON shape for every error status:

    {"error": {"status": 422, "type": "invalid_image", "message": "what is wrong and what to change",
               "request_id": "…"}}

Our own errors are `ServiceError`s, turned into responses by the fronts. BentoML's own errors
(pydantic validation → 400 object, BentoMLException → 400 *list*, unknown route → plain text, 500)
are rewritten into the same shape by service/gate.py, which also adds the request ID.
"""

from __future__ import annotations

import json
import math

from starlette.responses import JSONResponse

TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large",
         415: "unsupported_media_type",
         422: "invalid_input", 429: "too_many_requests", 500: "internal_error", 503: "unavailable",
         504: "timeout"}


class ServiceError(Exception):
    """An answer that is not a success: status, a machine-readable type, and a message that says
    what to change. `retry_after` (seconds) becomes a Retry-After header (429, 503)."""

    def __init__(self, status: int, message: str, type_: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_ or TYPES.get(status, "error")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"retry-after": str(max(1, math.ceil(self.retry_after)))}

    def response(self) -> JSONResponse:
        return JSONResponse(body(self.status, self.type, self.message), status_code=self.status,
                            headers=self.headers())


def body(status: int, type_: str, message: str, details: object = None) -> dict:
    error = {"status": status, "type": type_, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def reshape(status: int, raw: bytes) -> dict:
    """Any error body (ours, BentoML's, plain text) → our shape."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace").strip()
    if isinstance(parsed, list) and len(parsed) == 1:  # BentoMLException bodies are one-item lists
        parsed = parsed[0]
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return parsed  # already ours
    message = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    details = parsed.get("detail") if isinstance(parsed, dict) else None
    if status == 400 and isinstance(details, list) and details:
        message = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in details
                            if isinstance(d, dict))
    return body(status, TYPES.get(status, "error"), str(message) or f"HTTP {status}", details)
