"""Measurements through HTTP against real servers on this machine: wrk (loadtest/wrk.py: a C load
generator, ~50 µs of CPU per request where locust takes ~400, so the server keeps the cores) for
throughput and latency, and a plain client for "one /score_map pass vs every window via /classify"."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.inprocess import best_seconds
from loadtest import wrk as loadtest_wrk
from loadtest.samples import png


def wrk(url: str, bodies: list[bytes], connections: int, seconds: int, out: Path, path: str = "/classify",
        protocol: str = "multipart", **fields: str) -> dict:
    """One bounded wrk run against POST /classify, or another path and protocol (loadtest.wrk):
    requests/s, latency percentiles and failures (non-2xx answers and socket errors)."""
    r = loadtest_wrk.run(url, path, bodies, seconds, connections, fields=fields, out=out, protocol=protocol)
    return {"connections": connections, "rps": r["rps"], "p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"],
            "p99_ms": r["p99_ms"], "failures": r["non_2xx"] + sum(r["socket_errors"].values())}


def model_counters(url: str, model: str) -> dict[str, float]:
    """The service's own /metrics for `model`'s classifier-sized batches: calls, images, compute and
    queue seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"convserve_batch_size_count": "calls", "convserve_batch_size_sum": "images",
              "convserve_compute_seconds_sum": "compute_s", "convserve_queue_seconds_sum": "queue_s"}
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name in wanted and s.labels.get("model") == model and s.labels.get("kind") == "window":
                out[wanted[s.name]] += s.value
    return out


def inside(url: str, model: str, before: dict[str, float], seconds: float) -> dict:
    """What the model did since `before` (from /metrics): mean batch, compute ms per call, its
    images/s while computing, and the share of `seconds` it was computing."""
    delta = {k: v - before[k] for k, v in model_counters(url, model).items()}
    calls = max(delta["calls"], 1)
    return {"mean_batch": round(delta["images"] / calls, 1),
            "compute_ms_per_call": round(1e3 * delta["compute_s"] / calls, 3),
            "compute_images_per_s": round(delta["images"] / max(delta["compute_s"], 1e-9), 1),
            "compute_share": round(delta["compute_s"] / seconds, 2)}


def saturation(url: str, model: str, bodies: list[bytes], connections: int, seconds: int, out: Path) -> dict:
    """wrk on `model` with photo bodies, plus what the model itself did meanwhile (from /metrics)."""
    before = model_counters(url, model)
    row = wrk(url, bodies, connections, seconds, out / f"{model}-c{connections}", model=model)
    return {**row, **inside(url, model, before, seconds)}


def side_by_side(servers: dict[str, str], bodies: list[bytes], rounds: int, connections: int, seconds: int,
                 out: Path) -> dict:
    """wrk against each server in turn, `rounds` times (A B A B ...), so that slow phases of a shared
    machine hit both; per server the median round by requests/s."""
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    for r in range(rounds):
        for name, url in servers.items():
            runs[name].append(wrk(url, bodies, connections, seconds, out / name / f"round{r}"))
    return {name: {**sorted(rs, key=lambda x: x["rps"])[len(rs) // 2], "rounds_rps": [x["rps"] for x in rs]}
            for name, rs in runs.items()}


def protocols(url: str, bodies: list[bytes], rounds: int, connections: int, seconds: int, out: Path) -> dict:
    """The same digit PNGs to one server through its two fronts, alternating (A B A B ...): /classify
    multipart and the Open Inference Protocol as tritonclient sends it (a binary BYTES tensor, binary
    outputs). Per front the median round by requests/s."""
    fronts = {"/classify (multipart)": ("/classify", "multipart"),
              "/v2 infer (binary BYTES)": ("/v2/models/lenet5/infer", "v2")}
    runs: dict[str, list[dict]] = {name: [] for name in fronts}
    for r in range(rounds):
        for name, (path, protocol) in fronts.items():
            runs[name].append(wrk(url, bodies, connections, seconds, out / path.strip("/").replace("/", "-")
                                  / f"round{r}", path=path, protocol=protocol))
    return {name: {**sorted(rs, key=lambda x: x["rps"])[len(rs) // 2], "rounds_rps": [x["rps"] for x in rs]}
            for name, rs in runs.items()}


def score_map_vs_classify(url: str, page: np.ndarray, model: str, window: int, stride: int,
                          per_request: int = 64, concurrency: int = 4) -> dict:
    """The whole map of `page` (uint8 (H, W) or (H, W, 3)) from one POST /score_map vs from POSTing every
    window at the stride to /classify (`per_request` images a request, `concurrency` at a time).
    Crops are PNG-encoded before the clock starts: only serving is timed."""
    crops = [png(np.ascontiguousarray(page[y:y + window, x:x + window]))
             for y in range(0, page.shape[0] - window + 1, stride)
             for x in range(0, page.shape[1] - window + 1, stride)]
    chunks = [crops[i:i + per_request] for i in range(0, len(crops), per_request)]
    page_png = png(page)
    with httpx.Client(timeout=300) as client:
        def one_pass() -> None:
            r = client.post(f"{url}/score_map", files={"image": ("page.png", page_png)},
                            data={"model": model, "outputs": "argmax"})
            r.raise_for_status()

        def post(chunk: list[bytes]) -> None:
            files = [("image", (f"{i}.png", c)) for i, c in enumerate(chunk)]
            r = client.post(f"{url}/classify", files=files, data={"model": model})
            r.raise_for_status()

        def every_window() -> None:
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(post, chunks))

        one = best_seconds(one_pass, min_s=0, rounds=5)  # best single call; the first one warms up
        each = best_seconds(every_window, min_s=0, rounds=2)
    return {"model": model, "image": list(page.shape[:2]), "windows": len(crops),
            "score_map_ms": round(one * 1e3, 1), "classify_all_windows_ms": round(each * 1e3, 1),
            "speedup": round(each / one, 1)}
