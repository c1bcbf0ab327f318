"""The convserve HTTP service: BentoML 1.4 on onnxruntime. Never imports torch, models/ or export/;
everything it knows about a model comes from the model card stored beside the ONNX file.

    bentoml serve service.service:ConvServe --port 3000       (or: make serve)

Lifecycle of a request: decode → (batch) → predict → (unbatch) → encode. The fronts here decode,
validate and encode; service.engine batches across concurrent requests and runs the models (its
inference threads never wait on this event loop). /classify's HTTP layer is service/classify_route.py,
ahead of BentoML's, for speed; /score_map runs one image through the fully-convolutional net in one pass.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import BeforeValidator, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from service import dense, drain, images, options, scoring
from service.classify_route import ClassifyRoute
from service.engine import Engine, Overloaded
from service.engine.sessions import Model
from service.engine.store import check_store
from service.errors import ServiceError
from service.gate import Gate, Traffic
from service.kserve_v2 import V2Route
from service.openapi import OpenAPIRoute
from service.settings import Settings

# BentoML json-decodes each multipart form field, so `-F scales=1` arrives as an int, `-F model=null` as
# None: text fields turn whatever JSON value arrived back into the text that was sent.
FormText = Annotated[str, BeforeValidator(lambda v: v if isinstance(v, str) else json.dumps(v))]

settings = Settings()
log = logging.getLogger("convserve")
if not log.handlers:  # BentoML configures only its own loggers
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s:%(process)d] %(message)s",
                                           "%Y-%m-%dT%H:%M:%S%z"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
check_store(settings.model_tags)
traffic = Traffic()  # this worker's requests in flight: the gate admits by it, the drain waits on it


async def list_models(request: Request) -> JSONResponse:
    service = bentoml.get_current_service()
    return JSONResponse({"models": [{**m.describe(), "tile_side": service.engine.tile_side(name)}
                                    for name, m in service.models.items()],
                         "defaults": {"classify": service.default_classify,
                                      "score_map": service.default_dense},
                         "ready": service.ready})


async def roll_out(request: Request) -> JSONResponse:
    """POST /admin/models {"tag": "lenet5:<version>"}: load that store version of a served model,
    warm it, and serve it in place of the current one without losing a request (Engine.roll_out).
    Needs API keys configured (it changes what the server answers). Swaps the model in the worker
    process that receives it: run one worker per server (the Kubernetes layout) or call each."""
    service = bentoml.get_current_service()
    try:
        if not settings.api_keys:
            raise ServiceError(403, "model rollout is off without API keys: start the server with "
                                    "CONVSERVE_API_KEYS and send one as `Authorization: Bearer <key>`",
                               "forbidden")
        try:
            payload = await request.json()
        except ValueError:
            raise ServiceError(400, 'send JSON: {"tag": "lenet5:<version>"}') from None
        tag = payload.get("tag") if isinstance(payload, dict) else None
        if not isinstance(tag, str) or not tag:
            raise ServiceError(422, 'send {"tag": "<model>:<version>"}: a tag from `bentoml models list`',
                               "invalid_parameter")
        service.rollout_lock = service.rollout_lock or asyncio.Lock()
        async with service.rollout_lock:  # one at a time: each loads and warms a whole model
            new, old = await asyncio.to_thread(service.engine.roll_out, tag)
    except ServiceError as e:
        return e.response()
    except KeyError:
        return ServiceError(404, f"{tag.partition(':')[0]!r} is not served here; served: "
                                 f"{', '.join(service.models)} (a new model needs a restart with "
                                 f"CONVSERVE_MODELS)", "unknown_model").response()
    except bentoml.exceptions.NotFound:
        return ServiceError(404, f"{tag} is not in the model store; `bentoml models list` shows what is",
                            "unknown_model").response()
    except (ValueError, bentoml.exceptions.BentoMLException) as e:
        return ServiceError(422, f"{tag} cannot replace the served version: {e}",
                            "invalid_parameter").response()
    log.warning("rolled out %s in place of %s (warm-up %.0f ms)", new.tag, old.tag, new.warmup_ms)
    return JSONResponse({"model": new.name, "version": new.card["version"],
                         "previous_version": old.card["version"], "warmup_ms": new.warmup_ms})


# The demo page (GET /ui): one static file, vanilla JS calling /classify and /score_map; read once.
DEMO_PAGE = (Path(__file__).parent / "demo" / "index.html").read_bytes()


async def demo_page(request: Request) -> HTMLResponse:
    return HTMLResponse(DEMO_PAGE)


# GET /models, the admin route and the demo page live in a small Starlette app beside BentoML's @api
# methods.
read_only = Starlette(routes=[Route("/models", list_models, methods=["GET"]),
                              Route("/admin/models", roll_out, methods=["POST"]),
                              Route("/ui", demo_page, methods=["GET"])])


@bentoml.asgi_app(read_only, path="/")  # a passive mount: only these routes, shadows nothing
@bentoml.service(
    workers=settings.workers,
    # Admission, deadlines and shedding are service/gate.py's (it says why); BentoML's timeout stays
    # only as a backstop behind the gate's, and its max_concurrency is off.
    traffic={"timeout": settings.timeout_s + 30},
    # The gate writes one access line per request, with its request ID; BentoML's would be a second.
    # /classify and /v2 are the hot paths: BentoML's tracing span costs a large share of a LeNet request
    # (BENCHMARKS.md). Its request metrics still count /classify, and ClassifyRoute adds its own
    # latency histogram by status.
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/classify", "/v2/"]},
)
class ConvServe:
    def __init__(self) -> None:
        self.engine = Engine.from_store(settings)
        self.rollout_lock: asyncio.Lock | None = None
        names = list(self.models)
        self.default_classify = names[0]
        self.default_dense = next((n for n in names if dense.BACKGROUND in self.models[n].card["labels"]),
                                  names[0])
        self.dense_lock: asyncio.Lock | None = None
        self.ready = False
        try:
            drain.install(traffic, settings.timeout_s)
        except (RuntimeError, ValueError):  # no running loop, or not the main thread: not served
            log.info("no graceful drain: the service was not built by a server's main thread")
        # Warm up off the start-up path, so /readyz answers 503 (not silence) until it is done.
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        self.engine.warm_up()
        # Everything allocated so far (BentoML, onnxruntime, the models) lives as long as the process:
        # moving it out of the collector's view stops full collections from walking it mid-request
        # (they were the p99 under load: ~90 ms vs ~20 ms after; BENCHMARKS.md).
        gc.freeze()
        self.ready = True

    @property
    def models(self) -> dict[str, Model]:
        """The versions served now (POST /admin/models may replace one)."""
        return self.engine.models

    def __is_ready__(self) -> bool:
        return self.ready and not traffic.draining

    @bentoml.on_shutdown
    def _close(self) -> None:
        """Requests still queued when the server stops get an error, not silence."""
        self.engine.close()

    def _model(self, name: str, default: str) -> Model:
        name = name or default
        if name not in self.models:
            raise ServiceError(404, f"unknown model {name!r}; served models: {', '.join(self.models)} "
                                    f"(GET /models)", "unknown_model")
        return self.models[name]

    async def classify_images(self, files: list[tuple[str, bytes]], model_name: str, top_k: int,
                              invert: bool) -> dict:
        """(filename, bytes) pairs → top-k labels per image: decode → (batch) → predict → encode."""
        model = self._model(model_name, self.default_classify)
        labels = model.card["labels"]
        if top_k > min(len(labels), settings.max_top_k):
            raise ServiceError(422, f"top_k={top_k}: {model.name} has {len(labels)} labels and this "
                                    f"server answers at most top_k={settings.max_top_k}",
                               "invalid_parameter")
        if sum(len(data) for _, data in files) > images.INLINE_DECODE_BYTES:
            x = await asyncio.to_thread(self.window_pixels, files, model, invert)
        else:
            x = self.window_pixels(files, model, invert)
        try:
            # (N, top_k) each: from the graph's softmax + TopK head where the model has one
            probs, top = await self.engine.submit_topk(model.name, x, top_k)
        except Overloaded as e:
            raise ServiceError(503, f"{model.name} is overloaded: {e}; retry after the Retry-After "
                                    f"seconds", "overloaded", retry_after=e.retry_after_s) from None
        return {"model": model.name, "version": model.card["version"], "predictions": [
            {"filename": name, "top_k": [{"label": labels[k], "probability": round(float(p), 6)}
                                         for p, k in zip(ps, ks, strict=True)]}
            for (name, _), ps, ks in zip(files, probs, top, strict=True)]}

    def window_pixels(self, files: list[tuple[str, bytes]], model: Model, invert: bool) -> np.ndarray:
        """(name, bytes) → uint8 (N, C, h, w) at the model's window, refusing too many or too small
        images with errors that say what to send instead."""
        if not files:
            raise ServiceError(422, "no image sent: attach one or more files as `image`", "no_image")
        if len(files) > settings.max_images:
            raise ServiceError(413, f"{len(files)} images in one request, over the limit of "
                                    f"{settings.max_images}; split the request", "too_many_images")
        pixels = []
        for name, data in files:
            image = images.decode(data, settings.max_image_pixels, name)
            if min(image.size) < settings.min_classify_side:
                raise ServiceError(422, f"{name} is {image.size[0]}×{image.size[1]}; /classify needs "
                                        f"sides of at least {settings.min_classify_side} px",
                                   "image_too_small")
            pixels.append(images.window_pixels(image, model.input, invert))
        return np.stack(pixels)

    @bentoml.api(route="/classify_base64")
    async def classify_base64(
        self,
        images_b64: Annotated[list[str], Field(min_length=1)],
        model: str = "",
        top_k: Annotated[int, Field(ge=1)] = 1,
        invert: bool = False,
    ) -> Any:
        """The same as /classify for clients that cannot send multipart: JSON with base64 images."""
        try:
            names = [f"images_b64[{i}]" for i in range(len(images_b64))]
            files = [(n, images.from_base64(t, n)) for n, t in zip(names, images_b64, strict=True)]
            return await self.classify_images(files, model, top_k, invert)
        except ServiceError as e:
            return e.response()

    @bentoml.api(route="/classify")
    async def classify(
        self,
        image: Annotated[list[Path], Field(min_length=1)],
        model: FormText = "",
        top_k: Annotated[int, Field(ge=1)] = 1,
        invert: bool = False,
    ) -> Any:
        """Top-k labels for one or more images (multipart: repeat `image`). Over HTTP, service/
        classify_route.py answers this route ahead of BentoML, faster and the same; this declaration
        puts it in BentoML's schema, so that `bentoml.SyncHTTPClient(...).classify(image=[path])`
        exists, and serves in-process calls."""
        try:
            files = [(Path(p).name, Path(p).read_bytes()) for p in image]
            return await self.classify_images(files, model, top_k, invert)
        except ServiceError as e:
            return e.response()

    @bentoml.api
    async def score_map(
        self,
        image: Path,
        model: FormText = "",
        outputs: FormText = "detections",
        threshold: Annotated[float, Field(ge=0, le=1)] = 0.8,
        nms_iou: Annotated[float, Field(ge=0, le=1)] = 0.3,
        classes: FormText = "",
        stride_factor: Annotated[int, Field(ge=1, le=8)] = 1,
        scales: FormText = "1",
        heatmap_class: FormText = "",
        invert: bool = False,
    ) -> Any:
        """Score every window of one image in one forward pass (per scale and shift) and say what is
        where. `outputs` (comma-separated): `detections` (default: boxes after peak finding and
        class-wise NMS), `argmax` (per-cell label index + probability), `scores` (raw float32 scores,
        base64), `heatmap` (PNG, base64). `scales`: digit sizes to look for, as multiples of the
        training size (an image pyramid). `stride_factor` k: stride ÷ k by shift-and-stitch (k² passes).
        `invert`: dark ink on light paper. Large images are scored in tiles; the map is the same."""
        try:
            opts = options.parse(outputs=outputs, threshold=threshold, nms_iou=nms_iou, classes=classes,
                                 stride_factor=stride_factor, scales=scales, heatmap_class=heatmap_class,
                                 invert=invert)
            served = self._model(model, self.default_dense)
            return await self.run_dense(self._decode_and_score, served, Path(image), opts)
        except ServiceError as e:
            return e.response()

    async def run_dense(self, work, *args):
        """work(*args) in a thread, one dense job at a time (each already uses every core): /score_map
        and /v2 on pages. How many /score_map requests may wait is the gate's route limit, checked
        before their bodies are read. The lock is let go when the work ends, not when the request
        does: a request cut off by its timeout (504) cannot stop its thread, and the next page must not
        run beside it."""
        self.dense_lock = self.dense_lock or asyncio.Lock()
        await self.dense_lock.acquire()
        job = asyncio.ensure_future(asyncio.to_thread(work, *args))
        job.add_done_callback(self._dense_done)
        return await asyncio.shield(job)

    def _dense_done(self, work: asyncio.Future) -> None:
        self.dense_lock.release()
        if not work.cancelled() and work.exception() and not isinstance(work.exception(), ServiceError):
            log.warning("a dense job failed: %r", work.exception())  # seen even if its client is gone

    def _decode_and_score(self, served: Model, image: Path, opts: options.ScoreOptions) -> dict:
        im = images.decode(image.read_bytes(), settings.max_image_pixels, "image")
        return self._score(served, im, opts)

    def _score(self, served: Model, im, opts: options.ScoreOptions) -> dict:
        return scoring.score_page(self.engine.runner(served.name), im, served.card, opts,
                                  settings.tile_pixels, self.engine.tile_side(served.name))


# Middlewares added first are outermost: the gate sees every request first; V2Route answers /v2 (the
# Open Inference Protocol) and ClassifyRoute POST /classify themselves (see their docstrings);
# OpenAPIRoute completes BentoML's /docs.json; everything else goes on to BentoML.
ConvServe.add_asgi_middleware(Gate, settings=settings, traffic=traffic,
                              route_limits={"/score_map": 1 + settings.max_dense_queue})
ConvServe.add_asgi_middleware(V2Route, settings=settings)
ConvServe.add_asgi_middleware(OpenAPIRoute, settings=settings,
                              bentoml_spec=lambda: ConvServe.openapi_spec.asdict())
ConvServe.add_asgi_middleware(ClassifyRoute, max_request_bytes=settings.max_request_bytes)
