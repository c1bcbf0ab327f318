"""Batch dense scoring on a local Ray (batch/): every page's detections equal the single-process
scorer's (service/pipeline/score.py through an engine, in a process of its own), with 1 and with 2 actors;
pages per second for each are recorded in the test's output."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import yaml
from conftest import PYTHON, ROOT

from loadtest import samples

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")

REFERENCE = """
import json, sys
from pathlib import Path
from service.pipeline import images, options
from service.pipeline import score as scoring
from service.engine import Engine
from service.settings import Settings
settings = Settings(models="digit-detector", threads=1, warmup_rounds=1)
engine = Engine.from_store(settings)
card = engine.models["digit-detector"].card
opts = options.parse(outputs="detections")
out = {}
for path in sys.argv[1:]:
    im = images.decode(Path(path).read_bytes(), settings.max_image_pixels, path)
    out[path] = scoring.score_page(engine.bind("digit-detector"), im, card, opts, settings.tile_pixels)
engine.close()
print(json.dumps(out))
"""


def test_ray_batch_scoring_equals_the_single_process_scorer(store, tmp_path, capsys):
    from batch.__main__ import page_paths, score

    folder = tmp_path / "pages"
    folder.mkdir()
    for i, page in enumerate(samples.pages(4)):
        (folder / f"page{i}.png").write_bytes(page)
    (folder / "notes.txt").write_text("not a page")  # skipped: not an image suffix
    paths = page_paths(folder)
    assert len(paths) == 4
    env = {**os.environ, "BENTOML_HOME": str(store), "BENTOML_DO_NOT_TRACK": "true"}
    reference = json.loads(subprocess.run([PYTHON, "-c", REFERENCE, *paths], cwd=ROOT, env=env,
                                          capture_output=True, text=True, check=True, timeout=300).stdout)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             runtime_env={"env_vars": {"BENTOML_HOME": str(store), "BENTOML_DO_NOT_TRACK": "true"}})
    try:
        runs = {actors: score(paths, tmp_path / f"out{actors}", actors=actors, maps=actors == 2)
                for actors in (1, 2)}
    finally:
        ray.shutdown()
    for actors, summary in runs.items():
        assert summary["pages"] == 4
        written = (tmp_path / f"out{actors}" / "detections.jsonl").read_text()
        rows = [json.loads(line) for line in written.splitlines()]
        assert sorted(r["path"] for r in rows) == paths
        for row in rows:
            assert row["detections"] == reference[row["path"]]["detections"], (actors, row["path"])
            assert row["detections"], "a synthesized page has digits"
    grid = np.load(tmp_path / "out2" / "maps" / "page0.npy")
    assert grid.shape[0] == 11 and grid.dtype == np.float32  # 10 digits + background, per cell
    measured = ", ".join(f"{a} actor(s) {s['pages_per_s']} pages/s ({s['seconds']} s)"
                         for a, s in runs.items())
    with capsys.disabled():
        print(f"\nRay batch scoring, 4 pages of 512²: {measured}")


def test_the_rayjob_runs_the_same_command_with_the_same_image():
    job = yaml.safe_load((ROOT / "deploy" / "ray" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "-m batch" in job["spec"]["entrypoint"] and "--address auto" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    images = {c["image"] for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert images == {"convserve:ray"}
    assert job["spec"]["shutdownAfterJobFinishes"] is True
