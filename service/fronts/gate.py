"""The gate every HTTP request passes first: who is asking, is the body all here, is there room, and
what the answer looks like when it is an error. One pure-ASGI middleware, outermost, so that what it
decides holds for every route (/classify's raw handler and BentoML's APIs alike):

    request ID  X-Request-ID taken (if sane) or made; echoed on every response, in error bodies and
                in the access line
    API keys    with CONVSERVE_API_KEYS set, every route but health, metrics and docs needs
                `Authorization: Bearer <key>` (401 otherwise); /admin/ routes need one of
                CONVSERVE_ADMIN_KEYS instead (401 otherwise; with none, the route answers 403)
    body        read in full before a request may take an inference slot, so stalled uploads hold
                nothing but their socket; a client that goes quiet mid-body gets 408, an oversized
                body 413
    admission   at most `max_concurrency` requests past the gate per worker; beyond it 429 with
                Retry-After, answered at once; routes with a limit of their own (/score_map: one
                running, `max_dense_queue` waiting) get 503 beyond it, also before their body is
                read (the engine sheds too: 503 when a model's queue is full)
    deadline    a request not answered within `timeout_s` gets 504 (its queued work is cancelled)
    errors      every status ≥ 400 in fronts/asgi.py's one JSON shape, with the request ID
    log lines   what the client sent (the path) with control characters escaped: a `%0a` in a URL
                cannot forge a line

Written by hand, and BentoML's own traffic middlewares turned off (max_concurrency) or removed
(timeout: fronts/stack.py): they count a request from its first byte (300 stalled uploads took all
256 slots and locked everyone out: issue 12), answer in their own error shape, send no Retry-After,
and the timeout's never-cancelled timers were the p99 under load.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import Gauge

from service.errors import Overloaded
from service.fronts.asgi import (
    REQUEST_ID,
    TYPES,
    ServiceError,
    body,
    header,
    header_bytes,
    is_length,
    read_body,
    replay,
    request_id,
    reshape,
)
from service.pipeline.cost import MemoryBudget
from service.settings import keys

log = logging.getLogger("convserve.access")
# What an autoscaler should scale on (deploy/overlays/keda): work admitted and not yet answered,
# summed over a pod's worker processes.
IN_FLIGHT = Gauge("convserve_in_flight_requests", "requests admitted by the gate and not yet answered",
                  multiprocess_mode="livesum")
# Health, metrics, docs and the demo page stay open (probes and scrapers carry no keys; the page asks
# for one itself) and are never shed.
OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json", "/",
                        "/ui", "/ui/", "/v2/health/live", "/v2/health/ready"})
OPEN_PREFIXES = ("/static_content/", "/assets/")

@dataclass
class Traffic:
    """What the gate knows of this worker's load; the drain (fronts/drain.py) reads it."""

    in_flight: int = 0
    # EWMA of seconds from admission to answer: about when a slot frees up, so a shed client's
    # Retry-After (rounded up to whole seconds, as HTTP wants)
    latency_s: float = 0.01
    by_route: dict[str, int] = field(default_factory=dict)  # in flight, for routes with a limit
    route_latency_s: dict[str, float] = field(default_factory=dict)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def key_digests(setting: str | None) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys(setting)]


def loggable(text: str) -> str:
    """Client text for a log line: control and other unprintable characters escaped as \\n, \\x1b,
    \\u2028…, so that no request can start a line of its own or move the terminal's cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def authorized(scope, digests: list[bytes]) -> bool:
    return bearer_matches(header_bytes(scope, b"authorization"), digests)


def bearer_matches(value: bytes, digests: list[bytes]) -> bool:
    """An Authorization value (HTTP header or gRPC metadata) against every key, in constant time:
    digests of equal length, no early exit."""
    scheme, _, token = value.partition(b" ")
    offered = hashlib.sha256(token.strip()).digest()
    match = False
    for digest in digests:
        match |= hmac.compare_digest(offered, digest)
    return match and scheme.lower() == b"bearer"


class Gate:
    def __init__(self, app, settings, traffic: Traffic, budget: MemoryBudget,
                 route_limits: dict[str, int] | None = None) -> None:
        self.app, self.traffic, self.route_limits = app, traffic, route_limits or {}
        self.budget = budget  # bodies being read count against the worker's memory with its dense work
        self.limit, self.idle_timeout_s = settings.max_request_bytes, settings.body_timeout_s
        self.max_in_flight, self.timeout_s = settings.max_concurrency, settings.timeout_s
        self.digests = key_digests(settings.api_keys)
        self.admin_digests = key_digests(settings.admin_keys)
        self.access_log = settings.access_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        rid = request_id(scope)
        token = REQUEST_ID.set(rid)
        response = Response(send, rid, protocol_errors=scope["path"].startswith("/v2"))
        try:
            if is_open(scope["path"]):
                await self.app(scope, receive, response.send)
            else:
                await self._guarded(scope, receive, response)
        except ServiceError as e:
            await response.error(e.status, e.type, e.message, e.headers())
        except ConnectionResetError:
            response.status = 499  # nginx's "client closed request", for the access line only
        except Exception:  # noqa: BLE001 - a bug still gets our JSON shape; the log gets the trace
            log.exception("%s %s failed (request_id=%s)", scope["method"], loggable(scope["path"]), rid)
            await response.error(500, "internal_error", "internal error; see the server log", {})
        finally:
            REQUEST_ID.reset(token)
            if self.access_log and (response.status >= 400 or not is_open(scope["path"])):
                log.info("%s %s %d %.1fms request_id=%s", scope["method"], loggable(scope["path"]),
                         response.status, (time.perf_counter() - started) * 1000, rid)

    async def _guarded(self, scope, receive, response: Response) -> None:
        traffic, path = self.traffic, scope["path"]
        # /admin/ changes what the server answers: admin keys only (without any, the route itself says
        # 403: bento.roll_out)
        if path.startswith("/admin/") and self.admin_digests:
            if not authorized(scope, self.admin_digests):
                raise ServiceError(401, "missing or wrong admin key: send `Authorization: Bearer <key>` "
                                        "with one of the server's CONVSERVE_ADMIN_KEYS (API keys do not "
                                        "roll out models)")
        elif self.digests and not authorized(scope, self.digests):
            raise ServiceError(401, "missing or wrong API key: send `Authorization: Bearer <key>` with "
                                    "one of the server's CONVSERVE_API_KEYS")
        self._admissible(path)  # already full: refuse before reading the body, so refusing stays cheap
        declared = header(scope, b"content-length")
        if declared is not None and is_length(declared):
            size = min(int(declared), self.limit)
        else:  # chunked: as much as the limit allows; no body at all: nothing
            size = self.limit if header(scope, b"transfer-encoding") else 0
        try:
            self.budget.reserve(size, traffic.latency_s, "this request's body")
        except Overloaded as e:
            raise ServiceError(503, e.message, "overloaded", e.retry_after) from None
        try:
            data = await read_body(scope, receive, self.limit, self.idle_timeout_s)
            self._admissible(path)  # still room now that the body is here
            await self._admitted(scope, receive, response, data)
        finally:
            self.budget.release(size)

    async def _admitted(self, scope, receive, response: Response, data: bytes) -> None:
        traffic, path = self.traffic, scope["path"]
        traffic.in_flight += 1
        IN_FLIGHT.inc()
        limited = path in self.route_limits
        if limited:
            traffic.by_route[path] = traffic.by_route.get(path, 0) + 1
        admitted = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.app(scope, replay(data, receive), response.send)
        except TimeoutError:
            raise ServiceError(504, f"not answered within {self.timeout_s} s (CONVSERVE_TIMEOUT_S); "
                                    f"send fewer or smaller images per request") from None
        finally:
            traffic.in_flight -= 1
            IN_FLIGHT.dec()
            spent = time.perf_counter() - admitted
            traffic.latency_s += 0.05 * (spent - traffic.latency_s)
            if limited:
                traffic.by_route[path] -= 1
                last = traffic.route_latency_s.get(path, spent)
                traffic.route_latency_s[path] = last + 0.2 * (spent - last)

    def _admissible(self, path: str) -> None:
        traffic = self.traffic
        if traffic.in_flight >= self.max_in_flight:
            raise ServiceError(429, f"{traffic.in_flight} requests in flight, this worker's limit "
                                    f"(CONVSERVE_MAX_CONCURRENCY); retry after the Retry-After seconds",
                               retry_after=traffic.latency_s)
        limit, busy = self.route_limits.get(path), traffic.by_route.get(path, 0)
        if limit is not None and busy >= limit:
            raise ServiceError(503, f"{busy} {path} requests already running or waiting, this worker's "
                                    f"limit; retry after the Retry-After seconds", "overloaded",
                               retry_after=traffic.route_latency_s.get(path, 1.0))


class Response:
    """The send side: adds X-Request-ID to every response and rewrites error bodies into our shape
    (with the request ID; Retry-After on 429 and 503). Under /v2 the Open Inference Protocol's shape,
    {"error": "message"}, is kept: its clients read that (fronts/kserve_v2.py)."""

    def __init__(self, send, rid: str, protocol_errors: bool = False) -> None:
        self._send, self.rid, self.protocol_errors = send, rid, protocol_errors
        self.status, self.started = 0, False
        self._start: dict = {}
        self._chunks: list[bytes] = []

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
            if self.status < 400 or self.protocol_errors:  # /v2 writes the protocol's bodies itself
                headers = [*message.get("headers", []), (b"x-request-id", self.rid.encode())]
                return await self._send({**message, "headers": headers})
            self._start = message
            return None
        if self.status < 400 or self.protocol_errors:
            return await self._send(message)
        self._chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            payload = reshape(self.status, b"".join(self._chunks))
            headers = [(k, v) for k, v in self._start.get("headers", [])
                       if k.lower() not in (b"content-length", b"content-type")]
            await self._write(self.status, payload, headers)
        return None

    async def error(self, status: int, type_: str, message: str, headers: dict[str, str]) -> None:
        if self.started:  # the answer is already on its way; nothing more can be said
            return
        self.status, self.started = status, True
        extra = [(k.encode(), v.encode()) for k, v in headers.items()]
        if status == 401:
            extra.append((b"www-authenticate", b'Bearer realm="convserve"'))
        await self._write(status, body(status, type_, message), extra)

    async def _write(self, status: int, payload: dict, headers: list) -> None:
        payload["error"]["request_id"] = self.rid
        payload["error"].setdefault("type", TYPES.get(status, "error"))
        if self.protocol_errors:
            payload = {"error": payload["error"]["message"]}
        if status in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in headers):
            headers.append((b"retry-after", b"1"))
        out = json.dumps(payload, ensure_ascii=False).encode()
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode()),
                    (b"x-request-id", self.rid.encode())]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": out})
