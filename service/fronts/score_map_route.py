"""POST /score_map as a raw ASGI handler ahead of BentoML's, as /classify is (classify_route.py).

Why: BentoML's multipart handling of a `Path` input downloads a text value that looks like a URL
(`_bentoml_impl/serde.py`, `MultipartSerde`: httpx, the body inflated in memory past every limit). Here
every file comes from the request itself (multipart.py), and a text value where the image belongs is a
422. Parsing here also lets the request watch its client: when it hangs up, its dense job stops at the
next tile (Dataplane.run_dense).

The form keeps BentoML's contract for the same @api declaration (fronts/bento.py, which still puts the
route in /docs.json and serves in-process calls): each text field is read as JSON where it parses as
JSON (BentoML's client sends `"lenet5"` for lenet5), and a value of the wrong type or out of range is a
400 naming the field, as BentoML's validation answered; the answer is BentoML's JSON (json.dumps).
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from service.errors import DomainError
from service.fronts import multipart
from service.fronts.asgi import (
    PlaneHandle,
    ServiceError,
    body,
    header_bytes,
    read_body,
    send_bytes,
    until_disconnect,
)
from service.pipeline import options

FormText = Annotated[str, BeforeValidator(lambda v: v if isinstance(v, str) else json.dumps(v))]


class ScoreMapForm(BaseModel):
    """The text fields of /score_map, with the @api method's types, ranges and defaults."""

    model_config = ConfigDict(extra="forbid")
    model: FormText = ""
    outputs: FormText = "detections"
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.8
    nms_iou: Annotated[float, Field(ge=0, le=1)] = 0.3
    classes: FormText = ""
    stride_factor: Annotated[int, Field(ge=1, le=8)] = 1
    scales: FormText = "1"
    heatmap_class: FormText = ""
    invert: bool = False


def json_or_text(raw: bytes) -> object:
    text = raw.decode(errors="replace")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def parse_form(content_type: bytes, data: bytes) -> tuple[ScoreMapForm, bytes]:
    """multipart/form-data → (the options, the image's bytes)."""
    fields, image = {}, None
    for part in multipart.parts(content_type, data):
        if part.name != "image":
            fields[part.name] = json_or_text(part.content)
        elif part.filename is None:
            raise multipart.text_instead_of_file("image", "page.png")
        elif image is not None:
            raise ServiceError(422, "send one image per /score_map request", "invalid_parameter")
        else:
            image = part.content
    if image is None:
        raise ServiceError(400, "image: Field required: attach the page as `image` (curl -F "
                                "image=@page.png)")
    try:
        return ScoreMapForm(**fields), image
    except ValidationError as e:
        message = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ServiceError(400, message) from None


class ScoreMapRoute:
    """ASGI middleware that answers POST /score_map itself; see the module docstring."""

    def __init__(self, app, plane: PlaneHandle, max_request_bytes: int, path: str = "/score_map") -> None:
        self.app, self.plane, self.limit, self.path = app, plane, max_request_bytes, path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:  # a client that hangs up raises ConnectionResetError: the gate logs it as 499
            data = await read_body(scope, receive, self.limit)
            form, image = parse_form(header_bytes(scope, b"content-type"), data)
            opts = options.parse(**{k: v for k, v in form.model_dump().items() if k != "model"})
            work = self.plane().score_page(form.model, image, opts)
            status, payload, headers = 200, await until_disconnect(receive, work), {}
        except (DomainError, ServiceError) as error:
            e = ServiceError.of(error)
            status, payload, headers = e.status, body(e.status, e.type, e.message), e.headers()
        await send_bytes(send, status, json.dumps(payload).encode(),
                         {"content-type": "application/json", **headers})
