"""Run a bounded, headless locust load test against a convserve server on this machine and print
throughput and latency.

    python -m loadtest.run --host http://127.0.0.1:3000 --scenario classify --users 32 --run-time 10

Writes locust's CSV files, HTML report and log under --out, and summary.json. Exit status 1 when any
request failed. Only loopback hosts are accepted: load is never sent anywhere else.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SCENARIOS = {"classify": ["ClassifyUser"], "score_map": ["ScoreMapUser"],
             "mixed": ["ClassifyUser", "ScoreMapUser"], "photo": ["PhotoUser"]}
MAX_SECONDS = 600


def loopback(host: str) -> bool:
    name = urlparse(host).hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def summarize(csv_prefix: Path) -> dict:
    rows = list(csv.DictReader(open(f"{csv_prefix}_stats.csv")))
    total = next(r for r in rows if r["Name"] == "Aggregated")

    def row(r: dict) -> dict:
        return {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                "rps": round(float(r["Requests/s"]), 1),
                **{f"p{p}_ms": float(r[f"{p}%"] if r[f"{p}%"] != "N/A" else "nan")
                   for p in (50, 90, 95, 99)},
                "mean_ms": round(float(r["Average Response Time"]), 2)}

    return {"total": row(total), "endpoints": {r["Name"]: row(r) for r in rows if r["Name"] != "Aggregated"}}


def run(host: str, scenario: str, users: int, run_time: int, out: Path, spawn_rate: float = 0,
        model: str = "") -> dict:
    if not loopback(host):
        raise SystemExit(f"error: {host} is not a loopback address; load tests only target this machine")
    if not 1 <= run_time <= MAX_SECONDS:
        raise SystemExit(f"error: --run-time must be 1..{MAX_SECONDS} seconds")
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / scenario
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
               "--users", str(users), "--spawn-rate", str(spawn_rate or users),
               "--run-time", f"{run_time}s", "--stop-timeout", "5", "--csv", str(prefix),
               "--html", f"{prefix}.html", "--only-summary", "--loglevel", "WARNING",
               # statistics start once every user is running: connecting 64 users at once stalls the
               # first second (both servers: max 400-540 ms), which is start-up, not serving
               "--reset-stats",
               *SCENARIOS[scenario]]
    env = {**os.environ, "LOADTEST_SCENARIO": scenario, **({"LOADTEST_MODEL": model} if model else {})}
    with open(f"{prefix}.log", "w") as log:  # locust's own summary; ours is printed by main()
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=run_time + 120,
                       check=False)
    summary = {"host": host, "scenario": scenario, "model": model, "users": users, "run_time_s": run_time,
               **summarize(prefix)}
    (out / f"{scenario}-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="http://127.0.0.1:3000")
    p.add_argument("--scenario", choices=list(SCENARIOS), default="mixed")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--run-time", type=int, default=30, help="seconds")
    p.add_argument("--model", default="", help="photo scenario: the model to ask (default alexnet)")
    p.add_argument("--out", type=Path, default=Path("results/loadtest"))
    args = p.parse_args(argv)
    summary = run(args.host, args.scenario, args.users, args.run_time, args.out, model=args.model)
    print(f"{'endpoint':<12} {'requests':>9} {'fail':>5} {'req/s':>8} {'p50':>6} {'p90':>6} "
          f"{'p99':>6} ms")
    for name, r in [*summary["endpoints"].items(), ("total", summary["total"])]:
        print(f"{name:<12} {r['requests']:>9} {r['failures']:>5} {r['rps']:>8} {r['p50_ms']:>6.0f} "
              f"{r['p90_ms']:>6.0f} {r['p99_ms']:>6.0f}")
    print(f"CSV and HTML report: {args.out}/")
    sys.exit(1 if summary["total"]["failures"] else 0)


if __name__ == "__main__":
    main()
