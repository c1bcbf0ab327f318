"""Our middlewares ahead of BentoML's, and BentoML's TimeoutMiddleware out.

BentoML 1.4 (_bentoml_impl/server/app.py, ServiceAppFactory.middlewares) wraps every request in its own
middlewares first and a service's `add_asgi_middleware` ones inside them: request metrics (five
multiprocess Prometheus writes per request), the OpenTelemetry check, and TimeoutMiddleware. The last is
the p99 of every hot route: per request it starts a task and schedules `loop.call_later(timeout, …)`
(60 s, or the service's traffic timeout) that is never cancelled, so each request leaves a TimerHandle,
a Future, a bound method and a Context alive for the whole timeout. At ~1,500 req/s that is ~10,000
objects a second the collector must walk: full collections grew from 4 ms to 178 ms within 30 s of
load and p99 grew with them (47 → 140 → 187 ms over three 10 s passes of /v2 on one worker); without
it, 33 → 37 → 50 ms and the heap stays flat (BENCHMARKS.md, "Where the tail was"). BentoML's
traffic.timeout must be a positive number, so it cannot be turned off by configuration.

`install` rewrites the list: the service's middlewares first (the gate, then the routes that answer
/classify, /v2, /score_map and /docs.json themselves), then BentoML's without TimeoutMiddleware (the
gate has the deadline, and cancels its timer), then fronts/paths.py's Restore, innermost, which hands
BentoML's router the real path after its metrics and tracing saw only a bounded label. So a hot request
runs only our code; a request for BentoML's own routes still gets its metrics and tracing.
"""

from __future__ import annotations

from service.fronts import paths


def install() -> None:
    """Reorder the middlewares of every service app this process builds (once; idempotent)."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.middleware import Middleware

    original = getattr(ServiceAppFactory.middlewares.fget, "convserve_original",
                       ServiceAppFactory.middlewares.fget)

    def middlewares(self) -> list[Middleware]:
        built = original(self)
        own = {cls for cls, _ in self.service.middlewares}
        ours = [m for m in built if m.cls in own]
        theirs = [m for m in built if m.cls not in own and m.cls is not TimeoutMiddleware]
        return [*ours, *theirs, Middleware(paths.Restore)]

    middlewares.convserve_original = original
    ServiceAppFactory.middlewares = property(middlewares)
