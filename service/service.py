"""The convserve HTTP service: BentoML 1.4 on onnxruntime. Never imports torch, models/ or export/;
everything it knows about a model comes from the model card stored beside the ONNX file.

    bentoml serve service.service:ConvServe --port 3000       (or: make serve)

Lifecycle of a request: decode → (batch) → predict → (unbatch) → encode. /classify batches across
concurrent requests; /score_map runs one image through the fully-convolutional net in one pass.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import threading
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service import images, runtime
from service.batching import MicroBatcher
from service.errors import ErrorShapeMiddleware, ServiceError
from service.settings import Settings

settings = Settings()
log = logging.getLogger("convserve")
runtime.check_store(settings.model_tags)

BATCH_SIZE = bentoml.metrics.Histogram(
    name="convserve_batch_size", documentation="images per onnxruntime call in /classify",
    labelnames=["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
QUEUE_SECONDS = bentoml.metrics.Histogram(
    name="convserve_queue_seconds", documentation="time an image waited for its batch to start",
    labelnames=["model"], buckets=(1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1))
COMPUTE_SECONDS = bentoml.metrics.Histogram(
    name="convserve_compute_seconds", documentation="onnxruntime time per call",
    labelnames=["model", "endpoint"], buckets=(1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
                                               0.25, 1, 2.5, 10))


def upload_name(path: Path, index: int) -> str:
    """The client's filename: BentoML saves an upload as tempfile's `tmp` + 8 characters + its name."""
    original = re.sub(r"^tmp[a-z0-9_]{8}", "", path.name)
    return original or f"image[{index}]"


def softmax(scores: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


async def list_models(request: Request) -> JSONResponse:
    service = bentoml.get_current_service()
    return JSONResponse({"models": [m.describe() for m in service.models.values()],
                         "defaults": {"classify": service.default_classify,
                                      "score_map": service.default_dense},
                         "ready": service.ready})


# GET routes live in a small Starlette app: BentoML's @api methods are POST-only.
read_only = Starlette(routes=[Route("/models", list_models, methods=["GET"])])


@bentoml.asgi_app(read_only, path="/")  # a passive mount: only /models, shadows nothing
@bentoml.service(
    workers=settings.workers,
    traffic={"timeout": settings.timeout_s, "max_concurrency": settings.max_concurrency},
)
class ConvServe:
    def __init__(self) -> None:
        self.models = {m.name: m for m in (runtime.load(t, settings) for t in settings.model_tags)}
        names = list(self.models)
        self.default_classify = names[0]
        self.default_dense = next((n for n in names if "background" in self.models[n].card["labels"]),
                                  names[0])
        self.batchers: dict[str, MicroBatcher] = {}
        self.dense_lock: asyncio.Lock | None = None
        self.ready = False
        # Warm up off the start-up path, so /readyz answers 503 (not silence) until it is done.
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        limit = settings.max_batch_size
        sizes = sorted({n for n in (1, 2, 4, 8, 16, 32) if n < limit} | {limit})
        for model in self.models.values():
            model.warm_up(sizes, dense_size=4 * model.window, rounds=settings.warmup_rounds)
            log.info("warmed up %s in %.0f ms", model.tag, model.warmup_ms)
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    def _model(self, name: str, default: str) -> runtime.ServedModel:
        name = name or default
        if name not in self.models:
            raise ServiceError(404, f"unknown model {name!r}; served models: {', '.join(self.models)} "
                                    f"(GET /models)", "unknown_model")
        return self.models[name]

    def _batcher(self, model: runtime.ServedModel) -> MicroBatcher:
        if model.name not in self.batchers:
            def observe(size: int, queued: float, compute: float, name: str = model.name) -> None:
                BATCH_SIZE.labels(model=name).observe(size)
                QUEUE_SECONDS.labels(model=name).observe(queued)
                COMPUTE_SECONDS.labels(model=name, endpoint="classify").observe(compute)

            self.batchers[model.name] = MicroBatcher(model.run, settings.max_batch_size,
                                                     settings.batch_wait_ms, observe)
        return self.batchers[model.name]

    async def _classify(self, decoded: list[tuple[str, Any]], model_name: str, top_k: int,
                        invert: bool) -> dict:
        model = self._model(model_name, self.default_classify)
        labels = model.card["labels"]
        if top_k > len(labels):
            raise ServiceError(422, f"top_k={top_k} but {model.name} has only {len(labels)} labels",
                               "invalid_parameter")
        x = np.stack([images.window_tensor(im, model.card["input"], invert) for _, im in decoded])
        probs = softmax((await self._batcher(model).submit(x))[:, :, 0, 0], axis=1)  # (N, K)
        top = np.argsort(-probs, axis=1)[:, :top_k]
        return {"model": model.name, "version": model.card["version"], "predictions": [
            {"filename": name, "top_k": [{"label": labels[k], "probability": round(float(p[k]), 6)}
                                         for k in ks]}
            for (name, _), p, ks in zip(decoded, probs, top, strict=True)]}

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise ServiceError(422, "no image sent: attach one or more files as `image`", "no_image")
        if n > settings.max_images:
            raise ServiceError(413, f"{n} images in one request, over the limit of "
                                    f"{settings.max_images}; split the request", "too_many_images")

    def _check_side(self, image, name: str) -> None:
        if min(image.size) < settings.min_classify_side:
            raise ServiceError(422, f"{name} is {image.size[0]}×{image.size[1]}; /classify needs sides "
                                    f"of at least {settings.min_classify_side} px", "image_too_small")

    @bentoml.api
    async def classify(
        self,
        image: list[Path],
        model: str = "",
        top_k: Annotated[int, Field(ge=1)] = 1,
        invert: bool = False,
    ) -> Any:
        """Classify one or more images (multipart field `image`, repeatable). Each is converted to the
        model's colour mode and resized to its window. `invert` for dark ink on light paper."""
        try:
            self._check_count(len(image))
            decoded = []
            for i, path in enumerate(image):
                name = upload_name(Path(path), i)
                im = images.decode(Path(path).read_bytes(), settings.max_image_pixels, name)
                self._check_side(im, name)
                decoded.append((name, im))
            return await self._classify(decoded, model, top_k, invert)
        except ServiceError as e:
            return e.response()

    @bentoml.api(route="/classify_base64")
    async def classify_base64(
        self,
        images_b64: list[str],
        model: str = "",
        top_k: Annotated[int, Field(ge=1)] = 1,
        invert: bool = False,
    ) -> Any:
        """The same as /classify for clients that cannot send multipart: JSON with base64 images."""
        try:
            self._check_count(len(images_b64))
            decoded = []
            for i, text in enumerate(images_b64):
                name = f"images_b64[{i}]"
                im = images.decode_base64(text, settings.max_image_pixels, name)
                self._check_side(im, name)
                decoded.append((name, im))
            return await self._classify(decoded, model, top_k, invert)
        except ServiceError as e:
            return e.response()

    @bentoml.api
    async def score_map(
        self,
        image: Path,
        model: str = "",
        outputs: str = "argmax",
        invert: bool = False,
    ) -> Any:
        """Score every window of one image in one forward pass. `outputs`: comma-separated from
        `argmax` (per-cell label index and its probability) and `scores` (raw class scores, float32
        little-endian, base64, shape [classes, map_height, map_width])."""
        try:
            served = self._model(model, self.default_dense)
            wanted = {o.strip() for o in outputs.split(",") if o.strip()}
            if not wanted or wanted - {"argmax", "scores"}:
                raise ServiceError(422, f"outputs={outputs!r}: choose from argmax, scores "
                                        f"(comma-separated)", "invalid_parameter")
            data = Path(image).read_bytes()
            im = await asyncio.to_thread(images.decode, data, settings.max_image_pixels, "image")
            if min(im.size) < served.window:
                raise ServiceError(422, f"image is {im.size[0]}×{im.size[1]}; {served.name} scores "
                                        f"{served.window}×{served.window} windows, so send at least that",
                                   "image_too_small")
            x = await asyncio.to_thread(images.full_tensor, im, served.card["input"], invert)
            self.dense_lock = self.dense_lock or asyncio.Lock()
            async with self.dense_lock:  # one dense pass at a time: each already uses every core
                scores = (await asyncio.to_thread(served.run, x[None]))[0]  # (K, h, w)
            return self._encode_map(served, im.size, scores, wanted)
        except ServiceError as e:
            return e.response()

    @staticmethod
    def _encode_map(model: runtime.ServedModel, size: tuple[int, int], scores: np.ndarray,
                    wanted: set[str]) -> dict:
        dense = model.card["dense"]
        out: dict[str, Any] = {
            "model": model.name, "version": model.card["version"],
            "image": {"width": size[0], "height": size[1]},
            "geometry": {k: dense[k] for k in ("window", "stride", "offset", "receptive_field", "exact")}
            | {"map_height": int(scores.shape[1]), "map_width": int(scores.shape[2])},
            "labels": model.card["labels"],
        }
        if "argmax" in wanted:
            probs = softmax(scores, axis=0)
            best = probs.argmax(0)
            out["argmax"] = best.tolist()
            confidence = np.take_along_axis(probs, best[None], 0)[0].astype(np.float64)
            out["confidence"] = np.round(confidence, 4).tolist()
        if "scores" in wanted:
            raw = np.ascontiguousarray(scores, dtype="<f4")
            out["scores"] = {"encoding": "base64", "dtype": "float32", "byte_order": "little",
                             "shape": list(raw.shape), "data": base64.b64encode(raw.tobytes()).decode()}
        return out


ConvServe.add_asgi_middleware(ErrorShapeMiddleware, max_request_bytes=settings.max_request_bytes)
