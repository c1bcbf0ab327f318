"""convserve's /v2 raced against NVIDIA PyTriton serving the same ONNX file (issue 23, part 4), with the
FastAPI baseline's /classify beside it in the same rounds:

    python -m bench.peers --out results/peers --seconds 5 --rounds 3     (make bench runs it too)

Every server runs on this machine at once (idle while another is loaded); wrk (loadtest/wrk.py) sends
the same prepared bodies to each: for /v2 byte-identical requests to convserve and PyTriton (one JSON
header padded to one Inference-Header-Content-Length, one binary tensor; only host and port differ),
either an FP32 tensor `input` [1, 1, 28, 28] (the held-out digits normalized by the service's own
preprocessing) or a BYTES `image` [1, 1] (the digit PNG). Each round runs every server once, the order
reversed every other round (A B C ... C B A), so that a slow phase of the shared machine hits each.
Per server: the median and the range over rounds of req/s, p50 and p99.

Needs the Triton venv (`make bench-triton-venv`); without it the section is recorded as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
from pathlib import Path

import httpx
from PIL import Image

from loadtest import samples
from loadtest import wrk as loadtest_wrk
from loadtest.servers import TRITON_VENV, BaselineServer, Server, TritonServer, stored_model, triton_python
from modelcard import ModelCard
from service.pipeline import images

SKIPPED = "skipped: make bench-triton-venv"
V2 = "/v2/models/lenet5/infer"
BOUNDARY = "convserve-bench-peers-0123456789"  # one multipart boundary: identical /classify bodies too


def fp32_tensors(card: ModelCard, pngs: list[bytes]) -> list[bytes]:
    """Each PNG as the FP32 tensor convserve's engine would feed its model: (1, C, H, W), little-endian."""
    spec = card.input
    pixels = [images.window_pixels(Image.open(io.BytesIO(p)), spec)[None] for p in pngs]
    return [spec.normalize(x).astype("<f4").tobytes() for x in pixels]


def triton_batches(metrics_url: str) -> dict[str, float]:
    """Triton's own counters (its /metrics): requests answered and model executions (batches)."""
    wanted = {"nv_inference_count": "images", "nv_inference_exec_count": "calls"}
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in httpx.get(f"{metrics_url}/metrics", timeout=30).text.splitlines():
        name = line.split("{", 1)[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return out


def summary(runs: list[dict]) -> dict:
    """Median and range over rounds; failures summed (non-2xx answers and socket errors)."""
    out = {"rounds": len(runs), "connections": runs[0]["connections"], "seconds": runs[0]["seconds"],
           "requests": sum(r["requests"] for r in runs),
           "failures": sum(r["non_2xx"] + sum(r["socket_errors"].values()) for r in runs),
           "bodies_sha256": sorted({r["bodies_sha256"] for r in runs})}
    if "batches" in runs[0]:  # PyTriton: the dynamic batcher's mean batch over all rounds
        images, calls = (sum(r["batches"][k] for r in runs) for k in ("images", "calls"))
        out["mean_batch"] = round(images / max(calls, 1), 1)
    for key in ("rps", "p50_ms", "p99_ms"):
        values = [r[key] for r in runs]
        out[key], out[f"{key}_range"], out[f"rounds_{key}"] = round(statistics.median(values), 2), [
            min(values), max(values)], values
    return out


def race(entries: dict[str, dict], rounds: int, connections: int, seconds: int, out: Path) -> dict:
    """wrk against each entry ({url, path, protocol, bodies, tensor}) once a round, `rounds` rounds,
    after a 1 s warm-up of each that is not counted (PyTriton's first requests at 32 connections
    took a 69 ms p99 in a 1 s run, 3× its later ones)."""
    def one(name: str, s: int, folder: str) -> dict:
        e = entries[name]
        before = triton_batches(e["metrics"]) if "metrics" in e else None
        row = loadtest_wrk.run(e["url"], e["path"], e["bodies"], s, connections, protocol=e["protocol"],
                               tensor=e.get("tensor"), boundary=BOUNDARY,
                               out=out / name.replace(" ", "_").replace("/", "-") / folder)
        if before is not None:
            after = triton_batches(e["metrics"])
            row["batches"] = {k: after[k] - before[k] for k in after}
        return row

    for name in entries:
        one(name, 1, "warmup")
    runs: dict[str, list[dict]] = {name: [] for name in entries}
    for r in range(rounds):
        for name in list(entries) if r % 2 == 0 else list(reversed(entries)):
            runs[name].append(one(name, seconds, f"round{r}"))
    return {name: summary(rs) for name, rs in runs.items()}


PAIRS = {"v2 FP32": ("convserve /v2 FP32", "PyTriton /v2 FP32"),
         "v2 BYTES PNG": ("convserve /v2 BYTES PNG", "PyTriton /v2 BYTES PNG"),
         "classify": ("convserve /classify", "FastAPI baseline /classify")}
PAIRS_FLAT = [name for pair in PAIRS.values() for name in pair]


def ratios(rows: dict) -> dict:
    """convserve ÷ its peer: req/s, and each side's p99, for every pair raced."""
    return {k: {"rps_ratio": round(rows[a]["rps"] / rows[b]["rps"], 2), "p99_ms": [rows[a]["p99_ms"],
                                                                                  rows[b]["p99_ms"]],
                "identical_bodies": rows[a]["bodies_sha256"] == rows[b]["bodies_sha256"]}
            for k, (a, b) in PAIRS.items() if a in rows and b in rows}


def run(home: Path, out: Path, seconds: int, rounds: int, connections: int = 32,
        venv: Path = TRITON_VENV, convserve_threads: int = 0) -> dict:
    """The race, or {"skipped": …} where the Triton venv is missing. convserve_threads: its
    CONVSERVE_THREADS (0, its default: cores ÷ workers)."""
    if triton_python(venv) is None:
        return {"skipped": SKIPPED}
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pngs = [data for data, _ in samples.digits(50)]
    _, meta = stored_model(home, "lenet5")
    card = ModelCard.from_dict(meta)
    fp32 = fp32_tensors(card, pngs)
    tensor = (card.onnx.input, "FP32", [1, card.input.channels, card.input.height, card.input.width])
    print(f"served: convserve /v2 vs PyTriton (FP32, BYTES PNG), /classify vs FastAPI, {rounds} rounds",
          flush=True)
    # convserve at its defaults (1 worker, intra-op threads = cores); the baseline and PyTriton at 1
    # onnxruntime thread, one model instance: their best for LeNet's ~30 µs forward pass
    with Server(home, logs / "convserve.log", models="lenet5", threads=convserve_threads) as conv, \
            TritonServer(home, logs / "pytriton.log", venv=venv) as triton, \
            BaselineServer(home, logs / "baseline.log") as base:
        entries = {
            "convserve /v2 FP32": {"url": conv.url, "path": V2, "protocol": "v2", "bodies": fp32,
                                   "tensor": tensor},
            "PyTriton /v2 FP32": {"url": triton.url, "path": V2, "protocol": "v2", "bodies": fp32,
                                  "tensor": tensor, "metrics": triton.metrics_url},
            "convserve /v2 BYTES PNG": {"url": conv.url, "path": V2, "protocol": "v2", "bodies": pngs},
            "PyTriton /v2 BYTES PNG": {"url": triton.url, "path": V2, "protocol": "v2", "bodies": pngs,
                                       "metrics": triton.metrics_url},
            "convserve /classify": {"url": conv.url, "path": "/classify", "protocol": "multipart",
                                    "bodies": pngs},
            "FastAPI baseline /classify": {"url": base.url, "path": "/classify", "protocol": "multipart",
                                           "bodies": pngs},
        }
        rows = race(entries, rounds, connections, seconds, out / "wrk")
        # imported here: Triton's protos (package `inference`) and kserve's cannot share one process,
        # and the tests import this module beside kserve's client
        from bench import grpc_race

        print(f"served: convserve gRPC vs PyTriton gRPC (FP32), {rounds} rounds", flush=True)
        grpc = asyncio.run(grpc_race.versus_peer(conv.url, conv.grpc_target, triton.grpc_target,
                                                 card.onnx.input, rounds, seconds))
        config = {"max_batch_size": triton.max_batch_size, "max_queue_delay_us": triton.max_queue_delay_us,
                  "onnxruntime_threads": triton.threads, "convserve_threads": convserve_threads}
    return {"rows": rows, "ratios": ratios(rows), "pytriton": config, "grpc": grpc}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/peers"))
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--convserve-threads", type=int, default=0,
                   help="convserve's onnxruntime intra-op threads (0: its default, cores ÷ workers)")
    args = p.parse_args(argv)
    from bench import report

    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    result = run(home, args.out, args.seconds, args.rounds, args.connections,
                 convserve_threads=args.convserve_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join(report.peers(result)) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
