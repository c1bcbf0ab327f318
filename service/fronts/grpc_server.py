"""The gRPC front's server: where it listens, who may call, what a call may cost, how long it may take,
what its refusals look like, and how it ends. The servicer (what each method answers) is grpc_v2.py.

    port        CONVSERVE_GRPC_PORT, default 8001: Triton's gRPC port (HTTP 8000, gRPC 8001, metrics
                8002), so a Triton client's defaults find it; 0 turns the front off. Every BentoML
                worker serves it on its own event loop (grpc.aio), on one port shared with
                SO_REUSEPORT (the kernel spreads connections); with one worker SO_REUSEPORT is off,
                so that a second server on the same port fails to start instead of sharing it.
    keys        with CONVSERVE_API_KEYS set, every method but ServerLive, ServerReady and
                grpc.health.v1 needs metadata `authorization: Bearer <key>` (UNAUTHENTICATED)
    size        a message over CONVSERVE_MAX_REQUEST_BYTES is refused by gRPC itself, before it is
                read whole (RESOURCE_EXHAUSTED, as HTTP's 413); one that fits is counted against
                the worker's memory budget while it is handled, with HTTP's bodies and dense jobs
    admission   one count of calls in flight per worker with HTTP's (fronts/gate.py's Traffic): past
                CONVSERVE_MAX_CONCURRENCY, RESOURCE_EXHAUSTED with trailing metadata `retry-after`
                (seconds); the data plane's own shedding (a full model queue, the dense queue, the
                memory budget) answers the same
    deadline    the client's (grpc cancels the call when it passes: a dense job stops at its next
                tile), and at most CONVSERVE_TIMEOUT_S of ours (DEADLINE_EXCEEDED)
    readiness   ModelInfer answers UNAVAILABLE (retry-after) until the models are warm and once the
                worker drains; grpc.health.v1 says NOT_SERVING then, for Kubernetes' gRPC probes
    drain       SIGTERM (fronts/drain.py) waits for calls in flight as for requests; at shutdown the
                server stops with CONVSERVE_TIMEOUT_S of grace
    errors      one table, GRPC_STATUS, from domain errors to status codes; every refusal's details
                say what to change, and trailing metadata carries `x-request-id`
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.errors import DomainError, InvalidInput, Overloaded, TooLarge, UnknownModel, Unsupported
from service.fronts.asgi import REQUEST_ID, REQUEST_SECONDS, PlaneHandle, taken_or_made
from service.fronts.gate import IN_FLIGHT, Traffic, bearer_matches, key_digests
from service.fronts.grpc_v2 import InferenceServicer
from service.fronts.triton_proto import grpc_service_pb2_grpc as pb_grpc
from service.pipeline.cost import MemoryBudget

log = logging.getLogger("convserve.access")
SERVICE = "inference.GRPCInferenceService"
INFER = f"/{SERVICE}/ModelInfer"
OPEN = frozenset({f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady"})  # and grpc.health.v1, not guarded
Code = grpc.StatusCode
# The domain's errors as status codes (fronts/asgi.py REST_STATUS and fronts/kserve_v2.py V2_STATUS
# are HTTP's tables). TooLarge is RESOURCE_EXHAUSTED as gRPC itself answers an oversized message;
# only Overloaded carries `retry-after`, so a client retries what has it and changes what has not.
GRPC_STATUS: dict[type[DomainError], grpc.StatusCode] = {
    InvalidInput: Code.INVALID_ARGUMENT, Unsupported: Code.INVALID_ARGUMENT,
    TooLarge: Code.RESOURCE_EXHAUSTED, UnknownModel: Code.NOT_FOUND, Overloaded: Code.RESOURCE_EXHAUSTED}
WARMING_RETRY_S = 1.0


class Refusal(Exception):
    """A call refused before or around the data plane, with its code and, for 'come back', a delay."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after

    @classmethod
    def of(cls, error: DomainError) -> Refusal:
        code = next(c for kind, c in GRPC_STATUS.items() if isinstance(error, kind))
        return cls(code, error.message, error.retry_after)


class Guard(grpc.aio.ServerInterceptor):
    """Keys, readiness, admission, deadline, error mapping and the access line, around every unary
    method of the inference service (gRPC's interceptor: one place for all methods, as the gate is
    for every HTTP route)."""

    def __init__(self, plane: PlaneHandle, settings, traffic: Traffic, budget: MemoryBudget) -> None:
        self.plane, self.traffic, self.budget = plane, traffic, budget
        self.digests = key_digests(settings.api_keys)
        self.max_in_flight, self.timeout_s = settings.max_concurrency, settings.timeout_s
        self.access_log = settings.access_log
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        method = details.method
        if method in self._handlers:
            return self._handlers[method]
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not method.startswith(f"/{SERVICE}/"):
            return handler  # health, streaming (unimplemented), unknown methods: gRPC's own answers
        behavior = handler.unary_unary

        async def guarded(request, context):
            return await self.call(method, behavior, request, context)

        self._handlers[method] = grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
        return self._handlers[method]

    async def call(self, method: str, behavior, request, context):
        started = time.perf_counter()
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        rid = taken_or_made(metadata.get("x-request-id"))
        token = REQUEST_ID.set(rid)
        code = Code.OK
        try:
            try:
                if method in OPEN:
                    response = await answer(behavior, request, context)
                else:
                    response = await self._guarded(method, behavior, request, context, metadata)
                context.set_trailing_metadata((("x-request-id", rid),))
                return response
            except DomainError as e:
                raise Refusal.of(e) from None
            except NotImplementedError:  # the generated servicer's default for methods not served
                raise Refusal(Code.UNIMPLEMENTED, f"{method} is not served by convserve; it serves "
                                                  f"health, metadata, ModelConfig and ModelInfer") from None
        except Refusal as e:
            code = e.code
            trailing = [("x-request-id", rid)]
            if e.retry_after is not None:
                trailing.append(("retry-after", str(max(1, math.ceil(e.retry_after)))))
            await context.abort(e.code, e.message, tuple(trailing))
        except asyncio.CancelledError:  # the client's deadline passed or it went away: no one to answer
            code = Code.CANCELLED
            raise
        except Exception as e:  # noqa: BLE001 - a bug still gets a status; the log gets the trace
            if isinstance(e, grpc.aio.AbortError):
                raise
            code = Code.INTERNAL
            log.exception("grpc %s failed (request_id=%s)", method, rid)
            await context.abort(Code.INTERNAL, f"internal error; see the server log (request_id={rid})",
                                (("x-request-id", rid),))
        finally:
            REQUEST_ID.reset(token)
            spent = time.perf_counter() - started
            if method == INFER:
                REQUEST_SECONDS.labels(endpoint="grpc/ModelInfer", status=code.name).observe(spent)
            if self.access_log and (code != Code.OK or method not in OPEN):
                log.info("grpc %s %s %.1fms request_id=%s", method, code.name, spent * 1000, rid)

    async def _guarded(self, method: str, behavior, request, context, metadata: dict[str, str]):
        traffic = self.traffic
        if self.digests and not bearer_matches(metadata.get("authorization", "").encode(), self.digests):
            raise Refusal(Code.UNAUTHENTICATED, "missing or wrong API key: send metadata `authorization: "
                                                "Bearer <key>` with one of the server's CONVSERVE_API_KEYS")
        if method == INFER:
            plane = self.plane()
            if plane.draining:
                raise Refusal(Code.UNAVAILABLE, "this worker is shutting down (SIGTERM); retry: another "
                                                "replica, or this server once restarted, answers",
                              WARMING_RETRY_S)
            if not plane.warmed:
                raise Refusal(Code.UNAVAILABLE, "the models are still warming up; retry after the "
                                                "retry-after seconds", WARMING_RETRY_S)
        if traffic.in_flight >= self.max_in_flight:
            raise Refusal(Code.RESOURCE_EXHAUSTED, f"{traffic.in_flight} calls and requests in flight, this "
                                                   f"worker's limit (CONVSERVE_MAX_CONCURRENCY); retry after "
                                                   f"the retry-after seconds", traffic.latency_s)
        # gRPC has read the whole message already (at most the size limit); counting it while the call
        # runs keeps the worker's memory budget right for the dense work admitted beside it
        size = request.ByteSize()
        self.budget.reserve(size, traffic.latency_s, "this call's message")
        traffic.in_flight += 1
        IN_FLIGHT.inc()
        admitted = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await answer(behavior, request, context)
        except TimeoutError:
            raise Refusal(Code.DEADLINE_EXCEEDED, f"not answered within {self.timeout_s} s "
                                                  f"(CONVSERVE_TIMEOUT_S); send fewer or smaller images "
                                                  f"per call") from None
        finally:
            self.budget.release(size)
            traffic.in_flight -= 1
            IN_FLIGHT.dec()
            traffic.latency_s += 0.05 * (time.perf_counter() - admitted - traffic.latency_s)


async def answer(behavior, request, context):
    result = behavior(request, context)  # the unimplemented methods are plain functions
    return await result if inspect.isawaitable(result) else result


@dataclass
class GrpcFront:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    watcher: asyncio.Task
    port: int

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, then no new calls; calls in flight get `grace_s` to finish."""
        self.watcher.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start(plane: PlaneHandle, settings, traffic: Traffic, budget: MemoryBudget) -> GrpcFront | None:
    """Serve the gRPC front in this worker, on its running event loop; None when the port is 0.
    Fails (and so the worker does) when the port cannot be bound."""
    if not settings.grpc_port:
        return None
    options = [("grpc.max_receive_message_length", settings.max_request_bytes),
               ("grpc.so_reuseport", 1 if settings.workers > 1 else 0)]
    server = grpc.aio.server(interceptors=[Guard(plane, settings, traffic, budget)], options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane, settings), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    host = settings.grpc_host
    port = server.add_insecure_port(f"[{host}]:{settings.grpc_port}" if ":" in host
                                    else f"{host}:{settings.grpc_port}")
    await server.start()
    watcher = asyncio.create_task(watch(plane, checks))
    logging.getLogger("convserve").info("gRPC (inference.GRPCInferenceService) on %s:%d", host, port)
    return GrpcFront(server, checks, watcher, port)


async def watch(plane: PlaneHandle, checks: health.aio.HealthServicer) -> None:
    """grpc.health.v1 follows readiness: NOT_SERVING until warm, SERVING, NOT_SERVING for good once
    draining. Polled every 0.1 s (a probe's period is seconds), for the whole server ("") and the
    inference service by name."""
    serving = health_pb2.HealthCheckResponse
    status = None
    while True:
        dataplane = plane()
        if dataplane.draining:
            await checks.enter_graceful_shutdown()
            return
        now = serving.SERVING if dataplane.ready else serving.NOT_SERVING
        if now != status:
            status = now
            for service in ("", SERVICE):
                await checks.set(service, status)
        await asyncio.sleep(0.1)
