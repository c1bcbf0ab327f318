"""An HTTP worker's engine when the models run in an engine process (CONVSERVE_ENGINE=process): the
same public interface as Engine (infer, infer_blocking, bind, tile_side, warm_up, roll_out, close,
models), so the data plane and the fronts do not know which one they have.

    engine = RemoteEngine.connect(settings)    # in a running event loop (a BentoML worker's)
    probs, classes = await engine.infer("lenet5", pixels, "topk", k=3)

Each request: its pixels are copied into a free slot of this worker's shared ring (ring.py), one 96-byte
record goes to the engine on a Unix socket; the answer comes back the same way. The event loop waits on
the socket with loop.add_reader, so an answer resolves its request's future in the loop's own thread
(no thread hop per request; bench/ipc.py measures the round trip). Blocking callers (dense pipelines
in their threads) send the same records and wait on a concurrent future the loop resolves.

When the engine process dies, every request in flight fails at once with EngineUnavailable (503), new
ones too, `ready` turns false (/readyz), and a thread reconnects to the restarted engine, which only
listens once it has loaded and warmed its models (supervisor.py, process.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future

import numpy as np

from modelcard import ModelCard
from service.engine.bound import BoundModel
from service.engine.ring import (
    FLAG_SHED,
    OP,
    OP_CANCEL,
    OP_ERROR,
    OP_HELLO,
    OP_INFER,
    OP_MODELS,
    OP_RESULT,
    OP_ROLLOUT,
    OUTPUTS,
    RID,
    Channel,
    Ring,
    align,
    put,
    read_answer,
    record,
    response_offset,
)
from service.engine.sessions import Output
from service.engine.store import read_card
from service.engine.supervisor import SOCKETS
from service.errors import EngineUnavailable, Overloaded
from service.settings import Settings

log = logging.getLogger("convserve")

# A slot holds 4 window images and their answer; more (or a dense tile) gets a segment of its own.
# Why not a whole max-size batch per slot: AlexNet's 64 × 224² × 3 would make a 128-slot ring 1.2 GB
# of /dev/shm per worker, and containers default to 64 MB of it; 4 images keep AlexNet's ring at
# 77 MB of address space (touched only as used) and LeNet's at 2 MB, and /classify's common request
# is one image.
IMAGES_PER_SLOT = 4
RETRY_S = 2.0  # Retry-After while the engine restarts: it loads and warms in ~1-3 s for LeNet


class ModelView:
    """A served model as a worker sees it: its card and the engine process's description of it."""

    def __init__(self, tag: str, card: ModelCard, info: dict | None = None, tile_side: int = 0) -> None:
        self.tag, self.card, self.tile_side = tag, card, tile_side
        self.info = info or {**card.to_dict(), "tag": tag, "provider": "engine process not connected"}
        self.warmup_ms = self.info.get("warmup_ms", 0.0)

    @property
    def name(self) -> str:
        return self.card.name

    def describe(self) -> dict:
        return self.info


def answer_bytes(card: ModelCard, x: np.ndarray, output: Output, k: int) -> int:
    """The most an answer to `x` can take in its slot (ring.put_answer), known before it is sent."""
    n, labels, d = len(x), len(card.labels), card.dense
    h, w = ((side - d.window) // d.stride + 1 for side in x.shape[2:])
    cells = n * max(0, h) * max(0, w)
    if output == "topk":  # values and indices, at most int64 each
        return 2 * align(n * max(k, labels) * 8) + 64
    if output == "peaks":  # at most one peak per cell: (n, y, x) int64 and K scores each
        return align(cells * 3 * 8) + align(cells * labels * 4) + 64
    return align(cells * labels * 4) + 64


class RemoteEngine:
    def __init__(self, path: str, settings: Settings, models: list[ModelView]) -> None:
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("RemoteEngine answers on an event loop: build it inside one") from None
        self.path, self.settings = path, settings
        self._loop_thread = threading.get_ident()
        self._flush_scheduled = False
        self._models = {m.name: m for m in models}
        self.names = list(self._models)
        self.max_items = settings.max_batch_size
        slot_bytes = max(align(IMAGES_PER_SLOT * m.card.input.channels * m.card.window ** 2)
                         + IMAGES_PER_SLOT * len(m.card.labels) * 16 + 256 for m in models)
        # two slots per request a worker admits at once (CONVSERVE_MAX_CONCURRENCY), rounded to pages
        self.ring = Ring(2 * settings.max_concurrency, (max(slot_bytes, 16384) + 4095) & ~4095)
        self.channel: Channel | None = None
        self.pending: dict[int, tuple] = {}  # rid → (slot, request bytes, future)
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self.connected = threading.Event()
        self.closed = False
        self.connects = 0
        threading.Thread(target=self._connect, daemon=True, name="engine-connect").start()

    @classmethod
    def connect(cls, settings: Settings) -> RemoteEngine:
        paths = [p for p in os.environ.get(SOCKETS, "").split(",") if p]
        if not paths:
            raise RuntimeError("CONVSERVE_ENGINE=process, but no engine process was started: the "
                               "server's main process starts it (service/engine/supervisor.py)")
        views = [ModelView(*read_card(tag)) for tag in settings.model_tags]
        return cls(paths[os.getpid() % len(paths)], settings, views)

    # the Engine interface --------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, ModelView]:
        return self._models

    @property
    def ready(self) -> bool:
        return self.connected.is_set()

    async def infer(self, model: str, x: np.ndarray, output: Output = "scores",
                    k: int = 0) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Engine.infer, in the engine process (which sheds, batches and picks the top-k path)."""
        if output not in ("scores", "topk"):
            raise ValueError(f"infer answers scores or topk, not {output!r}")
        step = self.max_items
        if len(x) <= step:
            return await self._one(model, x, output, k)
        parts = await asyncio.gather(*(self._one(model, x[i : i + step], output, k)
                                       for i in range(0, len(x), step)))
        if output == "scores":
            return np.concatenate(parts)
        return np.concatenate([v for v, _ in parts]), np.concatenate([i for _, i in parts])

    async def _one(self, model: str, x: np.ndarray, output: Output, k: int):
        future = self.loop.create_future()
        rid = self._submit(model, x, output, k, 0.0, True, future)
        try:
            return await future
        except asyncio.CancelledError:  # the caller is gone: drop the images if they have not started
            if rid in self.pending and self.channel is not None:
                try:
                    self.channel.send(record(OP_CANCEL, rid=rid))
                except OSError:
                    pass
            raise  # the slot is freed when the engine answers (cancelled, or the scores nobody reads)

    def infer_blocking(self, model: str, x: np.ndarray, output: Output = "scores",
                       threshold: float | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Engine.infer_blocking: never shed; from a thread that is not the event loop's."""
        step = self.max_items
        futures = []
        for i in range(0, len(x), step):
            futures.append(Future())
            self._submit(model, x[i : i + step], output, 0, threshold or 0.0, False, futures[-1])
        parts = [f.result() for f in futures]
        if output != "peaks":
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        cells = [c + np.array([i * step, 0, 0], c.dtype) for i, (c, _) in enumerate(parts)]
        return (cells[0], parts[0][1]) if len(parts) == 1 else (np.concatenate(cells),
                                                                np.concatenate([p for _, p in parts]))

    def tile_side(self, model: str) -> int:
        return self._models[model].tile_side

    def bind(self, model: str) -> BoundModel:
        return BoundModel(self, model)

    def warm_up(self) -> None:
        """The engine process warms itself before it listens: ready once connected to it."""
        self.connected.wait()

    def roll_out(self, tag: str) -> tuple[ModelView, ModelView]:
        """Engine.roll_out, in the engine process: every worker then serves the new version (the engine
        tells each its models). Blocking: call from a thread."""
        name = tag.partition(":")[0]
        if name not in self._models:
            raise KeyError(name)
        old = self._models[name]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(self.path)
            except OSError:
                raise EngineUnavailable("the engine process is restarting; retry", RETRY_S) from None
            channel = Channel(sock)
            channel.receive()  # its greeting (MODELS)
            channel.send(record(OP_ROLLOUT, payload=json.dumps({"tag": tag}).encode()))
            fields, payload = channel.receive()
        answer = json.loads(payload)
        if fields[OP] == OP_ERROR:
            if answer["type"] == "KeyError":
                raise KeyError(answer["message"])
            if answer["type"] == "NotFound":
                import bentoml

                raise bentoml.exceptions.NotFound(answer["message"])
            raise ValueError(answer["message"])
        new_tag, card = read_card(answer["new"]["tag"])
        info = {**old.info, **card.to_dict(), "tag": new_tag, "warmup_ms": answer["new"]["warmup_ms"]}
        new = ModelView(new_tag, card, info, old.tile_side)
        self._models = {**self._models, name: new}  # the engine's MODELS record follows with the rest
        return new, old

    def close(self) -> None:
        self.closed = True
        channel, self.channel = self.channel, None
        if channel is not None:
            try:
                self.loop.remove_reader(channel.sock.fileno())
            except (RuntimeError, ValueError):  # the loop is closed already
                pass
            channel.sock.close()
        self._fail_pending("the server is shutting down")
        self.ring.close()

    # the hand-off -------------------------------------------------------------------------------------
    def _submit(self, model: str, x: np.ndarray, output: Output, k: int, threshold: float, shed: bool,
                future) -> int:
        channel = self.channel
        if channel is None:
            raise EngineUnavailable("the engine process is restarting; retry after the Retry-After "
                                    "seconds", RETRY_S)
        x = np.ascontiguousarray(x)
        need = response_offset(x.nbytes) + answer_bytes(self._models[model].card, x, output, k)
        slot = self.ring.take(need)
        put(slot.buf, x)
        rid = next(self._rids) & 0xFFFFFFFF
        with self._lock:
            self.pending[rid] = (slot, x.nbytes, future)
        data = record(OP_INFER, rid=rid, slot=slot.index, model=self.names.index(model),
                      output=OUTPUTS.index(output), k=k, threshold=threshold,
                      flags=FLAG_SHED if shed else 0, a=x, seg=slot.seg)
        if threading.get_ident() == self._loop_thread:
            self._send_soon(channel, data)
            return rid
        try:
            channel.send(data)
        except OSError:
            with self._lock:
                self.pending.pop(rid, None)
            self.ring.give(slot)
            raise EngineUnavailable("the engine process is gone; retry after the Retry-After seconds",
                                    RETRY_S) from None
        return rid

    def _send_soon(self, channel: Channel, data: bytes) -> None:
        """The event loop's requests leave once per loop turn, together: one send for all, and the
        engine reads them with one recv and runs them as one batch (process.EngineServer)."""
        channel.queue(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush, channel)

    def _flush(self, channel: Channel) -> None:
        self._flush_scheduled = False
        try:
            channel.flush()
        except OSError:
            pass  # the engine is gone: the reader sees the socket close and fails what is pending (_lost)

    def _on_readable(self) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            data = channel.sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        for fields, payload in channel.parse(data):
            if fields[OP] == OP_MODELS:
                self._set_models(json.loads(payload))
            else:
                self._answered(fields, payload)

    def _answered(self, fields: tuple, payload: bytes) -> None:
        with self._lock:
            entry = self.pending.pop(fields[RID], None)
        if entry is None:
            return
        slot, nbytes, future = entry
        value, error = None, None
        try:
            if fields[OP] == OP_RESULT:
                arrays = read_answer(slot.buf, nbytes, fields)
                value = arrays if len(arrays) == 2 else arrays[0]
            else:
                error = _error(json.loads(payload))
        finally:
            self.ring.give(slot)
        _resolve(future, value, error)

    def _lost(self) -> None:
        channel, self.channel = self.channel, None
        self.connected.clear()
        if channel is not None:
            self.loop.remove_reader(channel.sock.fileno())
            channel.sock.close()
        log.error("the engine process %s is gone: failing the requests in flight, reconnecting", self.path)
        self._fail_pending("the engine process stopped while this request was in it")
        if not self.closed:
            threading.Thread(target=self._connect, daemon=True, name="engine-connect").start()

    def _fail_pending(self, why: str) -> None:
        with self._lock:
            pending, self.pending = self.pending, {}
        for slot, _, future in pending.values():  # the engine that could write them is gone
            self.ring.give(slot)
            _resolve(future, None, EngineUnavailable(f"{why}; retry after the Retry-After seconds", RETRY_S))

    def _connect(self) -> None:
        """Until connected: the engine listens only once warmed (or again after a restart)."""
        while not self.closed:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                channel = Channel(sock)
                _, payload = channel.receive()  # MODELS: what it serves now
                channel.send(record(OP_HELLO, payload=json.dumps(
                    {"ring": self.ring.name, "slot_bytes": self.ring.slot_bytes}).encode()))
            except OSError:
                sock.close()
                time.sleep(0.05)
                continue
            self.loop.call_soon_threadsafe(self._attach, channel, json.loads(payload))
            return

    def _attach(self, channel: Channel, info: dict) -> None:
        if self.closed:
            channel.sock.close()
            return
        self._set_models(info)
        self.channel = channel
        self.loop.add_reader(channel.sock.fileno(), self._on_readable)
        self.connects += 1
        self.connected.set()
        log.info("connected to the engine process %d (%s)", info["pid"], self.path)

    def _set_models(self, info: dict) -> None:
        views = {}
        for m in info["models"]:
            card = ModelCard.from_dict(m["card"], f"{m['tag']}'s card")
            views[card.name] = ModelView(m["tag"], card, m["describe"], m["tile_side"])
        self._models, self.names, self.max_items = views, list(views), info["max_items"]


def _error(info: dict) -> Exception:
    if info["type"] == "overloaded":
        return Overloaded(info["message"], info["retry_after"] or RETRY_S)
    return RuntimeError(f"engine process: {info['message']}")


def _resolve(future, value, error: Exception | None) -> None:
    if isinstance(future, asyncio.Future):
        if future.done():  # its caller was cancelled
            return
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    elif error is None:
        future.set_result(value)
    else:
        future.set_exception(error)

