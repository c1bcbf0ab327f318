"""Start a real server on a free loopback port, wait until it is ready, stop it: convserve (`bentoml
serve`) or the FastAPI baseline. Used by the tests and by the benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
        return [str(Path(sys.executable).with_name("bentoml")), "serve", "service.service:ConvServe",
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
