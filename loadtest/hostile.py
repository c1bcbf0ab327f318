"""The hostile rows of RELIABILITY.md, measured against a fresh loopback server sized as the Deployment
sizes it (CONVSERVE_MEMORY_LIMIT_MB=2048): status, seconds, and the server's peak RSS growth.

    python -m loadtest.hostile [--home ~/bentoml]      # prints a Markdown table

tests/test_hostile.py asserts the same rows (statuses and bounds); this prints the numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from loadtest.servers import Server


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def peak_rss_growth(server: Server, call) -> tuple[object, float, int]:
    """call() → (its result, seconds, the server's peak RSS growth in bytes, sampled every 20 ms)."""
    root = psutil.Process(server.process.pid)

    def rss() -> int:
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss() - base)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        result = call()
    finally:
        took = time.monotonic() - started
        done.set()
        thread.join()
    return result, took, peak[0]


def rows(url: str) -> list[tuple[str, callable]]:
    black, flat = png(np.zeros((4096, 4096), np.uint8)), png(np.full((1024, 1024), 255, np.uint8))

    def score(image: bytes, **form: str):
        return lambda: httpx.post(f"{url}/score_map", files={"image": ("p.png", image)}, data=form,
                                  timeout=120).status_code

    def v2(body: bytes, headers: dict | None = None):
        return lambda: httpx.post(f"{url}/v2/models/lenet5/infer", content=body, headers=headers or {},
                                  timeout=120).status_code

    pixels = {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
    return [
        ("16 KB black 4096² PNG, `scales=0.25`", score(black, scales="0.25")),
        ("the same, `outputs=heatmap`", score(black, outputs="heatmap")),
        ("the same, `stride_factor=4`, `outputs=scores`", score(black, stride_factor="4", outputs="scores")),
        ("flat 1024² page, `threshold=0`, `nms_iou=1`", score(flat, threshold="0", nms_iou="1")),
        ("`image` sent as text `http://…`", lambda: httpx.post(
            f"{url}/score_map", files={"image": (None, "http://127.0.0.1:9/x.png")},
            timeout=120).status_code),
        ("v2 header length of 5,000 digits", v2(json.dumps(pixels).encode(),
                                               {"Inference-Header-Content-Length": "9" * 5000})),
        ("v2 JSON nested 100,000 deep", v2(b"[" * 100_000 + b"]" * 100_000)),
        ("v2 shape `[2^32, 2^32, 1, 1]`", v2(json.dumps({"inputs": [
            {**pixels["inputs"][0], "data": [], "shape": [2**32, 2**32, 1, 1]}]}).encode())),
        ("`/classify` `top_k=²`", lambda: httpx.post(f"{url}/classify", files={"image": ("d.png", png(
            np.zeros((28, 28), np.uint8)))}, data={"top_k": "²"}, timeout=120).status_code),
        ("10,000 empty multipart parts to `/classify`", lambda: httpx.post(
            f"{url}/classify", files=[("model", (None, ""))] * 10_000, timeout=120).status_code),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=Path.home() / "bentoml", help="BENTOML_HOME with the models")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, Server(args.home, Path(tmp) / "serve.log",
                                                      memory_limit_mb=2048, warmup_rounds=1) as server:
        black = png(np.zeros((4096, 4096), np.uint8))
        httpx.post(f"{server.url}/score_map", files={"image": ("p.png", black)}, timeout=120)  # arena warm
        print("| request | status | seconds | peak RSS growth (MB) |\n|---|---|---|---|")
        for name, call in rows(server.url):
            status, took, growth = peak_rss_growth(server, call)
            print(f"| {name} | {status} | {took:.2f} | {growth / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
