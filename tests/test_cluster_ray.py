"""Ray across nodes: `python -m batch` submitted with `ray job submit` to a two-node cluster (head and
worker as separate `ray start` processes, tests/ray_two_nodes.py) inside network and PID namespaces of
their own with only loopback up. Each job's rows equal what a single `bentoml serve` process answers on
POST /score_map for the same pages (the same code, service/pipeline/score.py, with the same defaults); the
second job's actors ran on both nodes; every Ray process is gone after SIGTERM to the two `ray start`
pids (the PID namespace is only the safety net). Rows/s on one and two nodes are printed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import CI, PYTHON, ROOT

from loadtest import samples
from loadtest.servers import Server

RAY = Path(PYTHON).with_name("ray")  # the venv's, as ray_two_nodes.py runs it
pytestmark = pytest.mark.skipif(
    not RAY.is_file() and not CI, reason="Ray is not installed in this environment: pip install -c "
    "constraints.txt -e '.[ray]' (make test's environment has it) to run batch on a two-node Ray cluster")
PAGES = 16  # of 512²: a few seconds of scoring per job on 2 cores, so rows/s means something


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> str:
    """A BentoML store with the shipped digit detector (bentomodels/), imported by the CLI."""
    home = tmp_path_factory.mktemp("shipped") / "bentoml"
    # absolute: BentoML 1.4 reads a relative export path from /
    subprocess.run([str(Path(PYTHON).with_name("bentoml")), "models", "import",
                    str(ROOT / "bentomodels" / "digit-detector.bentomodel")],
                   env={**os.environ, "BENTOML_HOME": str(home)}, check=True, capture_output=True,
                   timeout=120)
    return str(home)


def test_batch_on_a_two_node_ray_cluster_equals_the_server(shipped, tmp_path, capsys):
    pages = tmp_path / "pages"
    pages.mkdir()
    for i, page in enumerate(samples.pages(PAGES)):
        (pages / f"page{i:02d}.png").write_bytes(page)
    reference = {}
    with Server(shipped, tmp_path / "serve.log", workers=1, models="digit-detector") as server:
        for path in sorted(pages.iterdir()):
            r = httpx.post(f"{server.url}/score_map", files={"image": (path.name, path.read_bytes())},
                           timeout=60)
            assert r.status_code == 200, r.text
            reference[str(path)] = r.json()["detections"]
    out = tmp_path / "out"
    # `ip link set lo up` first: a new network namespace starts with loopback down
    run = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
                          "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                          PYTHON, str(ROOT / "tests" / "ray_two_nodes.py"), str(pages), str(out), shipped],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    cluster = json.loads(lines[-1])
    assert cluster["left"] == [], "processes still running after both `ray start` got SIGTERM"
    assert cluster["scorer_nodes"] == 2, cluster
    for job in ("one", "two"):
        rows = [json.loads(line) for line in (out / job / "detections.jsonl").read_text().splitlines()]
        assert sorted(r["path"] for r in rows) == sorted(reference)
        for row in rows:
            assert row["detections"] == reference[row["path"]], (job, row["path"])
    assert any(reference.values()), "synthesized pages have digits"
    one, two = cluster["one_node"], cluster["two_nodes"]
    with capsys.disabled():
        print(f"\nRay job, {PAGES} pages of 512²: 1 node (1 actor) {one['pages_per_s']} rows/s, 2 nodes "
              f"(2 actors) {two['pages_per_s']} rows/s; `ray job submit` {one['submit_s']} / "
              f"{two['submit_s']} s; worker joined in {cluster['worker_join_s']} s; "
              f"cluster up to all stopped {cluster['cluster_s']} s")
