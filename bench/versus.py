"""Normal traffic, this checkout against an earlier commit's service, side by side in one run: the same
shipped models, the same settings, wrk rounds alternating between the two servers (A B A B …) so that
a noisy phase of the shared machine hits both. Issue 21 asks that pricing every request changes
nothing for normal traffic; this is how that was measured (BENCHMARKS.md, "Normal traffic").

    python -m bench.versus --base 983a211 --rounds 3 --seconds 8 [--out results/versus]

Rows: /classify multipart digit PNGs, /v2 binary BYTES digit PNGs (tritonclient's format), and
/score_map on 512² pages (detections), each at 32 connections (2 for /score_map: one running, one
waiting, none shed). Medians of the rounds by requests/s, their spread, and p50/p99 of the median round.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.served import wrk
from loadtest import samples
from loadtest.servers import ROOT, Server


def earlier_tree(rev: str, folder: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "service"],
                             capture_output=True, check=True, timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def shipped_store(home: Path) -> Path:
    bentoml = Path(sys.executable).with_name("bentoml")
    for name in ("lenet5", "digit-detector"):
        subprocess.run([str(bentoml), "models", "import", str(ROOT / "bentomodels" / f"{name}.bentomodel")],
                       env={**os.environ, "BENTOML_HOME": str(home)}, check=True, capture_output=True,
                       timeout=120)
    return home


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="983a211", help="the earlier commit whose service/ is raced")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "versus")
    args = p.parse_args(argv)
    digits = [data for data, _ in samples.digits(64)]  # held-out digit PNGs
    pages = samples.pages(8, 512, 512)
    rows = {"/classify multipart PNG": ("/classify", "multipart", digits, 32),
            "/v2 binary BYTES PNG": ("/v2/models/lenet5/infer", "v2", digits, 32),
            "/score_map 512² page": ("/score_map", "multipart", pages, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        home = shipped_store(tmp / "store" / "bentoml")
        tree = earlier_tree(args.base, (tmp / "earlier").resolve())
        settings = {"threads": 0, "warmup_rounds": 3}
        # the earlier tree's `service` package: cwd and PYTHONPATH both point at it
        servers = {args.base: Server(home, tmp / "earlier.log", cwd=tree, env={"PYTHONPATH": str(tree)},
                                     **settings),
                   "this checkout": Server(home, tmp / "current.log", **settings)}
        try:
            for srv in servers.values():
                srv.readiness()
            runs: dict = {row: {name: [] for name in servers} for row in rows}
            for r in range(args.rounds):
                for row, (path, protocol, bodies, connections) in rows.items():
                    for name, srv in servers.items():
                        folder = args.out / path.strip("/").replace("/", "-") / f"{name}-r{r}"
                        runs[row][name].append(wrk(srv.url, bodies, connections, args.seconds,
                                                   folder, path=path, protocol=protocol))
        finally:
            for srv in servers.values():
                srv.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "versus.json").write_text(json.dumps(runs, indent=1) + "\n")
    print("| request | server | req/s (median) | rounds | p50 ms | p99 ms | failures |")
    print("|---|---|---|---|---|---|---|")
    for row, by_server in runs.items():
        for name, rs in by_server.items():
            median = sorted(rs, key=lambda x: x["rps"])[len(rs) // 2]
            spread = ", ".join(f"{x['rps']:.0f}" for x in rs)
            print(f"| {row} | {name} | {median['rps']:.0f} | {spread} | {median['p50_ms']} | "
                  f"{median['p99_ms']} | {sum(x['failures'] for x in rs)} |")


if __name__ == "__main__":
    main()
