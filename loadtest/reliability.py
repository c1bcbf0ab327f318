"""The operator's reliability table (issue 12), measured against fresh loopback servers:

    python -m loadtest.reliability --out results/reliability        (about 3 minutes)

1. 600 concurrent POST /classify (one digit each) at the default settings
2. overload: 4× the in-flight limit in closed loops vs one client alone (accepted p99)
3. 300 concurrent POST /score_map of 1024² pages
4. 300 uploads that stall mid-body, then one normal /classify
5. SIGTERM during a long /score_map: /readyz, the request, the exit
6. one of two workers killed with SIGKILL under load: failures, respawn, throughput by second

Writes reliability.json and prints a markdown table (RELIABILITY.md holds the last one). The store is
$BENTOML_HOME's. Timings are this machine's; compare only within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvloop
from PIL import Image

from loadtest.servers import Server
from loadtest.soak import worker_processes


def png(side: int) -> bytes:
    out, noise = io.BytesIO(), np.random.default_rng(0).random((side, side))
    Image.fromarray((noise * 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


DIGIT, PAGE = png(28), png(1024)


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def request(route: str, image: bytes, fields: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 multipart POST, serialized once and sent as often as needed."""
    parts = [b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n' + image]
    parts += [f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}'.encode()
              for k, v in (fields or {}).items()]
    body = b"\r\n".join(parts) + b"\r\n--b--\r\n"
    return (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary=b\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


CLASSIFY = request("/classify", DIGIT)


class Connection:
    """A bare HTTP/1.1 client on asyncio streams. Written by hand because the measuring client must
    cost far less than the server it measures: httpx spent ~1 ms of CPU per request here (600 at
    once took it 5 s, the server 0.3 s); this one sends prepared bytes and reads the answer."""

    def __init__(self, port: int) -> None:
        self.port, self.reader, self.writer = port, None, None

    async def exchange(self, raw: bytes) -> tuple[int | str, float, dict]:
        started = time.perf_counter()
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writer.write(raw)
            await self.writer.drain()
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
            await self.reader.readexactly(int(headers.get("content-length", 0)))
            if headers.get("connection") == "close":
                self.close()
            return int(head[0].split(" ")[1]), time.perf_counter() - started, headers
        except (OSError, asyncio.IncompleteReadError) as e:
            self.close()
            return type(e).__name__, time.perf_counter() - started, {}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def burst(port: int, raw: bytes, n: int) -> list:
    """n connections opened first, then one request on each, all at once: [(status, s, headers)]."""
    connections = [Connection(port) for _ in range(n)]
    for c in connections:
        c.reader, c.writer = await asyncio.open_connection("127.0.0.1", port)
    results = await asyncio.gather(*(c.exchange(raw) for c in connections))
    for c in connections:
        c.close()
    return results


async def closed_loops(port: int, raw: bytes, clients: int, seconds: float) -> list:
    """`clients` connections, each sending its next request when the last is answered: [(status, s,
    headers, monotonic time answered)]."""
    deadline = time.monotonic() + seconds
    out = []

    async def loop():
        c = Connection(port)
        while time.monotonic() < deadline:
            status, spent, headers = await c.exchange(raw)
            out.append((status, spent, headers, time.monotonic()))
        c.close()

    await asyncio.gather(*(loop() for _ in range(clients)))
    return out


def split(results: list) -> dict:
    statuses: dict[str, int] = {}
    for status, *_ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok = [r[1] for r in results if r[0] == 200]
    shed = [r[1] for r in results if r[0] in (429, 503)]
    return {"statuses": statuses, "accepted_p50_ms": pct(ok, 50), "accepted_p99_ms": pct(ok, 99),
            "accepted_max_ms": pct(ok, 100), "shed_p50_ms": pct(shed, 50), "shed_max_ms": pct(shed, 100),
            "retry_after_on_every_shed": all("retry-after" in r[2] for r in results if r[0] in (429, 503))}


def server_times(log: Path) -> dict:
    """The gate's access lines → per `METHOD path status`: count and p50/p99/max of the time the server
    spent (from the gate's first look to the answer; the client's clock adds its own queueing)."""
    times: dict[str, list[float]] = {}
    for line in log.read_text().splitlines():
        words = line.split()
        if "[convserve.access:" in line and len(words) >= 7 and words[-2].endswith("ms"):
            times.setdefault(" ".join(words[-5:-2]), []).append(float(words[-2][:-2]) / 1000)
    return {k: {"n": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "max_ms": pct(v, 100)}
            for k, v in sorted(times.items()) if k.startswith("POST")}


def stalled_uploads(srv: Server, n: int) -> dict:
    sockets = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 5000\r\n\r\n--b\r\n")
        sockets.append(s)
    started = time.perf_counter()
    normal = httpx.post(f"{srv.url}/classify", files={"image": ("d.png", DIGIT)}, timeout=60)
    normal_s = time.perf_counter() - started
    answers = [s.recv(64).split(b" ")[1].decode() for s in sockets]
    for s in sockets:
        s.close()
    return {"normal_status": normal.status_code, "normal_ms": round(normal_s * 1000, 1),
            "stalled_answers": {a: answers.count(a) for a in set(answers)},
            "stalled_answered_after_s": round(time.perf_counter() - started, 1)}


def sigterm(home: Path, out: Path) -> dict:
    srv = Server(home, out / "sigterm.log")
    srv.readiness()
    slow: list = []
    t = threading.Thread(target=lambda: slow.append(httpx.post(
        f"{srv.url}/score_map", files={"image": ("p.png", PAGE)},
        data={"stride_factor": "4", "scales": "1,2"}, timeout=120).status_code))
    t.start()
    time.sleep(1)
    signalled = time.monotonic()
    srv.process.send_signal(signal.SIGTERM)
    ready = []
    while t.is_alive():
        ready.append(httpx.get(f"{srv.url}/readyz", timeout=5).status_code)
        time.sleep(0.1)
    t.join()
    srv.process.wait(timeout=90)
    return {"readyz_after_sigterm": sorted(set(ready)), "in_flight_status": slow[0],
            "exit_after_s": round(time.monotonic() - signalled, 1), "exit_code": srv.process.returncode}


def kill_one_worker(home: Path, out: Path) -> dict:
    """Two workers under closed-loop load; one is killed 5 s in. The new worker's pid and its warm-up
    line in the log say when it is back."""
    log = out / "kill.log"
    with Server(home, log, workers=2) as srv:
        deadline = time.monotonic() + 60
        while len(worker_processes(srv)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        victim = worker_processes(srv)[0]
        marks: dict[str, float] = {}
        old = {p.pid for p in worker_processes(srv)}

        def kill_and_watch():
            time.sleep(5)
            marks["killed"] = time.monotonic()
            victim.kill()
            while time.monotonic() < marks["killed"] + 60:
                new = [p.pid for p in worker_processes(srv) if p.pid not in old]
                if new:
                    marks.setdefault("respawned", time.monotonic())
                    if log.read_text().count(f"[convserve:{new[0]}] warmed up") >= 2:  # both models
                        marks["warm"] = time.monotonic()
                        return
                time.sleep(0.1)

        watcher = threading.Thread(target=kill_and_watch)
        watcher.start()
        results = asyncio.run(closed_loops(srv.port, CLASSIFY, 8, 25))
        watcher.join()
    t0 = marks["killed"]
    per_second: dict[int, int] = {}
    for status, _, _, at in results:
        if status == 200:
            second = math.floor(at - t0)
            per_second[second] = per_second.get(second, 0) + 1
    failed: dict[str, int] = {}
    for r in results:
        if r[0] != 200:
            failed[str(r[0])] = failed.get(str(r[0]), 0) + 1
    return {"requests": len(results), "failed": failed,
            "respawned_after_s": round(marks.get("respawned", float("nan")) - t0, 1),
            "new_worker_warm_after_s": round(marks.get("warm", float("nan")) - t0, 1),
            "ok_per_second_from_kill": [per_second.get(s, 0) for s in range(-4, 20)]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.reliability", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/reliability"))
    args = p.parse_args(argv)
    uvloop.install()  # the client's own event loop as lean as the server's
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    result: dict = {}
    with Server(home, args.out / "default.log") as srv:
        result["classify_600"] = split(asyncio.run(burst(srv.port, CLASSIFY, 600)))
        result["score_map_300"] = split(asyncio.run(burst(srv.port, request("/score_map", PAGE), 300)))
        result["stalled_300"] = stalled_uploads(srv, 300)
    result["server_side_default"] = server_times(args.out / "default.log")
    limit = 16
    with Server(home, args.out / "overload.log", max_concurrency=limit) as srv:
        alone = asyncio.run(closed_loops(srv.port, CLASSIFY, 1, 5))
        loaded = asyncio.run(closed_loops(srv.port, CLASSIFY, 4 * limit, 10))
        result["overload_4x"] = {"max_concurrency": limit, "clients": 4 * limit,
                                 "unloaded_p99_ms": pct([r[1] for r in alone], 99),
                                 "unloaded_rps": round(len(alone) / 5), "loaded_rps": round(len(loaded) / 10),
                                 **split(loaded)}
    result["server_side_overload"] = server_times(args.out / "overload.log")
    result["sigterm"] = sigterm(home, args.out)
    result["kill_worker"] = kill_one_worker(home, args.out)
    (args.out / "reliability.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
