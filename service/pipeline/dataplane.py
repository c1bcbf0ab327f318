"""The data plane: the one object every front calls (KServe's DataPlane, MLServer's "used by both the
gRPC and REST servers"). numpy and PIL in, numpy, dataclasses and plain dicts out; domain errors
(service/errors.py), never HTTP statuses. It knows the served models and defaults, readiness, and the
lifecycle of each kind of request: decode → (batch) → predict → (unbatch), leaving encode to the front.

    plane = Dataplane(Engine.from_store(settings), settings)
    result = await plane.classify(files, "lenet5", top_k=3, invert=False)   # Classification
    answer = await plane.score_page("", png_bytes, options.parse(outputs="detections"))
    maps = await plane.image_scores(card, files, invert=False)               # (N, K, h, w)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from modelcard import ModelCard
from service.engine import Engine
from service.errors import DomainError, EngineUnavailable, InvalidInput, Overloaded, TooLarge, UnknownModel
from service.pipeline import dense, images, options, score
from service.pipeline.cost import DENSE_ADVICE, Budgets, Cost, MemoryBudget, dense_cost, pixels_cost
from service.settings import Settings

log = logging.getLogger("convserve")


@dataclass(frozen=True)
class Classification:
    """Top-k labels of each image of one request, best first."""

    card: ModelCard
    names: list[str]  # one per image, in order
    probabilities: np.ndarray  # (N, k)
    classes: np.ndarray  # (N, k) label indices


class Stopped(Exception):
    """A dense job stopped at a tile or scale boundary because its request is gone."""


class Stoppable:
    """A model call (Engine.bind) that raises Stopped once `stop` is set: a dense job then ends at its
    next tile, shift or scale, each of which is one call, and lets go of the dense lock."""

    def __init__(self, infer, stop: threading.Event) -> None:
        self.infer, self.stop = infer, stop

    def __call__(self, x):
        if self.stop.is_set():
            raise Stopped
        return self.infer(x)

    def peaks(self, x, threshold: float):
        if self.stop.is_set():
            raise Stopped
        return self.infer.peaks(x, threshold)


class Dataplane:
    def __init__(self, engine: Engine, settings: Settings, budget: MemoryBudget | None = None) -> None:
        self.engine, self.settings = engine, settings
        self.budgets = Budgets.from_settings(settings)
        # shared with the gate, which reserves request bodies from it (fronts/bento.py)
        self.budget = budget or MemoryBudget(self.budgets.worker_bytes)
        self.dense_jobs = 0  # running or waiting for the dense lock
        self.dense_seconds = 1.0  # EWMA of a dense job's time: the Retry-After of a refused one
        names = list(engine.models)
        self.default_classify = names[0]
        self.default_dense = next((n for n in names if engine.models[n].card.is_detector), names[0])
        self.warmed = False  # warm_up() done
        self.draining = False  # SIGTERM seen (fronts/drain.py)
        self._dense_lock: asyncio.Lock | None = None
        self._rollout_lock: asyncio.Lock | None = None

    # models, defaults, readiness ----------------------------------------------------------------
    @property
    def cards(self) -> dict[str, ModelCard]:
        """The versions served now (roll_out may replace one)."""
        return {name: model.card for name, model in self.engine.models.items()}

    def card(self, name: str, default: str) -> ModelCard:
        name = name or default
        cards = self.cards
        if name not in cards:
            raise UnknownModel(f"unknown model {name!r}; served models: {', '.join(cards)} (GET /models)",
                               "unknown_model")
        return cards[name]

    @property
    def ready(self) -> bool:
        return self.warmed and not self.draining and self.engine.ready  # an engine process may be gone

    def warm_up(self) -> None:
        self.engine.warm_up()
        self.warmed = True

    def describe(self) -> dict:
        """GET /models: every served model's card, provider, warm-up and tile side; the defaults."""
        return {"models": [{**m.describe(), "tile_side": self.engine.tile_side(name)}
                           for name, m in self.engine.models.items()],
                "defaults": {"classify": self.default_classify, "score_map": self.default_dense},
                "ready": self.warmed}

    async def roll_out(self, tag: str) -> tuple[ModelCard, ModelCard, float]:
        """Serve another store version of a served model in place of the current one, no request
        lost (Engine.roll_out); one at a time, each loads and warms a whole model. Returns (new card,
        old card, warm-up ms). Raises KeyError for a model not served; the store's and ValueError
        for a version that cannot replace it."""
        self._rollout_lock = self._rollout_lock or asyncio.Lock()
        async with self._rollout_lock:
            new, old = await asyncio.to_thread(self.engine.roll_out, tag)
        log.warning("rolled out %s in place of %s (warm-up %.0f ms)", new.tag, old.tag, new.warmup_ms)
        return new.card, old.card, new.warmup_ms

    def close(self) -> None:
        """Requests still queued when the server stops get an error, not silence."""
        self.engine.close()

    # classification -----------------------------------------------------------------------------
    def check_count(self, n: int) -> None:
        if n > self.settings.max_images:
            raise TooLarge(f"{n} images in one request, over the limit of {self.settings.max_images}; "
                           f"split the request", "too_many_images")

    def window_pixels(self, files: list[tuple[str, bytes]], card: ModelCard, invert: bool) -> np.ndarray:
        """(name, bytes) → uint8 (N, C, h, w) at the model's window, refusing too many or too small
        images with errors that say what to send instead."""
        if not files:
            raise InvalidInput("no image sent: attach one or more files as `image`", "no_image")
        self.check_count(len(files))
        pixels = []
        for name, data in files:
            image = images.decode(data, self.settings.max_image_pixels, name)
            if min(image.size) < self.settings.min_classify_side:
                raise InvalidInput(f"{name} is {image.size[0]}×{image.size[1]}; /classify needs "
                                   f"sides of at least {self.settings.min_classify_side} px",
                                   "image_too_small")
            pixels.append(images.window_pixels(image, card.input, invert))
        return np.stack(pixels)

    async def decode_windows(self, files: list[tuple[str, bytes]], card: ModelCard,
                             invert: bool) -> np.ndarray:
        """window_pixels inline for small requests, in a thread for large ones (images.py says why)."""
        if sum(len(data) for _, data in files) > images.INLINE_DECODE_BYTES:
            return await asyncio.to_thread(self.window_pixels, files, card, invert)
        return self.window_pixels(files, card, invert)

    async def infer_windows(self, card: ModelCard, x: np.ndarray, output="scores", k: int = 0):
        """Window-size images through the engine, batched with every front's traffic."""
        try:
            return await self.engine.infer(card.name, x, output, k)
        except EngineUnavailable:
            raise
        except Overloaded as e:
            raise Overloaded(f"{card.name} is overloaded: {e}; retry after the Retry-After seconds",
                             e.retry_after) from None

    async def classify(self, files: list[tuple[str, bytes]], model_name: str, top_k: int,
                       invert: bool) -> Classification:
        """(filename, bytes) pairs → top-k labels per image: decode → (batch) → predict."""
        card = self.card(model_name, self.default_classify)
        if top_k > min(len(card.labels), self.settings.max_top_k):
            raise InvalidInput(f"top_k={top_k}: {card.name} has {len(card.labels)} labels and this "
                               f"server answers at most top_k={self.settings.max_top_k}",
                               "invalid_parameter")
        x = await self.decode_windows(files, card, invert)
        # (N, top_k) each: from the graph's softmax + TopK head where the model has one
        probs, top = await self.infer_windows(card, x, "topk", top_k)
        return Classification(card, [name for name, _ in files], probs, top)

    # dense scoring --------------------------------------------------------------------------------
    async def run_dense(self, cost: Cost, work: Callable, *args):
        """work(stop, *args) in a thread, one dense job at a time (each already uses every core):
        /score_map and /v2 on pages. Admitted by count (1 running + CONVSERVE_MAX_DENSE_QUEUE waiting,
        whichever front sent it) and by its estimated memory against this worker's budget: 503 with
        Retry-After beyond either. When the request is gone (its timeout, its client hung up), `stop`
        is set and the job ends at its next model call (Stoppable); the lock and the memory are let go
        when the thread ends, not before, so the next page never runs beside it."""
        retry = self.dense_seconds * (1 + self.dense_jobs)
        if self.dense_jobs >= 1 + self.settings.max_dense_queue:
            raise Overloaded(f"{self.dense_jobs} dense requests already running or waiting, this "
                             f"worker's limit; retry after the Retry-After seconds", retry)
        self.budget.reserve(cost.memory, retry, "this request")
        self.dense_jobs += 1
        self._dense_lock = self._dense_lock or asyncio.Lock()
        try:
            await self._dense_lock.acquire()
        except BaseException:  # cancelled while waiting: it never ran
            self.budget.release(cost.memory)
            self.dense_jobs -= 1
            raise
        stop, started = threading.Event(), time.perf_counter()
        job = asyncio.ensure_future(asyncio.to_thread(work, stop, *args))
        job.add_done_callback(lambda done: self._dense_done(done, cost, started))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            stop.set()
            raise

    def _dense_done(self, work: asyncio.Future, cost: Cost, started: float) -> None:
        self._dense_lock.release()
        self.budget.release(cost.memory)
        self.dense_jobs -= 1
        self.dense_seconds += 0.2 * (time.perf_counter() - started - self.dense_seconds)
        error = None if work.cancelled() else work.exception()
        if isinstance(error, Stopped):
            log.info("a dense job stopped after %.1f s: its request is gone", time.perf_counter() - started)
        elif error and not isinstance(error, DomainError):
            log.warning("a dense job failed: %r", error)  # seen even if its client is gone

    def page_cost(self, card: ModelCard, data: bytes, name: str, opts: options.ScoreOptions) -> Cost:
        """What scoring this encoded image costs, from its header; TooLarge when over budget."""
        width, height, bands = images.probe(data, self.settings.max_image_pixels, name)
        peaks_only = opts.outputs == {"detections"} and opts.stride_factor == 1 and card.has_peak_head
        cost = dense_cost(card, width, height, bands, opts.scales, opts.stride_factor, opts.outputs,
                          peaks_only)
        cost.check(self.budgets, DENSE_ADVICE)
        return cost

    async def score_page(self, model_name: str, data: bytes, opts: options.ScoreOptions) -> dict:
        """/score_map: one encoded image → geometry and the outputs opts asks for (score.py); priced
        from its header before anything is decoded."""
        card = self.card(model_name, self.default_dense)
        cost = self.page_cost(card, data, "image", opts)
        return await self.run_dense(cost, self._decode_and_score, card, data, opts)

    def _decode_and_score(self, stop: threading.Event, card: ModelCard, data: bytes,
                          opts: options.ScoreOptions) -> dict:
        im = images.decode(data, self.settings.max_image_pixels, "image")
        return score.score_page(Stoppable(self.engine.bind(card.name), stop), im, card, opts,
                                self.settings.tile_pixels, self.engine.tile_side(card.name))

    def _check_side(self, card: ModelCard, hw: tuple[int, int], name: str) -> None:
        if min(hw) < card.window:
            raise InvalidInput(f"{name} is {hw[1]}×{hw[0]}; {card.name} needs sides of at least "
                               f"{card.window} px (its window)")

    async def image_scores(self, card: ModelCard, files: list[tuple[str, bytes]], invert: bool) -> np.ndarray:
        """Encoded images → scores (N, K, h, w): a classifier sees each at its window (as /classify);
        a detector scores each whole (as /score_map), one map per image (/v2's `image` input)."""
        if not scored_whole(card):
            x = await self.decode_windows(files, card, invert)  # (N, C, h, w)
            return await self.infer_windows(card, x)
        self.check_count(len(files))
        every = options.ScoreOptions(outputs={"scores"})  # whole maps, at scale 1, stride factor 1
        costs = [self.page_cost(card, data, name, every) for name, data in files]
        parts = {part: sum(c.parts.get(part, 0) for c in costs) for part in costs[0].parts}
        cost = Cost(sum(c.memory for c in costs), sum(c.scored_pixels for c in costs), parts)
        cost.check(self.budgets, DENSE_ADVICE)
        return _stack(await self.run_dense(cost, self._page_maps, card, files, invert))

    def _page_maps(self, stop: threading.Event, card: ModelCard, files: list[tuple[str, bytes]],
                   invert: bool) -> list[np.ndarray]:
        """Each encoded image scored whole (in tiles when large): [(K, h, w)]; runs in a thread."""
        infer = Stoppable(self.engine.bind(card.name), stop)
        side, maps = self.engine.tile_side(card.name), []
        for name, data in files:
            im = images.decode(data, self.settings.max_image_pixels, name)
            x = images.full_pixels(im, card.input, invert)  # (C, H, W)
            self._check_side(card, x.shape[1:], name)
            maps.append(dense.tiled(infer, x, card, self.settings.tile_pixels, side).scores)
        return maps

    async def pixel_scores(self, card: ModelCard, x: np.ndarray) -> np.ndarray:
        """uint8 pixels or float32 normalized (N, C, H, W) → scores (N, K, h, w): window-size inputs
        batched with /classify's traffic, larger ones scored whole as dense jobs."""
        channels = card.input.channels
        if x.ndim != 4 or x.shape[1] != channels or x.shape[0] < 1:
            raise InvalidInput(f"pixels have shape {list(x.shape)}; {card.name} takes "
                               f"[N, {channels}, H, W] with N ≥ 1")
        self._check_side(card, x.shape[2:], "the input")
        if x.shape[2] * x.shape[3] > self.settings.max_image_pixels:
            raise TooLarge(f"{x.shape[2]}×{x.shape[3]} pixels per image, over the limit of "
                           f"{self.settings.max_image_pixels}")
        x = np.array(x)  # own, writable memory: the body's bytes go once the request is answered
        if not scored_whole(card, x.shape[2:]):
            self.check_count(len(x))
            return await self.infer_windows(card, x)  # (N, K, 1, 1)
        cost = pixels_cost(card, len(x), x.shape[2], x.shape[3])
        cost.check(self.budgets, DENSE_ADVICE)
        side, tile_pixels = self.engine.tile_side(card.name), self.settings.tile_pixels

        def maps(stop: threading.Event) -> list[np.ndarray]:
            infer = Stoppable(self.engine.bind(card.name), stop)
            return [dense.tiled(infer, xi, card, tile_pixels, side).scores for xi in x]

        return _stack(await self.run_dense(cost, maps))


def scored_whole(card: ModelCard, hw: tuple[int, ...] | None = None) -> bool:
    """Whether a request is scored as whole images (a dense job) rather than batched at the window:
    encoded images (hw None) when the model is a detector, pixels when larger than the window."""
    return card.is_detector if hw is None else tuple(hw) != (card.window, card.window)


def _stack(maps: list[np.ndarray]) -> np.ndarray:
    if len({m.shape for m in maps}) > 1:
        raise InvalidInput("these images give score maps of different sizes: send one image "
                           "per request, or images of one size")
    return np.stack(maps)  # (N, K, h, w)
