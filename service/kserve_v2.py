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
shape too. It runs inside service/gate.py (keys, body limits, admission, deadline), like /classify.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from importlib.metadata import PackageNotFoundError, version

import bentoml
import numpy as np

from service import dense, images
from service import v2_tensors as tensors
from service.classify_route import REQUEST_SECONDS
from service.engine import Overloaded
from service.engine.sessions import Model
from service.errors import ServiceError
from service.gate import REQUEST_ID, read_body

log = logging.getLogger("convserve")
MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                        r"(?P<action>/ready|/config|/infer)?$")
PROBABILITIES = "probabilities"
try:
    SERVER_VERSION = version("convserve")
except PackageNotFoundError:  # run from a source tree that was never installed
    SERVER_VERSION = "0"


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class V2Route:
    """ASGI middleware that answers every /v2 path itself; everything else goes on."""

    def __init__(self, app, settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_v2(scope["path"]):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status, headers = 200, {"content-type": "application/json"}
        try:
            status, out, headers = await self.route(scope, receive)
        except ServiceError as e:
            # 422 and 415 are ours; the protocol says 400 for every malformed or unsuitable request
            status = 400 if e.status in (415, 422) else e.status
            out = json.dumps({"error": e.message}, ensure_ascii=False).encode()
            headers = {"content-type": "application/json", **e.headers()}
        except ConnectionResetError:
            return
        except Exception:  # noqa: BLE001 - a bug still gets the protocol's shape; the log gets the trace
            log.exception("%s %s failed (request_id=%s)", scope["method"], scope["path"], REQUEST_ID.get())
            status, out = 500, b'{"error":"internal error; see the server log"}'
            headers = {"content-type": "application/json"}
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(out)).encode()),
                                *((k.encode(), v.encode()) for k, v in headers.items())]})
        await send({"type": "http.response.body", "body": out})
        if scope["path"].endswith("/infer"):
            REQUEST_SECONDS.labels(endpoint="/v2/infer", status=str(status)).observe(
                time.perf_counter() - started)

    async def route(self, scope, receive) -> tuple[int, bytes, dict[str, str]]:
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        service = bentoml.get_current_service()
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
            ready = service.__is_ready__()
            return answer({"ready": ready}, 200 if ready else 503)
        model = find_model(service, match["name"], match["version"])
        if action is None:
            return answer(metadata(model))
        if action == "/ready":
            ready = service.__is_ready__()
            return answer({"name": model.name, "ready": ready}, 200 if ready else 503)
        if action == "/config":
            return answer(config(model, self.settings))
        encoding = header(scope, b"content-encoding")
        if encoding not in (None, "identity"):
            raise ServiceError(415, f"Content-Encoding {encoding} is not accepted; send the body "
                                    f"uncompressed")
        body = await read_body(scope, receive, self.settings.max_request_bytes)
        request = tensors.parse_request(body, header(scope, tensors.HEADER_LENGTH.encode()))
        outputs = await infer(service, model, request, self.settings)
        # the protocol's response carries an id: the request's own, else its X-Request-ID
        rid = request.id if request.id is not None else REQUEST_ID.get()
        out, headers = tensors.encode_response(model.name, model.card["version"], rid, outputs)
        return 200, out, headers


def answer(payload: dict, status: int = 200) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps(payload).encode(), {"content-type": "application/json"}


def header(scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


def find_model(service, name: str, wanted_version: str | None) -> Model:
    model = service.models.get(name)
    if model is None:
        raise ServiceError(404, f"unknown model {name!r}; served: {', '.join(service.models)}")
    if wanted_version is not None and wanted_version != model.card["version"]:
        raise ServiceError(404, f"{name} version {wanted_version!r} is not served; the served version "
                                f"is {model.card['version']!r}")
    return model


def input_names(model: Model) -> dict[str, str]:
    """Input name → datatype; the FP32 input keeps the ONNX graph's name, as Triton would show it."""
    return {"image": "BYTES", "pixels": "UINT8", model.card["onnx"]["input"]: "FP32"}


def scores_name(model: Model) -> str:
    return model.card["onnx"]["output"]


def metadata(model: Model) -> dict:
    channels, classes = model.input.channels, len(model.card["labels"])
    shapes = {"BYTES": [-1, 1], "UINT8": [-1, channels, -1, -1], "FP32": [-1, channels, -1, -1]}
    return {"name": model.name, "versions": [model.card["version"]], "platform": "onnxruntime_onnx",
            "inputs": [{"name": n, "datatype": t, "shape": shapes[t]} for n, t in input_names(model).items()],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
                        {"name": scores_name(model), "datatype": "FP32", "shape": [-1, classes, -1, -1]}]}


def config(model: Model, settings) -> dict:
    """Triton's model configuration. Its parameters carry what a client needs to preprocess for the
    FP32 input (x = (pixel·scale − mean) / std) and to read a dense map (window, stride, labels)."""
    channels, classes, card = model.input.channels, len(model.card["labels"]), model.card
    types = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32"}
    inputs = [{"name": n, "data_type": types[t], "dims": [1] if t == "BYTES" else [channels, -1, -1],
               **({} if t == "BYTES" else {"format": "FORMAT_NCHW"}), "optional": True}
              for n, t in input_names(model).items()]
    spec, geometry = card["input"], card["dense"]
    parameters = {"labels": json.dumps(card["labels"]), "mode": spec["mode"],
                  "window": str(geometry["window"]), "stride": str(geometry["stride"]),
                  "scale": repr(spec["scale"]), "mean": json.dumps(spec["mean"]),
                  "std": json.dumps(spec["std"]), "dense": str(is_dense(model)).lower()}
    return {"name": model.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
            "max_batch_size": settings.max_batch_size, "input": inputs,
            "output": [{"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [classes]},
                       {"name": scores_name(model), "data_type": "TYPE_FP32", "dims": [classes, -1, -1]}],
            "dynamic_batching": {}, "version_policy": {"specific": {"versions": [card["version"]]}},
            "parameters": {k: {"string_value": v} for k, v in parameters.items()}}


def is_dense(model: Model) -> bool:
    return dense.BACKGROUND in model.card["labels"]


async def infer(service, model: Model, request: tensors.Request, settings) -> list[tensors.Output]:
    """decode → (batch) → predict → encode, for one infer request."""
    names = input_names(model)
    if len(request.inputs) != 1 or request.inputs[0].name not in names:
        sent = ", ".join(t.name for t in request.inputs)
        raise ServiceError(400, f"send exactly one input, named one of {', '.join(names)} (got {sent})")
    tensor = request.inputs[0]
    if tensor.datatype != names[tensor.name]:
        raise ServiceError(400, f"input {tensor.name!r} takes {names[tensor.name]}, not {tensor.datatype}")
    if tensor.datatype == "BYTES":
        scores = await from_images(service, model, tensor, invert_parameter(request.parameters), settings)
    else:
        scores = await from_pixels(service, model, tensor.data, settings)
    return select_outputs(model, scores, request)


def invert_parameter(parameters: dict) -> bool:
    invert = parameters.get("invert", False)
    if not isinstance(invert, bool):
        raise ServiceError(400, f'parameters.invert={invert!r}: give true or false')
    return invert


async def from_images(service, model: Model, tensor: tensors.Tensor, invert: bool,
                      settings) -> np.ndarray:
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise ServiceError(400, f"input 'image' has shape {tensor.shape}: give [N] or [N, 1]")
    datas = tensor.data if tensor.binary else [decode_base64(t, i) for i, t in enumerate(tensor.data)]
    files = [(f"image[{i}]", data) for i, data in enumerate(datas)]
    if not is_dense(model):
        if sum(len(data) for _, data in files) > images.INLINE_DECODE_BYTES:
            x = await asyncio.to_thread(service.window_pixels, files, model, invert)  # (N, C, h, w)
        else:
            x = service.window_pixels(files, model, invert)
        return await submit(service, model, x)
    if len(files) > settings.max_images:
        raise ServiceError(413, f"{len(files)} images in one request, over the limit of "
                                f"{settings.max_images}; split the request")
    maps = await service.run_dense(page_maps, service.engine.runner(model.name), model, files, invert,
                                   settings, service.engine.tile_side(model.name))
    return stack(maps)


def page_maps(run: dense.Run, model: Model, files: list[tuple[str, bytes]], invert: bool,
              settings, tile_side: int) -> list[np.ndarray]:
    """Each encoded image scored whole (in tiles when large): [(K, h, w)]; runs in a worker thread."""
    maps = []
    for name, data in files:
        im = images.decode(data, settings.max_image_pixels, name)
        x = images.full_pixels(im, model.input, invert)  # (C, H, W)
        check_size(model, x.shape[1:], name)
        maps.append(dense.tiled(run, x, model.card, settings.tile_pixels, tile_side).scores)
    return maps


def decode_base64(text: bytes, i: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(400, f"image[{i}] is not base64: in JSON, BYTES images are base64 strings "
                                f"(or send them binary, tritonclient's default)") from None


def check_size(model: Model, hw: tuple[int, int], name: str) -> None:
    if min(hw) < model.window:
        raise ServiceError(400, f"{name} is {hw[1]}×{hw[0]}; {model.name} needs sides of at least "
                                f"{model.window} px (its window)")


async def from_pixels(service, model: Model, x: np.ndarray, settings) -> np.ndarray:
    channels = model.input.channels
    if x.ndim != 4 or x.shape[1] != channels or x.shape[0] < 1:
        raise ServiceError(400, f"pixels have shape {list(x.shape)}; {model.name} takes "
                                f"[N, {channels}, H, W] with N ≥ 1")
    check_size(model, x.shape[2:], "the input")
    if x.shape[2] * x.shape[3] > settings.max_image_pixels:
        raise ServiceError(413, f"{x.shape[2]}×{x.shape[3]} pixels per image, over the limit of "
                                f"{settings.max_image_pixels}")
    x = np.array(x)  # own, writable memory: the body's bytes go once the request is answered
    if x.shape[2:] == (model.window, model.window):
        if len(x) > settings.max_images:
            raise ServiceError(413, f"{len(x)} images in one request, over the limit of "
                                    f"{settings.max_images}; split the request")
        return await submit(service, model, x)
    run, side = service.engine.runner(model.name), service.engine.tile_side(model.name)
    maps = await service.run_dense(
        lambda: [dense.tiled(run, xi, model.card, settings.tile_pixels, side).scores for xi in x])
    return stack(maps)


async def submit(service, model: Model, x: np.ndarray) -> np.ndarray:
    try:
        return await service.engine.submit(model.name, x)  # (N, K, 1, 1)
    except Overloaded as e:
        raise ServiceError(503, f"{model.name} is overloaded: {e}; retry after the Retry-After seconds",
                           retry_after=e.retry_after_s) from None


def stack(maps: list[np.ndarray]) -> np.ndarray:
    if len({m.shape for m in maps}) > 1:
        raise ServiceError(400, "these images give score maps of different sizes: send one image "
                                "per request, or images of one size")
    return np.stack(maps)  # (N, K, h, w)


def select_outputs(model: Model, scores: np.ndarray, request: tensors.Request) -> list[tensors.Output]:
    """The outputs asked for (by default `probabilities` for window-sized inputs, else the map), each
    binary or JSON as asked, and as classification strings where asked."""
    per_image = scores.shape[2:] == (1, 1)
    wanted = request.outputs or [{"name": PROBABILITIES if per_image else scores_name(model)}]
    binary_default = request.parameters.get("binary_data_output", False) is True
    out = []
    for spec in wanted:
        name, params = spec["name"], spec.get("parameters") or {}
        if name == PROBABILITIES:
            if not per_image:
                raise ServiceError(400, f"'{PROBABILITIES}' is per image: send inputs of "
                                        f"{model.window}×{model.window}, or ask for "
                                        f"'{scores_name(model)}' (the score map)")
            values = dense.softmax(scores[:, :, 0, 0], axis=1)  # (N, K)
        elif name == scores_name(model):
            values = scores
        else:
            raise ServiceError(400, f"unknown output {name!r}; {model.name} has {PROBABILITIES!r} and "
                                    f"{scores_name(model)!r}")
        binary = params.get("binary_data", binary_default) is True
        classes = params.get("classification", 0)
        if classes:
            out.append(classification(model, values, classes, name, binary, per_image))
        else:
            out.append(tensors.Output(name, values.astype(np.float32), list(values.shape), binary))
    return out


def classification(model: Model, values: np.ndarray, k: object, name: str, binary: bool,
                   per_image: bool) -> tensors.Output:
    """The classification extension: the top k classes as "value:index:label" per image."""
    if not isinstance(k, int) or k < 1:
        raise ServiceError(400, f"output {name!r}: classification must be a whole number ≥ 1")
    if not per_image:
        raise ServiceError(400, f"output {name!r}: classification needs window-sized inputs")
    values = values.reshape(len(values), -1)  # (N, K)
    labels = model.card["labels"]
    k = min(k, values.shape[1])
    top = np.argsort(-values, axis=1, kind="stable")[:, :k]
    strings = [f"{row[j]:f}:{j}:{labels[j]}".encode() for row, ks in zip(values, top, strict=True)
               for j in ks]
    return tensors.Output(name, strings, [len(values), k], binary)
