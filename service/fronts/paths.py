"""Bounded `endpoint` labels for BentoML's HTTP metrics.

BentoML 1.4's request metrics (bentoml/_internal/server/http/instruments.py,
RunnerTrafficMetricsMiddleware: request total, duration histogram, in progress) label every series by
the raw `scope["path"]`, and BentoML has no setting for it. So every distinct path a client makes up
became new series: 300 unauthenticated GETs to random paths grew /metrics from 116 KB to 2.4 MB (and
the multiprocess files under BENTOML_HOME or /tmp with it). It now sits inside our middlewares
(fronts/stack.py), so it sees only what they pass on to BentoML: never /classify, /v2 or /score_map.

`install` wraps that middleware's __call__ so that it sees a label instead of the path: a route the
service has (the OpenAPI document's paths, the open paths) keeps its path, a static prefix becomes
`<prefix>*`, anything else `/{unknown}`. The real path travels in the scope beside the label and
`Restore` (innermost: fronts/stack.py puts it there) puts it back before BentoML's router sees it,
so what a request gets is unchanged; only the label and the tracing span name (the OpenTelemetry
middleware sits between the two) are bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cached_property

UNKNOWN = "/{unknown}"
ORIGINAL = "convserve.path"  # the scope key the real path waits under while the label stands in


class Routes:
    """The label of each path: `paths` (a callable, so the OpenAPI document can be read when the first
    request comes, not at import) as they are, `prefixes` collapsed to one label each."""

    def __init__(self, paths: Callable[[], Iterable[str]], prefixes: Iterable[str] = ()) -> None:
        self._paths, self.prefixes = paths, tuple(prefixes)

    @cached_property
    def paths(self) -> frozenset[str]:
        return frozenset(self._paths())

    def label(self, path: str) -> str:
        if path in self.paths:
            return path
        for prefix in self.prefixes:
            if path.startswith(prefix):
                return f"{prefix}*"
        return UNKNOWN


def install(routes: Routes) -> None:
    """Make BentoML's HTTP metrics middleware label by `routes.label` (once per process; a second
    call replaces the routes)."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Metrics

    original = getattr(Metrics.__call__, "convserve_original", Metrics.__call__)

    async def labelled(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            label = routes.label(scope["path"])
            if label != scope["path"]:
                scope = {**scope, "path": label, ORIGINAL: scope["path"]}
        await original(self, scope, receive, send)

    labelled.convserve_original = original
    Metrics.__call__ = labelled


class Restore:
    """ASGI middleware: the real path back where `install`'s wrapper left a label."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if ORIGINAL in scope:
            scope = {**scope, "path": scope[ORIGINAL]}
            del scope[ORIGINAL]
        await self.app(scope, receive, send)
