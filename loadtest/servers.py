"""Start a real server on a free loopback port, wait until it is ready, stop it: convserve (`bentoml
serve`) or the FastAPI baseline. Used by the tests and by the benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_home(home: Path, folder: Path) -> Path:
    """A BENTOML_HOME of its own that shares `home`'s models (a symlink). BentoML keeps /metrics' files
    under BENTOML_HOME and wipes them when a server starts, so two servers at once need a home each."""
    folder.mkdir(parents=True, exist_ok=True)
    if (home / "models").exists() and not (folder / "models").exists():
        (folder / "models").symlink_to((home / "models").resolve())
    return folder


class Server:
    """`bentoml serve service.service:ConvServe` with CONVSERVE_* settings given as keywords, serving
    the models of the store at `home` from a home of its own beside `log` (see own_home). `cwd`: the
    source tree whose `service` package it serves (this checkout's by default). Its gRPC front listens
    on a free loopback port of its own too (`grpc_target`), not on 8001, which servers side by side
    would share (SO_REUSEPORT with several workers) or fight over."""

    ready_path = "/readyz"

    def __init__(self, home: Path, log: Path, cwd: Path = ROOT, env: dict[str, str] | None = None,
                 **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = {"grpc_port": free_port(), "grpc_host": "127.0.0.1", **settings}
        self.grpc_target = f"127.0.0.1:{settings['grpc_port']}"
        self.log = log
        self.home = own_home(Path(home), log.parent / f"{log.stem}.home")
        env = {**os.environ, **(env or {}), "BENTOML_HOME": str(self.home), "BENTOML_DO_NOT_TRACK": "true",
               **{f"CONVSERVE_{k.upper()}": str(v) for k, v in settings.items()}}
        self.process = subprocess.Popen(self.command(), cwd=cwd, env=env, stdout=open(log, "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def command(self) -> list[str]:
        cli = Path(sys.executable).with_name("bentoml")  # none beside python: a --target install (gpu.sh)
        return [*([str(cli)] if cli.exists() else [sys.executable, "-m", "bentoml"]), "serve",
                "service.service:ConvServe",
                "--host", "127.0.0.1", "--port", str(self.port)]

    def readiness(self, timeout: float = 120) -> list[int]:
        """Poll until ready (200); returns the statuses seen (0 = no answer yet)."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                status = httpx.get(f"{self.url}{self.ready_path}", timeout=1).status_code
            except httpx.HTTPError:
                status = 0
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.05)
        raise TimeoutError(f"not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> Server:
        self.readiness()
        return self

    def __exit__(self, *_) -> None:
        self.stop()


class BaselineServer(Server):
    """`python -m loadtest.baseline` (FastAPI + uvicorn + onnxruntime) on the same store."""

    ready_path = "/docs"

    def __init__(self, home: Path, log: Path, model: str = "lenet5", workers: int = 1,
                 threads: int = 1) -> None:
        self.model, self.workers, self.threads = model, workers, threads
        super().__init__(home, log)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "loadtest.baseline", "--port", str(self.port), "--model", self.model,
                "--workers", str(self.workers), "--threads", str(self.threads)]


TRITON_VENV = ROOT / ".venv-triton"  # `make bench-triton-venv`


def triton_python(venv: Path = TRITON_VENV) -> Path | None:
    """The Triton venv's Python, or None where `make bench-triton-venv` has not made it."""
    python = venv / "bin" / "python"
    return python if python.exists() and (venv / ".installed").exists() else None


def stored_model(home: Path, model: str) -> tuple[Path, dict]:
    """The store's latest `model`: its model.onnx and its card (the model's metadata), read from the
    store's files (latest, model.yaml) as a process without bentoml can."""
    import yaml

    folder = home / "models" / model
    folder = folder / (folder / "latest").read_text().strip()
    return folder / "model.onnx", yaml.safe_load((folder / "model.yaml").read_text())["metadata"]


class TritonServer(Server):
    """loadtest/triton_peer.py: `model` from the store at `home` served by PyTriton (tritonserver's HTTP
    and gRPC fronts, its dynamic batcher) under the Triton venv's Python 3.12. Triton's Python backend
    stub loads libpython3.12.so: LD_LIBRARY_PATH points at the lib/ of the Python the venv was made
    from (pyvenv.cfg's home), else the stub finds another libpython (Debian's 3.11) and fails.
    tritonserver is a child of that Python, and outlives it when only its parent is stopped: stop()
    signals the whole process group (start_new_session). `grpc_port` is there for a gRPC race.

    max_queue_delay_us: how long Triton's batcher may hold a request for a fuller batch. 100 µs: under
    1 % of a request's p50 at 32 connections (~12 ms here), and no measurable cost or gain on this
    2-core machine: FP32 bodies, 2 rounds × 3 s each, twice (load average 5-8 from other work), gave
    0 µs 2358 / 1731 req/s (mean batch 16.1 / 8.2), 100 µs 1693 / 1838 (15.0 / 15.6), 500 µs 1496 /
    2031 (15.8 / 19.0), rounds of one setting 0.35-1.4× apart: at 32 connections requests queue while
    PyTriton's Python model runs a batch, so batches fill without waiting. convserve waits 0 ms
    (CONVSERVE_BATCH_WAIT_MS) and batches what queued while the model ran. max_batch_size 64 is
    convserve's CONVSERVE_MAX_BATCH_SIZE."""

    ready_path = "/v2/models/lenet5/ready"

    def __init__(self, home: Path, log: Path, model: str = "lenet5", venv: Path = TRITON_VENV,
                 max_batch_size: int = 64, max_queue_delay_us: int = 100, threads: int = 1) -> None:
        self.max_batch_size, self.max_queue_delay_us, self.threads = max_batch_size, max_queue_delay_us, \
            threads
        python = triton_python(venv)
        if python is None:
            raise RuntimeError(f"no Triton venv at {venv}: make bench-triton-venv")
        onnx, meta = stored_model(Path(home), model)
        spec = ("mode", "width", "height", "channels", "mean", "std", "scale")  # what the peer needs
        card = {**{k: meta["input"][k] for k in spec}, "labels": meta["labels"]}
        self.port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"  # as Server's: for bench/grpc_race.py
        self.log, self.ready_path = log, f"/v2/models/{model}/ready"
        # PyTriton's workspace (its zmq sockets, tritonserver's model store): a short path, since a unix
        # socket's path has at most 107 bytes (a pytest tmp_path ran over), removed by stop() even when
        # the peer had to be killed (its own default, under ~/.cache/pytriton, then stays behind)
        self.workspace = Path(tempfile.mkdtemp(prefix="pytriton-"))
        base = next(line.split("=", 1)[1].strip() for line in (venv / "pyvenv.cfg").read_text().splitlines()
                    if line.startswith("home"))
        lib = str(Path(base).parent / "lib")
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [lib, os.environ.get(
            "LD_LIBRARY_PATH")])), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [str(python), str(ROOT / "loadtest" / "triton_peer.py"), "--onnx", str(onnx),
                   "--card", json.dumps(card), "--name", model, "--http-port", str(self.port),
                   "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
                   "--workspace", str(self.workspace / "w"), "--threads", str(threads),
                   "--max-batch-size", str(max_batch_size), "--max-queue-delay-us", str(max_queue_delay_us)]
        self.process = subprocess.Popen(command, cwd=log.parent, env=env, stdout=open(log, "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> TritonServer:
        try:
            self.readiness(timeout=180)  # ~15 s on an idle 2-core machine: tritonserver, then the model
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to the group (PyTriton stops tritonserver; tritonserver also stops on its own), then
        SIGKILL to whatever of the group is left, the Python parent gone or not."""
        pid = self.process.pid
        if self.process.poll() is None:
            os.killpg(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(100):  # the group outlives its leader: wait for tritonserver and the proxies too
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
            self.process.wait()
        shutil.rmtree(self.workspace, ignore_errors=True)
