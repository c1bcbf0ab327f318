"""POST /classify as a raw ASGI handler that runs ahead of BentoML's request machinery.

Why not a `@bentoml.api`: profiled with py-spy under locust (BENCHMARKS.md), BentoML's API path spent
~70 % of the worker's CPU on a LeNet request (multipart spooled to temp files, per-response schema
work, OpenTelemetry, access log, traffic metrics) and our code 10 %. This handler does the same job
in one pass over the body: read (bounded) → parse multipart (python-multipart, the parser Starlette
uses, without temp files) → decode → batch → encode, and answers every error in our JSON shape.
It also never treats a form field as a URL to download (BentoML's `Path` inputs do).

It is added with `add_asgi_middleware`, which BentoML places inside its timeout and max-concurrency
middlewares (so 504/429 still apply) and outside the rest. Every other path falls through to BentoML.
"""

from __future__ import annotations

import json
import logging
import time

import bentoml
from prometheus_client import Histogram
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import ServiceError, body

log = logging.getLogger("convserve")
FIELDS = ("image", "model", "top_k", "invert")
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}

REQUEST_SECONDS = Histogram(
    name="convserve_request_seconds", documentation="POST /classify handling time, by status",
    labelnames=["endpoint", "status"], buckets=(5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
                                                0.5, 1, 2.5, 10))


async def read_body(scope, receive, limit: int) -> bytes:
    """The whole request body, refusing (413) more than `limit` bytes with or without Content-Length."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise ServiceError(413, f"request body of {int(value)} bytes is over the {limit}-byte "
                                    f"limit; send smaller images or fewer per request")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client went away")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise ServiceError(413, f"request body is over the {limit}-byte limit")
        if not message.get("more_body"):
            return b"".join(chunks)


def parse_form(content_type: bytes, data: bytes) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """multipart/form-data → ({field: text}, [(filename, bytes) for each `image` part])."""
    mime, params = parse_options_header(content_type)
    if mime != b"multipart/form-data" or b"boundary" not in params:
        raise ServiceError(415, "send the image as multipart/form-data (curl -F image=@digit.png), or "
                                "JSON with base64 images to /classify_base64", "unsupported_media_type")
    parts: list[list] = []  # [headers, current header name, data]

    def header_field(chunk: bytes, start: int, end: int) -> None:
        parts[-1][1] += chunk[start:end]

    def header_value(chunk: bytes, start: int, end: int) -> None:
        headers, name = parts[-1][0], bytes(parts[-1][1]).lower()
        headers[name] = headers.get(name, b"") + chunk[start:end]

    def header_end() -> None:
        parts[-1][1] = bytearray()

    def part_data(chunk: bytes, start: int, end: int) -> None:
        parts[-1][2] += chunk[start:end]

    callbacks = {"on_part_begin": lambda: parts.append([{}, bytearray(), bytearray()]),
                 "on_header_field": header_field, "on_header_value": header_value,
                 "on_header_end": header_end, "on_part_data": part_data}
    try:
        parser = MultipartParser(params[b"boundary"], callbacks)
        parser.write(data)
        parser.finalize()
    except MultipartParseError as e:
        raise ServiceError(400, f"malformed multipart body: {e}", "bad_request") from None
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    for headers, _, content in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode(errors="replace")
        if not name:
            raise ServiceError(400, "malformed multipart body: a part without a Content-Disposition "
                                    "name", "bad_request")
        if name not in FIELDS:
            raise ServiceError(422, f"unknown form field {name!r}; /classify takes "
                                    f"{', '.join(FIELDS)}", "invalid_parameter")
        if name == "image":
            filename = disposition.get(b"filename", b"").decode(errors="replace")
            files.append((filename or f"image[{len(files)}]", bytes(content)))
        else:
            fields[name] = content.decode(errors="replace").strip()
    return fields, files


def parse_options(fields: dict[str, str]) -> tuple[str, int, bool]:
    """(model, top_k, invert) from the form's text fields, with errors that say what is allowed."""
    top_k_text = fields.get("top_k", "1")
    if not top_k_text.isdigit() or int(top_k_text) < 1:
        raise ServiceError(422, f"top_k={top_k_text!r}: give a whole number ≥ 1", "invalid_parameter")
    invert_text = fields.get("invert", "false").lower()
    if invert_text not in TRUE | FALSE:
        raise ServiceError(422, f"invert={invert_text!r}: give true or false", "invalid_parameter")
    return fields.get("model", ""), int(top_k_text), invert_text in TRUE


class ClassifyRoute:
    """ASGI middleware that answers POST /classify itself; see the module docstring."""

    def __init__(self, app, max_request_bytes: int, path: str = "/classify") -> None:
        self.app, self.limit, self.path = app, max_request_bytes, path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 200
        try:
            if scope["method"] != "POST":
                raise ServiceError(405, f"{self.path} takes POST (multipart/form-data)")
            data = await read_body(scope, receive, self.limit)
            content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            fields, files = parse_form(content_type, data)
            model, top_k, invert = parse_options(fields)
            payload = await bentoml.get_current_service().classify(files, model, top_k, invert)
        except ServiceError as e:
            status, payload = e.status, body(e.status, e.type, e.message)
        except ConnectionResetError:
            return
        except Exception:  # noqa: BLE001 - a bug still gets our JSON shape, and the log gets the trace
            log.exception("POST %s failed", self.path)
            status, payload = 500, body(500, "internal_error", "internal error; see the server log")
        out = json.dumps(payload, ensure_ascii=False).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
        REQUEST_SECONDS.labels(endpoint=self.path, status=str(status)).observe(time.perf_counter() - started)
