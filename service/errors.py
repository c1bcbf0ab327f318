"""One JSON shape for every error status:

    {"error": {"status": 422, "type": "invalid_image", "message": "what is wrong and what to change"}}

Our own errors are `ServiceError`s, turned into responses by the API methods. BentoML's own errors
(pydantic validation → 400 object, BentoMLException → 400 *list*, unknown route → plain text, 429,
503, 504, 500) are rewritten into the same shape by `ErrorShapeMiddleware`, which also enforces the
request-body limit (BentoML has none).
"""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

_TYPES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
          415: "unsupported_media_type", 422: "invalid_input", 429: "too_many_requests",
          500: "internal_error", 503: "unavailable", 504: "timeout"}


class ServiceError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_ or _TYPES.get(status, "error")

    def response(self) -> JSONResponse:
        return JSONResponse(body(self.status, self.type, self.message), status_code=self.status)


def body(status: int, type_: str, message: str, details: object = None) -> dict:
    error = {"status": status, "type": type_, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def _reshape(status: int, raw: bytes) -> dict:
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
    if status == 400 and details:
        message = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in details)
    return body(status, _TYPES.get(status, "error"), str(message) or f"HTTP {status}", details)


class ErrorShapeMiddleware:
    """Pure ASGI middleware: 413 for bodies over the limit; every ≥ 400 response in our shape."""

    def __init__(self, app, max_request_bytes: int) -> None:
        self.app, self.limit = app, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._send_error(send, 413, f"request body of {int(length)} bytes is over the "
                                                     f"{self.limit}-byte limit; send smaller images")
        received = 0

        async def counting_receive():  # bodies without Content-Length (chunked) are counted too
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ServiceError(413, f"request body is over the {self.limit}-byte limit")
            return message

        start: dict = {}
        chunks: list[bytes] = []

        async def reshaping_send(message):
            if message["type"] == "http.response.start":
                start.update(message)
                if message["status"] < 400:
                    return await send(message)
                return None
            if start["status"] < 400:
                return await send(message)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                await self._send_json(send, start["status"], _reshape(start["status"], b"".join(chunks)),
                                      start.get("headers", []))
            return None

        try:
            await self.app(scope, counting_receive, reshaping_send)
        except ServiceError as e:
            if not start:
                await self._send_error(send, e.status, e.message)

    async def _send_error(self, send, status: int, message: str) -> None:
        await self._send_json(send, status, body(status, _TYPES.get(status, "error"), message), [])

    @staticmethod
    async def _send_json(send, status: int, payload: dict, headers) -> None:
        out = json.dumps(payload).encode()
        kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type")]
        kept += [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": kept})
        await send({"type": "http.response.body", "body": out})
