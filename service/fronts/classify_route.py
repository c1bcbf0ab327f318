"""POST /classify as a raw ASGI handler that runs ahead of BentoML's request machinery.

Why not a `@bentoml.api`: profiled with py-spy under locust (BENCHMARKS.md), BentoML's API path spent
~70 % of the worker's CPU on a LeNet request (multipart spooled to temp files, per-response schema
work, OpenTelemetry, access log, traffic metrics) and our code 10 %. This handler does the same job
in one pass over the body: read (bounded) → parse multipart (python-multipart, the parser Starlette
uses, without temp files) → decode → batch → encode, and answers every error in our JSON shape.
It also never treats a form field as a URL to download (BentoML's `Path` inputs do).

It is added with `add_asgi_middleware`, just inside fronts/gate.py (which has already checked the API
key, read the body and admitted the request) and outside BentoML's own. Every other path falls through
to BentoML.
"""

from __future__ import annotations

import json
import logging
import time

from python_multipart.multipart import parse_options_header

from service.errors import DomainError
from service.fronts import multipart
from service.fronts.asgi import (
    REQUEST_SECONDS,
    PlaneHandle,
    ServiceError,
    body,
    header_bytes,
    read_body,
    send_json,
)
from service.pipeline.dataplane import Classification

log = logging.getLogger("convserve")
FIELDS = ("image", "model", "top_k", "invert")
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


def encode(result: Classification) -> dict:
    """The answer of /classify and /classify_base64."""
    labels = result.card.labels
    return {"model": result.card.name, "version": result.card.version, "predictions": [
        {"filename": name, "top_k": [{"label": labels[k], "probability": round(float(p), 6)}
                                     for p, k in zip(ps, ks, strict=True)]}
        for name, ps, ks in zip(result.names, result.probabilities, result.classes, strict=True)]}


def parse_form(content_type: bytes, data: bytes) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """multipart/form-data → ({field: text}, [(filename, bytes) for each `image` part])."""
    mime, _ = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise ServiceError(415, "send the image as multipart/form-data (curl -F image=@digit.png), or "
                                "JSON with base64 images to /classify_base64", "unsupported_media_type")
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    for part in multipart.parts(content_type, data):
        if part.name not in FIELDS:
            raise ServiceError(422, f"unknown form field {part.name!r}; /classify takes "
                                    f"{', '.join(FIELDS)}", "invalid_parameter")
        if part.name == "image" and part.filename is None:
            raise multipart.text_instead_of_file("image", "digit.png")
        if part.name == "image":
            files.append((part.filename or f"image[{len(files)}]", part.content))
        else:
            fields[part.name] = form_text(part.content.decode(errors="replace").strip())
    return fields, files


def form_text(text: str) -> str:
    """A form field's text. BentoML's client JSON-encodes every non-file field (`model="lenet5"` arrives
    as `"lenet5"`, quotes included) and BentoML's own APIs decode them: a JSON string is taken as its
    value here too, so `bentoml.SyncHTTPClient(...).classify(...)` works like curl."""
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, str) else text
    return text


def parse_options(fields: dict[str, str]) -> tuple[str, int, bool]:
    """(model, top_k, invert) from the form's text fields, with errors that say what is allowed."""
    top_k_text = fields.get("top_k", "1")
    # ASCII digits only: str.isdigit() is true for "²", which int() refuses; and short, so that int()
    # never meets its 4,300-digit limit
    if not (top_k_text.isascii() and top_k_text.isdigit() and len(top_k_text) <= 6) or int(top_k_text) < 1:
        raise ServiceError(422, f"top_k={top_k_text!r}: give a whole number ≥ 1", "invalid_parameter")
    invert_text = fields.get("invert", "false").lower()
    if invert_text not in TRUE | FALSE:
        raise ServiceError(422, f"invert={invert_text!r}: give true or false", "invalid_parameter")
    return fields.get("model", ""), int(top_k_text), invert_text in TRUE


class ClassifyRoute:
    """ASGI middleware that answers POST /classify itself; see the module docstring."""

    def __init__(self, app, plane: PlaneHandle, max_request_bytes: int, path: str = "/classify") -> None:
        self.app, self.plane, self.limit, self.path = app, plane, max_request_bytes, path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status, headers = 500, {}  # a bug propagates to the gate, which answers 500 in our shape
        try:
            try:
                if scope["method"] != "POST":
                    headers = {"allow": "POST"}
                    raise ServiceError(405, f"{self.path} takes POST (multipart/form-data)")
                data = await read_body(scope, receive, self.limit)
                fields, files = parse_form(header_bytes(scope, b"content-type"), data)
                model, top_k, invert = parse_options(fields)
                status, payload = 200, encode(await self.plane().classify(files, model, top_k, invert))
            except (DomainError, ServiceError) as error:
                e = ServiceError.of(error)
                status, payload = e.status, body(e.status, e.type, e.message)
                headers = {**headers, **e.headers()}
            await send_json(send, status, payload, headers)
        except ConnectionResetError:
            status = 0  # nobody to answer, nothing to count
        finally:
            if status:
                REQUEST_SECONDS.labels(endpoint=self.path, status=str(status)).observe(
                    time.perf_counter() - started)
