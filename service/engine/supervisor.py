"""Start, watch and restart the engine processes (process.py): one per device, one per server.

Where it hooks into BentoML 1.4: `bentoml serve` imports the service module once in its own main
process (_bentoml_impl/server/serving.py serve_http → loader.load) before its circus arbiter spawns
the HTTP workers, each of which imports it again. So the first import in a process that has no engine
address in its environment is the server's main process: it starts the engine processes, here, and puts
their socket paths in the environment, which the workers inherit (circus watchers copy os.environ;
store.py's provider check uses the same pattern). Why not the alternatives: a first-worker-under-a-
file-lock engine dies with that worker (BentoML restarts workers; test_reliability kills one), and a
BentoML dependency service is an HTTP service, a serializing proxy (1.4-4 ms per call, batcher.py)
rather than shared memory. The main process lives exactly as long as the server, so the engines do too:
each watches its stdin, a pipe from here, and exits when it closes.

Restart: a thread per engine waits for its process; when it exits it is started again at once (again
after 1, 2, 4 … 30 s when it keeps dying within 10 s of its start: a broken model store must not spin a
core). Workers fail their in-flight requests with 503 as soon as their connection drops, say not ready,
and reconnect to the new process once it has loaded and warmed (remote.py).

Devices: one engine on the CPU; with CUDA, one per GPU (provider.gpu_ids), each given its device with
CONVSERVE_CUDA_DEVICE and so its own CUDA context; a worker uses the engine at its pid modulo their
number.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from service.engine.provider import gpu_ids, wants_cuda
from service.settings import Settings

log = logging.getLogger("convserve")

SOCKETS = "_CONVSERVE_ENGINE_SOCKETS"  # comma-separated socket paths, one per engine process


def supervise(settings: Settings, env: dict[str, str] | None = None) -> list[Supervisor]:
    """In the server's main process with CONVSERVE_ENGINE=process: start an engine per device and
    publish their addresses to the workers. Elsewhere (a worker, the local engine): nothing."""
    if settings.engine != "process" or os.environ.get(SOCKETS):
        return []
    if env is None:  # where BentoML's workers write /metrics' files (it sets this only in their env)
        from bentoml._internal.configuration.containers import BentoMLContainer

        env = {"PROMETHEUS_MULTIPROC_DIR": BentoMLContainer.prometheus_multiproc_dir.get()}
    folder = tempfile.mkdtemp(prefix="convserve-engine-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    devices = [f"cuda{i}" for i in gpu_ids(settings)] if wants_cuda(settings) else ["cpu"]
    supervisors = []
    for device in devices:
        extra = {**(env or {}), "CONVSERVE_WORKERS": "1"}  # one engine per device: threads = its cores
        if device.startswith("cuda"):
            extra["CONVSERVE_CUDA_DEVICE"] = device[4:]
        supervisors.append(Supervisor(os.path.join(folder, f"{device}.sock"), extra))
    os.environ[SOCKETS] = ",".join(s.path for s in supervisors)
    for s in supervisors:
        s.start()
    return supervisors


class Supervisor:
    def __init__(self, path: str, env: dict[str, str]) -> None:
        self.path, self.env = path, env
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.stopping = False

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="engine-supervisor").start()
        atexit.register(self.stop)

    def _run(self) -> None:
        failures = 0
        while not self.stopping:
            started = time.monotonic()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.engine.process", "--socket", self.path],
                stdin=subprocess.PIPE, env={**os.environ, **self.env})
            self.starts += 1
            log.info("engine process %d started for %s", self.process.pid, self.path)
            try:
                code = self.process.wait()
            except ChildProcessError:  # circus's arbiter reaps every child (waitpid(-1)): ours too
                code = None
            if self.stopping:
                return
            lived = time.monotonic() - started
            failures = failures + 1 if lived < 10 else 0
            log.error("engine process %d exited (%s) after %.1f s; restarting", self.process.pid,
                      "status lost" if code is None else code, lived)
            time.sleep(min(30.0, 2.0 ** (failures - 1)) if failures else 0.0)

    def stop(self) -> None:
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
