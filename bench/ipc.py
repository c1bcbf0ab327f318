"""What one engine process costs and gains (CONVSERVE_ENGINE=process, service/engine/remote.py):

1. the hand-off: LeNet requests through the shared-memory ring to an engine process vs a direct call of
   the in-process engine (Engine.infer), one request at a time (latency: IPC per request and per image)
   and 32 at a time (CPU per request under load), in one asyncio loop like a worker's;
2. served: wrk (32 connections) on /classify for LeNet and AlexNet (224² JPEG photos): one engine
   process at 2 front workers vs today's per-worker engines at 1 and 2 workers (--layouts), rounds
   alternating, with the mean batch the engine formed (its /metrics);
3. with --score-map SIDE: one /score_map of a SIDE² page of digits at a time in each layout.

Every layout's server serves all the models at once (started once: bench/gpu.sh's time on a GPU box is
short); `make bench` calls served() for one model at a time.

    python -m bench.ipc [--home ~/bentoml] [--seconds 10] [--rounds 3] [--skip-served] [--out DIR]
    python -m bench.ipc --layouts process:1,process:4,local:1,local:4 --connections 128 --score-map 4096

Needs lenet5 (and alexnet for AlexNet; `python -m export --arch alexnet --random-init --int8 --name
alexnet`) in the store. Prints JSON and writes it to --out/ipc.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.served import inside, model_counters, wrk
from loadtest.samples import photos, png
from loadtest.servers import Server

ROOT = Path(__file__).resolve().parents[1]


async def _latencies(infer, x: np.ndarray, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await infer("lenet5", x)
        out.append(time.perf_counter() - started)
    return out


async def _concurrent(infer, x: np.ndarray, n: int, width: int = 32) -> float:
    """Seconds per request with `width` requests always in flight (CPU per request under load)."""
    async def client(count: int) -> None:
        for _ in range(count):
            await infer("lenet5", x)

    started = time.perf_counter()
    await asyncio.gather(*(client(n // width) for _ in range(width)))
    return (time.perf_counter() - started) / (n // width * width)


def _cpu(pids: list[int]) -> float:
    """CPU seconds used so far by this process and `pids` (the engine process)."""
    import psutil

    return time.process_time() + sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)


async def _measure(engine, requests: int, pids: list[int]) -> dict:
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, 1, 28, 28), np.uint8)
    eight = rng.integers(0, 256, (8, 1, 28, 28), np.uint8)
    await _latencies(engine.infer, one, 200)  # warm
    row = {}
    for label, x in (("1_image", one), ("8_images", eight)):
        rounds = [statistics.median(await _latencies(engine.infer, x, requests)) for _ in range(3)]
        row[f"median_us_{label}"] = round(1e6 * min(rounds), 1)
    cpu = _cpu(pids)
    walls = [await _concurrent(engine.infer, one, requests) for _ in range(3)]
    row["us_per_request_32_in_flight"] = round(1e6 * min(walls), 1)
    # CPU (this process + the engine's) per request under load: what the hand-off costs a 2-core machine
    row["cpu_us_per_request_32_in_flight"] = round(1e6 * (_cpu(pids) - cpu) / (3 * (requests // 32 * 32)), 1)
    return row


def handoff(home: Path, requests: int) -> dict:
    """Ring vs direct, same process, same loop, same model; the engine process started here."""
    from service.engine import Engine, RemoteEngine
    from service.engine.remote import ModelView
    from service.engine.store import read_card
    from service.settings import Settings

    os.environ.update(BENTOML_HOME=str(home), CONVSERVE_MODELS="lenet5")
    settings = Settings()
    folder = tempfile.mkdtemp(prefix="convserve-ipc-")
    path = f"{folder}/cpu.sock"
    engine_env = {**os.environ, "CONVSERVE_WORKERS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "service.engine.process", "--socket", path],
                               stdin=subprocess.PIPE, env=engine_env, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        async def ring_side() -> dict:
            remote = RemoteEngine(path, settings, [ModelView(*read_card("lenet5"))])
            await asyncio.to_thread(remote.warm_up)
            try:
                return await _measure(remote, requests, [process.pid])
            finally:
                remote.close()

        ring = asyncio.run(ring_side())
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(folder, ignore_errors=True)
    local = Engine.from_store(settings)
    local.warm_up()
    try:
        direct = asyncio.run(_measure(local, requests, []))
    finally:
        local.close()
    cost = {key: round(ring[key] - direct[key], 1) for key in ring}
    return {"ring": ring, "direct": direct, "ipc_us_per_request": cost["median_us_1_image"],
            "ipc_us_per_image_at_8": round(cost["median_us_8_images"] / 8, 1),
            "ipc_us_per_request_32_in_flight": cost["us_per_request_32_in_flight"],
            "ipc_cpu_us_per_request_32_in_flight": cost["cpu_us_per_request_32_in_flight"]}


LAYOUTS = "local:1,local:2,process:2"  # engine:workers; the 2-core default (GPU: bench/gpu.sh)


def layouts_of(text: str) -> dict[str, dict]:
    """"local:1,process:8" → {"local_1_worker": {...}, "process_8_workers": {...}}: Server settings."""
    out = {}
    for item in text.split(","):
        engine, _, workers = item.partition(":")
        n = int(workers or 1)
        out[f"{engine}_{n}_worker{'s' if n > 1 else ''}"] = {"workers": n, "engine": engine}
    return out


def served(home: Path, model: str, bodies: list[bytes], rounds: int, seconds: int, out: Path,
           layouts: str = LAYOUTS, connections: int = 32) -> dict:
    """wrk on /classify for one model: the layouts, started together, measured in alternating rounds."""
    return served_together(home, {model: bodies}, rounds, seconds, out / model, layouts, connections)[model]


def served_together(home: Path, bodies: dict[str, list[bytes]], rounds: int, seconds: int, out: Path,
                    layouts: str = LAYOUTS, connections: int = 32, page_side: int = 0,
                    max_concurrency: int = 0) -> dict:
    """Each layout's server serving every model of `bodies` (and the digit detector with `page_side`),
    started once (a GPU box's time goes to starts otherwise); round by round, layout by layout, wrk on
    each model, then one /score_map of a page_side² page of digits (its first round only warms).
    max_concurrency: the servers' admission per worker (0: their default, 64), which must admit
    `connections` at 1 worker, or wrk counts 429s (as failures, in its req/s)."""
    from bench.datapath import page_png

    chosen = layouts_of(layouts)
    models = list(bodies) + (["digit-detector"] if page_side else [])
    results = {model: {name: [] for name in chosen} for model in bodies}
    pages: dict[str, list[tuple[float, float]]] = {name: [] for name in chosen}
    page = page_png(page_side) if page_side else b""
    servers = {}
    try:
        for name, settings in chosen.items():  # one at a time: each takes every core while it loads
            extra = {"max_concurrency": max_concurrency} if max_concurrency else {}
            servers[name] = Server(home, out / name / "serve.log", models=",".join(models),
                                   max_request_bytes=64 * 2**20, timeout_s=600, **extra, **settings)
            servers[name].readiness(600)
        for r in range(rounds):
            for name, srv in servers.items():
                for model, its_bodies in bodies.items():
                    before = model_counters(srv.url, model)
                    row = wrk(srv.url, its_bodies, connections, seconds, out / name / f"{model}-round{r}",
                              model=model)
                    results[model][name].append({**row, **inside(srv.url, model, before, seconds)})
                if page_side:
                    for _ in range(2 if r == 0 else 1):  # the very first page warms its tile shapes
                        pages[name].append(_score_map(srv.url, page))
    finally:
        for srv in servers.values():
            srv.stop()
    answer = {model: {name: {**sorted(rs, key=lambda x: x["rps"])[len(rs) // 2],
                           "rounds_rps": [x["rps"] for x in rs]} for name, rs in per.items()}
            for model, per in results.items()}
    if page_side:
        answer["score_map"] = {name: {"page": f"{page_side}²", "png_bytes": len(page),
                                    "end_to_end_ms": round(1e3 * statistics.median(w for w, _ in p[1:]), 1),
                                    "rounds_ms": [round(1e3 * w, 1) for w, _ in p[1:]],
                                    "model_ms": round(1e3 * statistics.median(m for _, m in p[1:]), 1)}
                             for name, p in pages.items()}
    return answer


def _score_map(url: str, page: bytes) -> tuple[float, float]:
    """(seconds end to end, seconds of the detector's dense compute inside) for one /score_map."""
    import httpx

    from bench.datapath import dense_compute

    deadline = time.monotonic() + 300
    while True:  # wrk's last requests may still be running (429/503 then): retry as a client would
        _, before = dense_compute(url, "digit-detector")
        started = time.perf_counter()
        got = httpx.post(f"{url}/score_map", files={"image": ("page.png", page)}, timeout=900)
        wall = time.perf_counter() - started
        if got.status_code not in (429, 503) or time.monotonic() > deadline:
            break
        time.sleep(float(got.headers.get("retry-after", 1)))
    got.raise_for_status()
    return wall, dense_compute(url, "digit-detector")[1] - before


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("BENTOML_HOME", "~/bentoml")))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="lenet5,alexnet")
    parser.add_argument("--layouts", default=LAYOUTS, help="engine:workers, comma-separated")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--score-map", type=int, default=0, metavar="SIDE",
                        help="also time /score_map of a SIDE² page in each layout (needs digit-detector)")
    parser.add_argument("--max-concurrency", type=int, default=0,
                        help="requests admitted per worker (0: the server's default, 64)")
    parser.add_argument("--skip-handoff", action="store_true")
    parser.add_argument("--skip-served", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-ipc-")))
    args = parser.parse_args(argv)
    home = args.home.expanduser()
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"layouts": args.layouts, "connections": args.connections}

    def save(key: str, value: dict) -> None:  # after each part: a later part's failure keeps these
        result[key] = value
        print(json.dumps({key: value}, indent=1), flush=True)
        (args.out / "ipc.json").write_text(json.dumps(result, indent=1))

    if not args.skip_handoff:
        save("handoff", handoff(home, args.requests))
    if not args.skip_served:
        bodies = {}
        for model in args.models.split(","):
            if model.startswith("alexnet"):  # the AlexNet load: 224² JPEG photos
                bodies[model] = photos(32, 224, 3)
            else:
                bodies[model] = [png(np.random.default_rng(i).integers(0, 256, (28, 28), np.uint8))
                                 for i in range(8)]
        got = served_together(home, bodies, args.rounds, args.seconds, args.out, args.layouts,
                              args.connections, args.score_map, args.max_concurrency)
        for key, value in got.items():
            save(key if key == "score_map" else f"served_{key}", value)


if __name__ == "__main__":
    main()
