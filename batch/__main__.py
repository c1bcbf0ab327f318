"""Batch dense scoring on Ray Data: every page of a folder (or a manifest of paths) through the digit
detector, one engine per actor, detections written as JSON Lines.

    python -m batch --input pages/ --out results/batch                     # local Ray (ray.init)
    python -m batch --input manifest.txt --out /data/out --actors 8 --address auto   # a cluster
    python -m batch ... --maps                   # also each page's score map, as .npy under maps/

Each actor loads the model from the BentoML store ($BENTOML_HOME on every node, or baked into the
image: deploy/ray/rayjob.yaml) and scores pages with the same code as POST /score_map
(service/pipeline/score.py), so a page gets the same detections here as from the server. Needs the `ray`
extra: pip install -c constraints.txt -e '.[cpu,ray]'.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def page_paths(source: Path) -> list[str]:
    """A folder's images (sorted), or the paths listed one per line in a manifest file."""
    if source.is_dir():
        return sorted(str(p.resolve()) for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [line.strip() for line in source.read_text().splitlines() if line.strip()]


class PageScorer:
    """A Ray Data actor: one engine (one onnxruntime session, its inference thread), many pages."""

    def __init__(self, model: str, threads: int, options: dict) -> None:
        from service.engine import Engine
        from service.pipeline import options as score_options
        from service.settings import Settings

        self.settings = Settings(models=model, threads=threads, warmup_rounds=1)
        self.engine = Engine.from_store(self.settings)
        (self.name,) = self.engine.models
        self.card = self.engine.models[self.name].card
        self.opts = score_options.parse(**options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from service.errors import DomainError
        from service.pipeline import images, score

        out: dict[str, list] = {"path": [], "result": []}
        for path in batch["path"]:
            try:
                im = images.decode(Path(path).read_bytes(), self.settings.max_image_pixels, str(path))
                result = score.score_page(self.engine.bind(self.name), im, self.card, self.opts,
                                          self.settings.tile_pixels, self.engine.tile_side(self.name))
            except DomainError as e:  # one bad page is a row with its error, not a failed job
                result = {"error": {"type": e.kind, "message": e.message}}
            out["path"].append(str(path))
            out["result"].append(json.dumps(result))
        return out


def score(paths: list[str], out: Path, model: str = "digit-detector", actors: int = 1,
          threads_per_actor: int = 1, maps: bool = False, **options) -> dict:
    """Score `paths` on the Ray already initialized; write out/detections.jsonl (and out/maps/*.npy)."""
    import ray

    out.mkdir(parents=True, exist_ok=True)
    options = {**options, "outputs": "detections,scores" if maps else "detections"}
    started = time.perf_counter()
    pages = ray.data.from_items([{"path": p} for p in paths])
    scored = pages.map_batches(PageScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                               num_cpus=threads_per_actor,
                               fn_constructor_kwargs={"model": model, "threads": threads_per_actor,
                                                      "options": options})
    rows = 0
    with open(out / "detections.jsonl", "w") as jsonl:
        for row in scored.iter_rows():  # streamed: the driver never holds every page's answer
            result = json.loads(row["result"])
            if maps and "scores" in result:
                s = result.pop("scores")
                grid = np.frombuffer(base64.b64decode(s["data"]), "<f4").reshape(s["shape"])
                (out / "maps").mkdir(exist_ok=True)
                np.save(out / "maps" / f"{Path(row['path']).stem}.npy", grid)
            jsonl.write(json.dumps({"path": row["path"], **result}) + "\n")
            rows += 1
    seconds = time.perf_counter() - started
    return {"pages": rows, "actors": actors, "seconds": round(seconds, 2),
            "pages_per_s": round(rows / seconds, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m batch", description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, required=True, help="a folder of images or a manifest file")
    p.add_argument("--out", type=Path, default=Path("results/batch"))
    p.add_argument("--model", default="digit-detector")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--threads-per-actor", type=int, default=1)
    p.add_argument("--address", default=None, help="a Ray cluster (auto: the one this node is in); "
                                                     "default: start a local Ray")
    p.add_argument("--scales", default="1")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--maps", action="store_true", help="also write each page's score map (.npy)")
    args = p.parse_args(argv)
    import ray

    ray.init(address=args.address, runtime_env={"env_vars": {
        k: v for k, v in os.environ.items() if k in ("BENTOML_HOME", "BENTOML_DO_NOT_TRACK")}})
    summary = score(page_paths(args.input), args.out, args.model, args.actors, args.threads_per_actor,
                    args.maps, scales=args.scales, threshold=args.threshold)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
