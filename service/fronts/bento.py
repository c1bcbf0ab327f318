"""The BentoML service: the @api methods, the side routes (/models, /admin/models, the demo page) and
the middlewares, wired around one data plane per worker (pipeline/dataplane.py). Never imports torch,
models/ or export/; everything it knows about a model comes from the model card stored beside the
ONNX file.

    bentoml serve service.service:ConvServe --port 3000       (or: make serve)

Lifecycle of a request: decode → (batch) → predict → (unbatch) → encode. The fronts here parse and
encode; the data plane decodes and validates; the engine batches across concurrent requests and runs
the models (its inference threads never wait on this event loop). /classify's HTTP layer is
classify_route.py, ahead of BentoML's, for speed; /score_map runs one image through the
fully-convolutional net in one pass.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
from pathlib import Path
from typing import Annotated, Any

import bentoml
from pydantic import BeforeValidator, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from service.engine import build, check_store, supervise
from service.errors import DomainError
from service.fronts import access_log, drain, grpc_server, paths, stack
from service.fronts.asgi import PlaneHandle, ServiceError
from service.fronts.classify_route import ClassifyRoute, encode
from service.fronts.gate import OPEN_PATHS, OPEN_PREFIXES, Gate, Traffic
from service.fronts.kserve_v2 import V2Route
from service.fronts.openapi import OpenAPIRoute, complete
from service.fronts.score_map_route import ScoreMapRoute
from service.pipeline import images, options
from service.pipeline.cost import Budgets, MemoryBudget
from service.pipeline.dataplane import Dataplane
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
    access_log.install(handler)  # the same lines, written ten times a second (access_log.py says why)
# At import, so that `bentoml serve` stops before it starts workers when a model is missing (engine/store.py)
check_store(settings.model_tags)
supervise(settings)  # CONVSERVE_ENGINE=process: the engine processes, started once, here (supervisor.py)
traffic = Traffic()  # this worker's requests in flight: the gate admits by it, the drain waits on it
plane = PlaneHandle()  # this worker's data plane, for every front; ConvServe.__init__ builds it
# this worker's memory for admitted work: bodies being read (the gate) and dense jobs (the data plane)
budget = MemoryBudget(Budgets.from_settings(settings).worker_bytes)


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse(plane().describe())


async def roll_out(request: Request) -> JSONResponse:
    """POST /admin/models {"tag": "lenet5:<version>"}: load that store version of a served model,
    warm it, and serve it in place of the current one without losing a request (Engine.roll_out).
    Needs admin keys configured (it changes what the server answers; 403 without), and the gate lets
    only those through (401). Swaps the model in the worker process that receives it: run one worker
    per server (the Kubernetes layout) or call each."""
    try:
        if not settings.admin_keys:
            raise ServiceError(403, "model rollout is off without admin keys: start the server with "
                                    "CONVSERVE_ADMIN_KEYS and send one as `Authorization: Bearer <key>`",
                               "forbidden")
        try:
            payload = await request.json()
        except ValueError:
            raise ServiceError(400, 'send JSON: {"tag": "lenet5:<version>"}') from None
        tag = payload.get("tag") if isinstance(payload, dict) else None
        if not isinstance(tag, str) or not tag:
            raise ServiceError(422, 'send {"tag": "<model>:<version>"}: a tag from `bentoml models list`',
                               "invalid_parameter")
        new, old, warmup_ms = await plane().roll_out(tag)
    except ServiceError as e:
        return e.response()
    except KeyError:
        return ServiceError(404, f"{tag.partition(':')[0]!r} is not served here; served: "
                                 f"{', '.join(plane().cards)} (a new model needs a restart with "
                                 f"CONVSERVE_MODELS)", "unknown_model").response()
    except bentoml.exceptions.NotFound:
        return ServiceError(404, f"{tag} is not in the model store; `bentoml models list` shows what is",
                            "unknown_model").response()
    except (ValueError, bentoml.exceptions.BentoMLException) as e:
        return ServiceError(422, f"{tag} cannot replace the served version: {e}",
                            "invalid_parameter").response()
    return JSONResponse({"model": new.name, "version": new.version,
                         "previous_version": old.version, "warmup_ms": warmup_ms})


# The demo page (GET /ui): one static file, vanilla JS calling /classify and /score_map; read once.
DEMO_PAGE = (Path(__file__).parent / "demo" / "index.html").read_bytes()


async def demo_page(request: Request) -> HTMLResponse:
    return HTMLResponse(DEMO_PAGE)


# GET /models, the admin route and the demo page live in a small Starlette app beside BentoML's @api
# methods.
side_routes = Starlette(routes=[Route("/models", list_models, methods=["GET"]),
                                Route("/admin/models", roll_out, methods=["POST"]),
                                Route("/ui", demo_page, methods=["GET"])])


@bentoml.asgi_app(side_routes, path="/")  # a passive mount: only these routes, shadows nothing
@bentoml.service(
    workers=settings.workers,
    # Admission, deadlines and shedding are gate.py's (it says why); BentoML's timeout middleware is
    # removed (fronts/stack.py) and this value, which must be positive, is what BentoML's own clients
    # would wait; its max_concurrency is off.
    traffic={"timeout": settings.timeout_s + 30},
    # The gate writes one access line per request, with its request ID; BentoML's would be a second.
    # The hot paths never reach BentoML's tracing or request metrics (fronts/stack.py); /classify and
    # /v2 infer have their own latency histogram by status (convserve_request_seconds).
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/classify", "/v2/"]},
)
class ConvServe:
    def __init__(self) -> None:
        self.dataplane = Dataplane(build(settings), settings, budget)
        plane.set(self.dataplane)
        try:
            drain.install(traffic, self.dataplane, settings.timeout_s)
        except (RuntimeError, ValueError):  # no running loop, or not the main thread: not served
            log.info("no graceful drain: the service was not built by a server's main thread")
        # Warm up off the start-up path, so /readyz answers 503 (not silence) until it is done.
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        self.dataplane.warm_up()
        # Everything allocated so far (BentoML, onnxruntime, the models) lives as long as the process:
        # moving it out of the collector's view stops full collections from walking it mid-request
        # (they were the p99 under load: ~90 ms vs ~20 ms after; BENCHMARKS.md).
        gc.freeze()

    def __is_ready__(self) -> bool:
        return self.dataplane.ready

    @bentoml.on_startup
    async def _serve_grpc(self) -> None:
        """The Open Inference Protocol over gRPC on this worker's loop (fronts/grpc_server.py)."""
        self.grpc = await grpc_server.start(plane, settings, traffic, budget)

    @bentoml.on_shutdown
    async def _close(self) -> None:
        """gRPC calls in flight finish (the drain already waited for them); requests still queued when
        the server stops get an error, not silence."""
        if getattr(self, "grpc", None) is not None:
            await self.grpc.stop(settings.timeout_s)
        self.dataplane.close()

    async def _classify(self, files: list[tuple[str, bytes]], model: str, top_k: int, invert: bool) -> Any:
        try:
            return encode(await self.dataplane.classify(files, model, top_k, invert))
        except (DomainError, ServiceError) as e:
            return ServiceError.of(e).response()

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
            self.dataplane.check_count(len(images_b64))  # before decoding any of them
            names = [f"images_b64[{i}]" for i in range(len(images_b64))]
            files = [(n, images.from_base64(t, n)) for n, t in zip(names, images_b64, strict=True)]
        except DomainError as e:
            return ServiceError.of(e).response()
        return await self._classify(files, model, top_k, invert)

    @bentoml.api(route="/classify")
    async def classify(
        self,
        image: Annotated[list[Path], Field(min_length=1)],
        model: FormText = "",
        top_k: Annotated[int, Field(ge=1)] = 1,
        invert: bool = False,
    ) -> Any:
        """Top-k labels for one or more images (multipart: repeat `image`). Over HTTP,
        classify_route.py answers this route ahead of BentoML, faster and the same; this declaration
        puts it in BentoML's schema, so that `bentoml.SyncHTTPClient(...).classify(image=[path])`
        exists, and serves in-process calls."""
        files = [(Path(p).name, Path(p).read_bytes()) for p in image]
        return await self._classify(files, model, top_k, invert)

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
            return await self.dataplane.score_page(model, Path(image).read_bytes(), opts)
        except DomainError as e:
            return ServiceError.of(e).response()


# Middlewares added first are outermost, and all of ours run ahead of BentoML's (fronts/stack.py says
# why: its timeout middleware was the p99): the gate sees every request first; V2Route answers /v2 (the
# Open Inference Protocol), ClassifyRoute POST /classify and ScoreMapRoute POST /score_map themselves
# (see their docstrings); OpenAPIRoute completes BentoML's /docs.json and checks bodies against it;
# everything else goes on to BentoML.
ConvServe.add_asgi_middleware(Gate, settings=settings, traffic=traffic, budget=budget,
                              route_limits={"/score_map": 1 + settings.max_dense_queue})
ConvServe.add_asgi_middleware(V2Route, plane=plane, settings=settings)
ConvServe.add_asgi_middleware(OpenAPIRoute, settings=settings,
                              bentoml_spec=lambda: ConvServe.openapi_spec.asdict())
ConvServe.add_asgi_middleware(ClassifyRoute, plane=plane, max_request_bytes=settings.max_request_bytes)
ConvServe.add_asgi_middleware(ScoreMapRoute, plane=plane, max_request_bytes=settings.max_request_bytes)
stack.install()
# BentoML's request metrics (for the requests that reach BentoML) label by path: every route of the
# document keeps its own label, any other path shares one (fronts/paths.py says why and how).
paths.install(paths.Routes(lambda: [*complete(ConvServe.openapi_spec.asdict(), settings)["paths"],
                                    *OPEN_PATHS], OPEN_PREFIXES))
