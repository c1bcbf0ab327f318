"""Graceful drain: what a worker does between SIGTERM and exit.

    SIGTERM → /readyz answers 503 at once (load balancers and Kubernetes stop sending new work)
            → requests keep being served while any are in flight, for at most `timeout_s`
            → uvicorn's own shutdown: stop accepting, finish open responses, run on_shutdown, exit

Without this, uvicorn stops accepting the moment SIGTERM arrives while /readyz still says 200 (it was
measured answering 200 until the process was gone), so a balancer keeps routing to a server that is
leaving. A second SIGTERM skips the wait. `bentoml serve` passes SIGTERM on to every worker and waits
for them (circus, graceful_timeout of a day), so each worker drains its own requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from service.fronts.gate import Traffic
from service.pipeline.dataplane import Dataplane

log = logging.getLogger("convserve")
QUIET_S = 0.5


def install(traffic: Traffic, plane: Dataplane, timeout_s: float) -> None:
    """Take over SIGTERM in this worker; call from the event loop, in the main thread, after uvicorn
    installed its handlers (a service's __init__ runs then). Draining makes plane.ready false."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    def leave(signum, frame) -> None:
        if callable(previous):
            previous(signum, frame)  # uvicorn's handle_exit: a graceful shutdown
        else:
            signal.signal(signal.SIGTERM, previous)
            os.kill(os.getpid(), signal.SIGTERM)

    async def drain(signum, frame) -> None:
        # Leave once nothing has been in flight for QUIET_S: a client's next request often follows its
        # last answer by a few ms (a balancer needs a moment to see readiness go), and leaving at the
        # first idle instant reset those connections (seen in tests/test_reliability.py under load).
        deadline, quiet_since = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if traffic.in_flight:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= QUIET_S:
                break
            await asyncio.sleep(0.05)
        log.warning("drained (%d requests still in flight); shutting down", traffic.in_flight)
        leave(signum, frame)

    def on_sigterm(signum, frame) -> None:
        if plane.draining:
            return leave(signum, frame)
        plane.draining = True
        log.warning("SIGTERM: /readyz now says 503; draining %d requests in flight (at most %g s)",
                    traffic.in_flight, timeout_s)
        loop.call_soon_threadsafe(lambda: tasks.add(loop.create_task(drain(signum, frame))))

    signal.signal(signal.SIGTERM, on_sigterm)
