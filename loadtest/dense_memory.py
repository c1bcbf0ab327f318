"""Peak memory and time of dense scoring on a very large page, tiled vs one pass, each in a fresh
process (peak RSS is per process).

    python -m loadtest.dense_memory --size 8192 --tile-pixels 4194304

Reports the whole process: the decoded page (uint8), the score map, and one tile's normalized float32
copy and onnxruntime's working memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def measure(model_tag: str, size: int, tile_pixels: int) -> dict:
    from service.engine.store import load
    from service.pipeline import dense
    from service.settings import Settings

    model = load(model_tag, Settings(models=model_tag))
    rng = np.random.default_rng(0)
    page = rng.integers(0, 60, (size, size), dtype=np.uint8)  # a noisy page: content is irrelevant here
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    scores = lambda x: model.infer(x)["scores"]  # noqa: E731
    m = dense.tiled(scores, page[None], model.card, tile_pixels)  # uint8 tiles, normalized per tile
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"size": size, "tile_pixels": tile_pixels, "map": list(m.scores.shape),
            "seconds": round(seconds, 2), "peak_rss_mib": round(peak / 1024),
            "before_scoring_mib": round(baseline / 1024)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.dense_memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digit-detector")
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--tile-pixels", type=int, default=4 * 2**20)
    p.add_argument("--one-pass", action="store_true", help="also measure without tiles (needs GBs)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model, args.size, args.tile_pixels)))
        return
    runs = [args.tile_pixels] + ([args.size * args.size] if args.one_pass else [])
    for tile in runs:
        out = subprocess.run([sys.executable, "-m", "loadtest.dense_memory", "--child", "--model", args.model,
                              "--size", str(args.size), "--tile-pixels", str(tile)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
