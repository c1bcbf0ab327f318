"""What one engine process costs and gains (CONVSERVE_ENGINE=process, service/engine/remote.py):

1. the hand-off: LeNet requests through the shared-memory ring to an engine process vs a direct call of
   the in-process engine (Engine.infer), one request at a time (latency: IPC per request and per image)
   and 32 at a time (CPU per request under load), in one asyncio loop like a worker's;
2. served: wrk (32 connections) on /classify for LeNet and AlexNet: one engine process at 2 front
   workers vs today's per-worker engines at 1 and 2 workers, rounds alternating, with the mean batch
   the engine formed (its /metrics).

    python -m bench.ipc [--home ~/bentoml] [--seconds 10] [--rounds 3] [--skip-served] [--out DIR]

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
from loadtest.samples import png
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


def served(home: Path, model: str, bodies: list[bytes], rounds: int, seconds: int, out: Path) -> dict:
    """wrk on /classify: the three layouts, started together, measured in alternating rounds."""
    layouts = {"local_1_worker": {"workers": 1}, "local_2_workers": {"workers": 2},
               "process_2_workers": {"workers": 2, "engine": "process"}}
    results: dict[str, list[dict]] = {name: [] for name in layouts}
    servers = {}
    try:
        for name, settings in layouts.items():  # one at a time: each takes both cores while it loads
            servers[name] = Server(home, out / model / name / "serve.log", models=model, **settings)
            servers[name].readiness(300)
        for r in range(rounds):
            for name, srv in servers.items():
                before = model_counters(srv.url, model)
                row = wrk(srv.url, bodies, 32, seconds, out / model / name / f"round{r}", model=model)
                results[name].append({**row, **inside(srv.url, model, before, seconds)})
    finally:
        for srv in servers.values():
            srv.stop()
    return {name: {**sorted(rs, key=lambda x: x["rps"])[len(rs) // 2], "rounds_rps": [x["rps"] for x in rs]}
            for name, rs in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("BENTOML_HOME", "~/bentoml")))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="lenet5,alexnet")
    parser.add_argument("--skip-served", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-ipc-")))
    args = parser.parse_args(argv)
    home = args.home.expanduser()
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    result = {"handoff": handoff(home, args.requests)}
    print(json.dumps(result, indent=1), flush=True)
    if not args.skip_served:
        for model in args.models.split(","):
            side = 224 if model.startswith("alexnet") else 28
            bodies = [png(np.random.default_rng(i).integers(0, 256, (side, side), np.uint8))
                      for i in range(8)]
            result[f"served_{model}"] = served(home, model, bodies, args.rounds, args.seconds, args.out)
            print(json.dumps(result[f"served_{model}"], indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ipc.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
