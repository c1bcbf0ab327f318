"""A soak test: mixed load on a fresh server for minutes, then what the workers hold afterwards.

    python -m loadtest.soak --minutes 10 --out results/soak        (or: make soak)

Starts its own `bentoml serve` on a loopback port (the store in $BENTOML_HOME), warms it with --warmup
seconds of the same load, records every worker process's RSS, threads and open files, runs locust's
mixed scenario (9 digits : 1 page) for --minutes in one bounded run, and records them again. Writes
soak.json and soak.md under --out; exits 1 on any failed request or RSS growth of 10 % or more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil

from loadtest import run as loadrun
from loadtest.servers import Server

RSS_GROWTH_LIMIT = 0.10
SAMPLE_S = 30


def worker_processes(server: Server) -> list[psutil.Process]:
    """The server's worker processes (the arbiter's children that run the service)."""
    found = []
    for p in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def footprint(server: Server) -> dict:
    """Per worker: resident memory, threads and open files (fds), summed over the workers."""
    rss = threads = files = 0
    for p in worker_processes(server):
        with p.oneshot():
            rss += p.memory_info().rss
            threads += p.num_threads()
            files += p.num_fds()
    return {"rss_mib": round(rss / 2**20, 1), "threads": threads, "open_files": files}


def soak(minutes: float, users: int, warmup_s: int, out: Path, home: Path, **settings) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with Server(home, out / "serve.log", **settings) as server:
        started = footprint(server)
        loadrun.run(server.url, "mixed", users, warmup_s, out / "warmup")
        warmed = footprint(server)
        trace: list[tuple[float, float]] = []  # (seconds into the load, RSS MiB): a leak climbs, a
        done = threading.Event()               # warm allocator levels off

        def sample() -> None:
            began = time.monotonic()
            while not done.wait(SAMPLE_S):
                trace.append((round(time.monotonic() - began), footprint(server)["rss_mib"]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = loadrun.run(server.url, "mixed", users, int(minutes * 60), out / "load")
        done.set()
        time.sleep(2)  # let the last responses' buffers go
        finished = footprint(server)
    growth = finished["rss_mib"] / warmed["rss_mib"] - 1
    result = {"minutes": minutes, "users": users, "settings": settings, "at_start": started,
              "after_warmup": warmed, "at_end": finished, "rss_growth_after_warmup": round(growth, 4),
              "rss_trace_mib": trace, "requests": load["total"]["requests"],
              "failures": load["total"]["failures"],
              "rps": load["total"]["rps"], "endpoints": load["endpoints"],
              "ok": load["total"]["failures"] == 0 and growth < RSS_GROWTH_LIMIT}
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "soak.md").write_text(report(result))
    return result


def report(r: dict) -> str:
    rows = [("at start (ready)", r["at_start"]), ("after warm-up", r["after_warmup"]),
            ("at end", r["at_end"])]
    lines = [f"# Soak: {r['minutes']:g} min of mixed load, {r['users']} users",
             "", f"{r['requests']:,} requests, {r['failures']} failed, {r['rps']} req/s; "
             f"RSS growth after warm-up {r['rss_growth_after_warmup']:+.1%} (limit "
             f"{RSS_GROWTH_LIMIT:.0%})", "", "| when | RSS (MiB, all workers) | threads | open files |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {f['rss_mib']} | {f['threads']} | {f['open_files']} |" for name, f in rows]
    lines += ["", "RSS during the load (s: MiB): " + ", ".join(f"{t}: {m}" for t, m in r["rss_trace_mib"])]
    lines += ["", "| endpoint | requests | failures | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {e['requests']} | {e['failures']} | {e['rps']} | {e['p50_ms']:g} | "
              f"{e['p99_ms']:g} |" for name, e in r["endpoints"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--users", type=int, default=16)
    # Two minutes: RSS climbs for the first ~2 min of load and then levels off (onnxruntime's arena
    # and the allocators reaching their working set; the same before and after issue 12's changes,
    # RELIABILITY.md); a leak is what climbs after that.
    p.add_argument("--warmup", type=int, default=120, help="seconds of load before the baseline")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/soak"))
    args = p.parse_args(argv)
    if not 0 < args.minutes * 60 <= loadrun.MAX_SECONDS:
        raise SystemExit(f"error: --minutes must be at most {loadrun.MAX_SECONDS / 60:g}")
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    result = soak(args.minutes, args.users, args.warmup, args.out, home, workers=args.workers)
    print(report(result), end="")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
