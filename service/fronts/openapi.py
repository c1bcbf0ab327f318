"""GET /docs.json: BentoML's OpenAPI document, completed so that it tells the truth.

BentoML documents only its own @api routes, with 200/400/404/500 in error schemas we never send. This
adds what it cannot know: POST /classify and GET /models (served outside BentoML's API machinery), every
status each route can answer in our one error schema (fronts/asgi.py), Retry-After on 429/503, and
the bearer scheme when API (or admin) keys are set. It also serves GET /, the document as a plain
HTML page (fronts/docs_page.py). schemathesis checks the result against the live server in
`make test` (tests/test_reliability.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from service.fronts import docs_page, multipart
from service.fronts.asgi import ServiceError, header_bytes, read_body, replay, send_bytes
from service.settings import Settings

ERROR = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["status", "type", "message", "request_id"],
        "properties": {
            "status": {"type": "integer", "description": "the HTTP status, repeated"},
            "type": {"type": "string", "description": "machine-readable kind, e.g. invalid_image"},
            "message": {"type": "string", "description": "what is wrong and what to change"},
            "request_id": {"type": "string", "description": "X-Request-ID of the request"},
            "details": {"description": "the validator's own report, when there is one"},
        }}},
}
STATUSES = {
    400: "Malformed request (body, multipart or JSON)",
    401: "Missing or wrong API key (only when the server has CONVSERVE_API_KEYS)",
    404: "Unknown model (or route)",
    408: "The request body stalled",
    413: "Body, image count or image pixels over the limit",
    415: "Not multipart/form-data, or not an image in a supported format",
    422: "Valid form, unusable values: an image too small, an unknown option or class",
    429: "Too many requests in flight on this worker: retry after Retry-After seconds",
    500: "A bug or a failed model call; the message says which",
    503: "The model's queue is full (or the server is draining): retry after Retry-After seconds",
    504: "Not answered within the request timeout",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "integer", "minimum": 1}}}
REQUEST_ID = {"X-Request-ID": {"description": "the request's ID, taken from the request or made",
                               "schema": {"type": "string"}}}


def json_body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def answers(description: str, schema: dict) -> dict:
    """The 200 response of an operation: JSON in `schema`."""
    return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}


def obj(required: list[str], **properties: dict) -> dict:
    """A JSON object schema with these properties, all of `required` present."""
    return {"type": "object", "required": required, "properties": properties}


TEXT, NUMBER = {"type": "string"}, {"type": "number"}
CLASSIFY = {
    "post": {
        "tags": ["Service APIs"], "operationId": "classify",
        "summary": "Top-k labels for one or more images (multipart upload)",
        "description": "`curl -F image=@digit.png -F top_k=3 http://127.0.0.1:3000/classify`. Repeat "
                       "`image` for a batch. Batched with concurrent requests by the engine.",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            **obj(["image"],
                  image={"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
                         "description": "PNG, JPEG, BMP, TIFF or WEBP; greyscale or RGB(A)"},
                  model={"type": "string", "description": "a served model (GET /models); empty: default"},
                  top_k={"type": "integer", "minimum": 1, "default": 1},
                  invert={"type": "boolean", "default": False, "description": "dark ink on light paper"}),
            "additionalProperties": False}}}},
        "responses": answers("Labels", obj(
            ["model", "version", "predictions"], model=TEXT, version=TEXT,
            predictions={"type": "array", "items": obj(
                ["filename", "top_k"], filename=TEXT,
                top_k={"type": "array", "items": obj(
                    ["label", "probability"], label=TEXT,
                    probability={"type": "number", "minimum": 0, "maximum": 1})})})),
    }}
MODELS = {
    "get": {
        "tags": ["Service APIs"], "operationId": "models",
        "summary": "The served models, their cards, providers and warm-up",
        "responses": answers("Models", obj(["models", "defaults", "ready"],
                                           models={"type": "array", "items": {"type": "object"}},
                                           defaults={"type": "object"}, ready={"type": "boolean"})),
    }}
ADMIN_MODELS = {
    "post": {
        "tags": ["Admin"], "operationId": "roll_out",
        "summary": "Serve another store version of a served model, with no request lost",
        "description": "Loads the version, warms it, swaps it in; the running batch finishes on the old "
                       "one. Same inputs and labels only. Needs one of the server's CONVSERVE_ADMIN_KEYS as "
                       "`Authorization: Bearer <key>` (401 without; 403 when the server has no admin "
                       "keys); an API key does not roll out.",
        "requestBody": json_body({**obj(["tag"], tag={"type": "string", "minLength": 1,
                                                      "description": "name:version"}),
                                  "additionalProperties": False}),
        "responses": answers("Now serving", obj(["model", "version", "previous_version", "warmup_ms"],
                                                model=TEXT, version=TEXT, previous_version=TEXT,
                                                warmup_ms=NUMBER)),
    }}
HEALTH = {"/livez", "/healthz", "/readyz", "/metrics"}
FORM = "multipart/form-data"


def error_response(status: int) -> dict:
    headers = {**REQUEST_ID, **(RETRY_AFTER if status in (429, 503) else {})}
    return {"description": STATUSES[status], "headers": headers,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def complete(spec: dict, settings: Settings) -> dict:
    """BentoML's document → ours (a new dict; the input is not changed)."""
    spec = json.loads(json.dumps(spec))
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    schemas["Error"] = ERROR
    spec["paths"]["/classify"] = CLASSIFY
    spec["paths"]["/models"] = MODELS
    spec["paths"]["/admin/models"] = ADMIN_MODELS
    if settings.api_keys or settings.admin_keys:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if "requestBody" in operation:
                operation["requestBody"]["required"] = True
                if FORM in operation["requestBody"]["content"]:  # unknown form fields get 422
                    operation["requestBody"]["content"][FORM]["schema"]["additionalProperties"] = False
            responses = operation.setdefault("responses", {})
            if path in HEALTH:
                if path == "/readyz":
                    responses["503"] = {"description": "Still warming up, or draining after SIGTERM"}
                continue
            responses.update({str(s): error_response(s) for s in STATUSES})
            if method == "get":  # no body: nothing to be malformed, too large, stalled or of a wrong type
                for status in ("400", "408", "413", "415", "422"):
                    responses.pop(status)
            responses["200"].setdefault("headers", {}).update(REQUEST_ID)
            if path == "/admin/models":
                responses["403"] = {"description": "The server has no admin keys "
                                                   "(CONVSERVE_ADMIN_KEYS): rollout is off",
                                    "content": {"application/json": {"schema": {
                                        "$ref": "#/components/schemas/Error"}}}}
                keyed = settings.admin_keys or settings.api_keys
                if settings.admin_keys:
                    responses["401"] = {**responses["401"], "description": "Missing or wrong admin key "
                                        "(one of CONVSERVE_ADMIN_KEYS; API keys do not roll out)"}
            else:
                keyed = settings.api_keys
            if keyed:
                operation["security"] = [{"bearer": []}]
            else:
                responses.pop("401")
    return spec


class OpenAPIRoute:
    """ASGI middleware that holds requests to the document: GET /docs.json answers with it; a POST
    whose Content-Type the document does not list for its route gets 415 here, and a malformed
    multipart body 400, in our error shape (BentoML answered some of those with 500)."""

    def __init__(self, app, settings: Settings, bentoml_spec: Callable[[], dict],
                 path: str = "/docs.json") -> None:
        self.app, self.path, self.limit = app, path, settings.max_request_bytes
        self.document = complete(bentoml_spec(), settings)
        self.body = json.dumps(self.document).encode()
        self.page = docs_page.render(self.document)
        self.media_types = {p: set(item["post"]["requestBody"]["content"])
                            for p, item in self.document["paths"].items() if "post" in item}
        self.form_fields = {p: set(item["post"]["requestBody"]["content"][FORM]["schema"]["properties"])
                            for p, item in self.document["paths"].items()
                            if FORM in item.get("post", {}).get("requestBody", {}).get("content", {})}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "POST" and scope["path"] in self.media_types:
            content_type = check_media_type(scope, self.media_types[scope["path"]])
            if content_type.startswith(b"multipart/") and scope["path"] != "/classify":
                data = await read_body(scope, receive, self.limit)  # the gate has read it: one message
                known = self.form_fields[scope["path"]]
                for part in multipart.parts(content_type, data):  # well-formed, or 400 here
                    if part.name not in known:
                        raise ServiceError(422, f"unknown form field {part.name!r}; {scope['path']} takes "
                                                f"{', '.join(sorted(known))}", "invalid_parameter")
                receive = replay(data, receive)
        elif scope["path"] == self.path and scope["method"] == "GET":
            return await send_bytes(send, 200, self.body, {"content-type": "application/json"})
        elif scope["path"] == "/" and scope["method"] == "GET":
            return await send_bytes(send, 200, self.page, {"content-type": "text/html; charset=utf-8"})
        return await self.app(scope, receive, send)


def check_media_type(scope, accepted: set[str]) -> bytes:
    """The request's Content-Type, if its media type is one the route accepts (415 otherwise)."""
    content_type = header_bytes(scope, b"content-type")
    mime = content_type.partition(b";")[0].strip().lower().decode("latin-1")
    if mime not in accepted:
        raise ServiceError(415, f"Content-Type {mime or '(none)'!r} is not accepted here; send "
                                f"{' or '.join(sorted(accepted))}", "unsupported_media_type")
    return content_type
