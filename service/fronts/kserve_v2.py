"""The Open Inference Protocol (KServe v2, Triton's HTTP protocol) as a front on the engine, so that
tritonclient, the kserve SDK, KServe and Triton's benchmark tools talk to convserve unchanged.

    GET  /v2                                    server metadata (extensions: classification, binary data)
    GET  /v2/health/live | /v2/health/ready     {"live": true} | {"ready": true} (503 while not ready)
    GET  /v2/models/{m}[/versions/{v}]          model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready    {"name": m, "ready": true}
    GET  /v2/models/{m}[/versions/{v}]/config   Triton's model configuration (max_batch_size, …)
    POST /v2/models/{m}[/versions/{v}]/infer    inference: JSON, or JSON + binary tensors

Every model takes exactly one of three inputs and answers up to two outputs:
- `image` (BYTES, [N] or [N, 1]): encoded images (PNG, JPEG, …; base64 strings in JSON), decoded with
  /classify's limits. A classifier sees each at its window (as /classify does); a dense model (one with
  a `background` label, the detector) scores each image whole (as /score_map does), one map per image.
- `pixels` (UINT8, [N, C, H, W]): pixels at any size ≥ the window, normalized here as the card says.
- the ONNX input's name (`input`, FP32, [N, C, H, W]): already normalized, as Triton would take it.
Outputs: `probabilities` (FP32 [N, K]: softmax, window-sized inputs only) and the ONNX output's name
(`scores`, FP32 [N, K, h, w]: raw class scores, the dense map when the input is larger than the
window). The classification extension (`"classification": k` on an output) answers BYTES
"value:index:label" strings instead. Window-sized inputs are batched with /classify's traffic.

Errors are `{"error": "…"}` with 400 for a bad request and 404 for an unknown model or version, as the
protocol has them; the gate's refusals (401, 408, 413, 429, 503, 504) keep their statuses and take this
shape too. It runs inside fronts/gate.py (keys, body limits, admission, deadline), like /classify.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from modelcard import ModelCard
from modelcard.reference import softmax
from service.errors import DomainError, InvalidInput, Overloaded, TooLarge, UnknownModel, Unsupported
from service.fronts import v2_tensors as tensors
from service.fronts.asgi import (
    REQUEST_ID,
    REQUEST_SECONDS,
    PlaneHandle,
    ServiceError,
    header,
    read_body,
    send_bytes,
    until_disconnect,
)
from service.pipeline.dataplane import Dataplane, scored_whole

log = logging.getLogger("convserve")
MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                        r"(?P<action>/ready|/config|/infer)?$")
PROBABILITIES = "probabilities"
# The protocol says 400 for every malformed or unsuitable request (our REST fronts say 415 or 422)
V2_STATUS: dict[type[DomainError], int] = {InvalidInput: 400, Unsupported: 400, TooLarge: 413,
                                           UnknownModel: 404, Overloaded: 503}
try:
    SERVER_VERSION = version("convserve")
except PackageNotFoundError:  # run from a source tree that was never installed
    SERVER_VERSION = "0"


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class V2Route:
    """ASGI middleware that answers every /v2 path itself; everything else goes on."""

    def __init__(self, app, plane: PlaneHandle, settings) -> None:
        self.app, self.plane, self.settings = app, plane, settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_v2(scope["path"]):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # a bug propagates to the gate, which answers 500 in the protocol's shape
        try:
            try:
                status, out, headers = await self.route(scope, receive)
            except (DomainError, ServiceError) as error:
                e = ServiceError.of(error, V2_STATUS)
                status = e.status
                out = json.dumps({"error": e.message}, ensure_ascii=False).encode()
                headers = {"content-type": "application/json", **e.headers()}
            await send_bytes(send, status, out, headers)
        except ConnectionResetError:
            status = 0  # nobody to answer, nothing to count
        finally:
            if status and scope["path"].endswith("/infer"):
                REQUEST_SECONDS.labels(endpoint="/v2/infer", status=str(status)).observe(
                    time.perf_counter() - started)

    async def route(self, scope, receive) -> tuple[int, bytes, dict[str, str]]:
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        plane = self.plane()
        match = MODEL_PATH.match(path)
        action = match["action"] if match else path
        wanted = "POST" if action == "/infer" else "GET"
        if not match and path not in ("/v2", "/v2/health/live", "/v2/health/ready"):
            raise ServiceError(404, f"no route {path}; the protocol has /v2, /v2/health/live, "
                                    f"/v2/health/ready and /v2/models/<name>[/versions/<v>][/ready|"
                                    f"/config|/infer]")
        if method != wanted:
            raise ServiceError(405, f"{path} takes {wanted}")
        if path == "/v2":
            return answer({"name": "convserve", "version": SERVER_VERSION,
                           "extensions": ["classification", "binary_tensor_data", "model_configuration"]})
        if path == "/v2/health/live":
            return answer({"live": True})
        if path == "/v2/health/ready":
            return answer({"ready": plane.ready}, 200 if plane.ready else 503)
        card = find_model(plane, match["name"], match["version"])
        if action is None:
            return answer(metadata(card))
        if action == "/ready":
            return answer({"name": card.name, "ready": plane.ready}, 200 if plane.ready else 503)
        if action == "/config":
            return answer(config(card, self.settings))
        encoding = header(scope, b"content-encoding")
        if encoding not in (None, "identity"):
            raise ServiceError(400, f"Content-Encoding {encoding} is not accepted; send the body "
                                    f"uncompressed")
        body = await read_body(scope, receive, self.settings.max_request_bytes)
        request = tensors.parse_request(body, header(scope, tensors.HEADER_LENGTH.encode()),
                                        self.settings.max_images)
        work = infer(plane, card, request)
        # a page's dense job stops when its client hangs up; window-size images need no watcher (two
        # tasks a request; a cancelled request's images leave the engine's queue unrun anyway)
        outputs = await (until_disconnect(receive, work) if is_dense(card, request) else work)
        # the protocol's response carries an id: the request's own, else its X-Request-ID
        rid = request.id if request.id is not None else REQUEST_ID.get()
        out, headers = tensors.encode_response(card.name, card.version, rid, outputs)
        return 200, out, headers


def answer(payload: dict, status: int = 200) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps(payload).encode(), {"content-type": "application/json"}


def find_model(plane: Dataplane, name: str, wanted_version: str | None) -> ModelCard:
    cards = plane.cards
    card = cards.get(name)
    if card is None:
        raise UnknownModel(f"unknown model {name!r}; served: {', '.join(cards)}")
    if wanted_version is not None and wanted_version != card.version:
        raise UnknownModel(f"{name} version {wanted_version!r} is not served; the served version "
                           f"is {card.version!r}")
    return card


def input_names(card: ModelCard) -> dict[str, str]:
    """Input name → datatype; the FP32 input keeps the ONNX graph's name, as Triton would show it."""
    return {"image": "BYTES", "pixels": "UINT8", card.onnx.input: "FP32"}


def metadata(card: ModelCard) -> dict:
    channels, classes = card.input.channels, len(card.labels)
    shapes = {"BYTES": [-1, 1], "UINT8": [-1, channels, -1, -1], "FP32": [-1, channels, -1, -1]}
    return {"name": card.name, "versions": [card.version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": n, "datatype": t, "shape": shapes[t]} for n, t in input_names(card).items()],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
                        {"name": card.onnx.output, "datatype": "FP32", "shape": [-1, classes, -1, -1]}]}


def config(card: ModelCard, settings) -> dict:
    """Triton's model configuration. Its parameters carry what a client needs to preprocess for the
    FP32 input (x = (pixel·scale − mean) / std) and to read a dense map (window, stride, labels)."""
    channels, classes = card.input.channels, len(card.labels)
    types = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32"}
    inputs = [{"name": n, "data_type": types[t], "dims": [1] if t == "BYTES" else [channels, -1, -1],
               **({} if t == "BYTES" else {"format": "FORMAT_NCHW"}), "optional": True}
              for n, t in input_names(card).items()]
    spec, geometry = card.input, card.dense
    parameters = {"labels": json.dumps(list(card.labels)), "mode": spec.mode,
                  "window": str(geometry.window), "stride": str(geometry.stride),
                  "scale": repr(spec.scale), "mean": json.dumps(list(spec.mean)),
                  "std": json.dumps(list(spec.std)), "dense": str(card.is_detector).lower()}
    return {"name": card.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
            "max_batch_size": settings.max_batch_size, "input": inputs,
            "output": [{"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [classes]},
                       {"name": card.onnx.output, "data_type": "TYPE_FP32", "dims": [classes, -1, -1]}],
            "dynamic_batching": {}, "version_policy": {"specific": {"versions": [card.version]}},
            "parameters": {k: {"string_value": v} for k, v in parameters.items()}}


async def infer(plane: Dataplane, card: ModelCard, request: tensors.Request) -> list[tensors.Output]:
    """decode → (batch) → predict, for one infer request of either protocol (HTTP /v2 here, gRPC in
    fronts/grpc_v2.py); its refusals are domain errors, which each front maps with its table."""
    names = input_names(card)
    if len(request.inputs) != 1 or request.inputs[0].name not in names:
        sent = ", ".join(t.name for t in request.inputs)
        raise InvalidInput(f"send exactly one input, named one of {', '.join(names)} (got {sent})")
    tensor = request.inputs[0]
    if tensor.datatype != names[tensor.name]:
        raise InvalidInput(f"input {tensor.name!r} takes {names[tensor.name]}, not {tensor.datatype}")
    if tensor.datatype == "BYTES":
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise InvalidInput(f"input 'image' has shape {tensor.shape}: give [N] or [N, 1]")
        datas = tensor.data if tensor.binary else [decode_base64(t, i) for i, t in enumerate(tensor.data)]
        files = [(f"image[{i}]", data) for i, data in enumerate(datas)]
        scores = await plane.image_scores(card, files, invert_parameter(request.parameters))
    else:
        scores = await plane.pixel_scores(card, tensor.data)
    return select_outputs(card, scores, request)


def is_dense(card: ModelCard, request: tensors.Request) -> bool:
    """Whether the request is scored whole (a detector's images, inputs larger than the window)."""
    tensor = request.inputs[0]
    return scored_whole(card, None if tensor.datatype == "BYTES" else tuple(tensor.shape[2:]))


def invert_parameter(parameters: dict) -> bool:
    invert = parameters.get("invert", False)
    if not isinstance(invert, bool):
        raise InvalidInput(f'parameters.invert={invert!r}: give true or false')
    return invert


def decode_base64(text: bytes, i: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"image[{i}] is not base64: in JSON, BYTES images are base64 strings "
                           f"(or send them binary, tritonclient's default)") from None


def select_outputs(card: ModelCard, scores: np.ndarray, request: tensors.Request) -> list[tensors.Output]:
    """The outputs asked for (by default `probabilities` for window-sized inputs, else the map), each
    binary or JSON as asked, and as classification strings where asked."""
    per_image = scores.shape[2:] == (1, 1)
    scores_name = card.onnx.output
    wanted = request.outputs or [{"name": PROBABILITIES if per_image else scores_name}]
    binary_default = request.parameters.get("binary_data_output", False) is True
    out = []
    for spec in wanted:
        name, params = spec["name"], spec.get("parameters") or {}
        if name == PROBABILITIES:
            if not per_image:
                raise InvalidInput(f"'{PROBABILITIES}' is per image: send inputs of "
                                   f"{card.window}×{card.window}, or ask for "
                                   f"'{scores_name}' (the score map)")
            values = softmax(scores[:, :, 0, 0], axis=1)  # (N, K)
        elif name == scores_name:
            values = scores
        else:
            raise InvalidInput(f"unknown output {name!r}; {card.name} has {PROBABILITIES!r} and "
                               f"{scores_name!r}")
        binary = params.get("binary_data", binary_default) is True
        classes = params.get("classification", 0)
        if classes:
            out.append(classification(card, values, classes, name, binary, per_image))
        else:
            out.append(tensors.Output(name, values.astype(np.float32), list(values.shape), binary))
    return out


def classification(card: ModelCard, values: np.ndarray, k: object, name: str, binary: bool,
                   per_image: bool) -> tensors.Output:
    """The classification extension: the top k classes as "value:index:label" per image."""
    if not isinstance(k, int) or k < 1:
        raise InvalidInput(f"output {name!r}: classification must be a whole number ≥ 1")
    if not per_image:
        raise InvalidInput(f"output {name!r}: classification needs window-sized inputs")
    values = values.reshape(len(values), -1)  # (N, K)
    labels = card.labels
    k = min(k, values.shape[1])
    top = np.argsort(-values, axis=1, kind="stable")[:, :k]
    strings = [f"{row[j]:f}:{j}:{labels[j]}".encode() for row, ks in zip(values, top, strict=True)
               for j in ks]
    return tensors.Output(name, strings, [len(values), k], binary)
