"""What every HTTP front shares: an HTTP error with its status, the one JSON error shape, the REST
fronts' table from domain errors to statuses, the raw-ASGI plumbing (request IDs, body reading,
headers, JSON answers), the request-time histogram, and the handle through which every front reaches
the data plane.

    {"error": {"status": 422, "type": "invalid_image", "message": "what is wrong and what to change",
               "request_id": "…"}}

BentoML's own errors (pydantic validation → 400 object, BentoMLException → 400 *list*, unknown route →
plain text, 500) are rewritten into the same shape by gate.py, which also adds the request ID.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import math
import re
import secrets
from collections.abc import Awaitable

from prometheus_client import Histogram

from service.errors import DomainError, InvalidInput, Overloaded, TooLarge, UnknownModel, Unsupported
from service.pipeline.dataplane import Dataplane

TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large",
         415: "unsupported_media_type",
         422: "invalid_input", 429: "too_many_requests", 500: "internal_error", 503: "unavailable",
         504: "timeout"}
# /classify, /classify_base64, /score_map, /models, /admin/models: the domain's errors as statuses
REST_STATUS: dict[type[DomainError], int] = {InvalidInput: 422, TooLarge: 413, Unsupported: 415,
                                             UnknownModel: 404, Overloaded: 503}


class ServiceError(Exception):
    """An HTTP answer that is not a success: status, a machine-readable type, and a message that says
    what to change. `retry_after` (seconds) becomes a Retry-After header (429, 503)."""

    def __init__(self, status: int, message: str, type_: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_ or TYPES.get(status, "error")
        self.retry_after = retry_after

    @classmethod
    def of(cls, error: DomainError | ServiceError,
           table: dict[type[DomainError], int] = REST_STATUS) -> ServiceError:
        """A domain error as this front's HTTP error (`table`: its statuses); an HTTP error as it is."""
        if isinstance(error, ServiceError):
            return error
        status = next(s for kind, s in table.items() if isinstance(error, kind))
        return cls(status, error.message, error.kind, error.retry_after)

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"retry-after": str(max(1, math.ceil(self.retry_after)))}

    def response(self):
        from starlette.responses import JSONResponse  # BentoML's APIs answer Starlette responses

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


REQUEST_ID = contextvars.ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


# Made IDs: 32 hex digits like a UUID's, a random 64-bit prefix per process and a counter. uuid4()
# reads os.urandom per call: 8 % of the event loop's time on /v2 under load (py-spy, 1 worker).
_ID_PREFIX, _ID_COUNT = secrets.token_hex(8), itertools.count()


def request_id(scope) -> str:
    return taken_or_made(header(scope, b"x-request-id"))


def taken_or_made(offered: str | None) -> str:
    """The client's request ID if it is sane, else a new one (HTTP's header, gRPC's metadata)."""
    if offered is not None and _SANE_ID.fullmatch(offered):
        return offered
    return f"{_ID_PREFIX}{next(_ID_COUNT):016x}"


async def read_body(scope, receive, limit: int, idle_timeout_s: float | None = None) -> bytes:
    """The whole request body: 413 past `limit` bytes (with or without Content-Length), 408 when the
    client sends nothing for `idle_timeout_s`, ConnectionResetError when it hangs up."""
    for name, value in scope["headers"]:
        if name == b"content-length" and is_length(value.decode("latin-1")) and int(value) > limit:
            raise ServiceError(413, f"request body of {int(value)} bytes is over the {limit}-byte "
                                    f"limit; send smaller images or fewer per request")
    chunks, size = [], 0
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):  # no task per chunk, unlike wait_for
                message = await receive()
        except TimeoutError:
            raise ServiceError(408, f"the request body stalled: nothing arrived for {idle_timeout_s:g} "
                                    f"s after {size} bytes; send the whole body without pausing") from None
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client went away")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise ServiceError(413, f"request body is over the {limit}-byte limit")
        if not message.get("more_body"):
            return b"".join(chunks)


def replay(data: bytes, receive):
    """An ASGI receive that hands the inner app the body already read, then listens for disconnect."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    return receive_again


async def until_disconnect(receive, work: Awaitable):
    """Await `work` (a coroutine); if the client hangs up first, cancel it (a dense job then stops at
    its next tile: Dataplane.run_dense) and raise ConnectionResetError. Call once the body is read:
    the next message uvicorn has for this request is its disconnect."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the gate's deadline
        job.cancel()
        watch.cancel()
        raise
    if job in done:
        watch.cancel()
        return job.result()
    job.cancel()
    raise ConnectionResetError("the client went away while its request ran")


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def is_length(text: str) -> bool:
    """ASCII digits, at most 15 of them (int() refuses 4,300 and more, and "²".isdigit() is true)."""
    return text.isascii() and text.isdigit() and len(text) <= 15


def header(scope, name: bytes) -> str | None:
    """A request header's value (latin-1, as HTTP has it), or None."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


def header_bytes(scope, name: bytes) -> bytes:
    return next((v for k, v in scope["headers"] if k == name), b"")


async def send_bytes(send, status: int, out: bytes, headers: dict[str, str]) -> None:
    """One whole response; `headers` besides Content-Length, in order."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(out)).encode()),
                            *((k.encode(), v.encode()) for k, v in headers.items())]})
    await send({"type": "http.response.body", "body": out})


async def send_json(send, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
    """JSON as our REST fronts write it (non-ASCII kept)."""
    out = json.dumps(payload, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(out)).encode()),
                            *((k.encode(), v.encode()) for k, v in (headers or {}).items())]})
    await send({"type": "http.response.body", "body": out})


REQUEST_SECONDS = Histogram(
    name="convserve_request_seconds", documentation="POST /classify and /v2 infer handling time, by status",
    labelnames=["endpoint", "status"], buckets=(5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
                                                0.5, 1, 2.5, 10))


class PlaneHandle:
    """This worker's data plane, as every front gets it (Triton builds each front around the core's
    handle). BentoML takes the middlewares when the service class is defined, before the service
    object that builds the data plane exists; ConvServe.__init__ sets it (fronts/bento.py)."""

    def __init__(self) -> None:
        self._plane: Dataplane | None = None

    def set(self, plane: Dataplane) -> None:
        self._plane = plane

    def __call__(self) -> Dataplane:
        if self._plane is None:
            raise RuntimeError("the data plane is not built yet: the service has not started")
        return self._plane
