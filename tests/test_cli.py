"""Bad command lines end in one clear `error:` line and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import PYTHON, ROOT

from models.registry import build


def _run(*args):
    return subprocess.run([PYTHON, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def classic_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "classic.pt"
    torch.save(build("lenet5-classic").state_dict(), path)
    return path


def _cases(tmp, classic):
    (tmp / "junk.pt").write_text("not a checkpoint")
    return {
        "train unknown arch": (["models.train", "--arch", "resnet"], "unknown arch 'resnet'"),
        "train bad data": (["models.train", "--data", "cifar"], "unknown data spec"),
        "train missing dir": (["models.train", "--data", f"idx:{tmp}/none"], "not a directory"),
        "export unknown arch": (["export", "--arch", "vgg", "--weights", str(classic)], "unknown arch"),
        "export missing weights": (["export", "--arch", "lenet5-relu", "--weights", str(tmp / "no.pt")],
                                   "does not exist"),
        "export wrong shapes": (["export", "--arch", "lenet5-relu", "--weights", str(classic),
                                 "--no-store", "--out", str(tmp)], "does not fit this architecture"),
        "export not a checkpoint": (["export", "--arch", "lenet5-relu", "--weights", str(tmp / "junk.pt"),
                                     "--no-store"], "is not a PyTorch state_dict"),
        "export no weights": (["export", "--arch", "lenet5-relu"], "give --weights"),
    }


CASES = [
    "train unknown arch", "train bad data", "train missing dir", "export unknown arch",
    "export missing weights", "export wrong shapes", "export not a checkpoint", "export no weights"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_error_line(tmp_path, classic_weights, case):
    args, message = _cases(tmp_path, classic_weights)[case]
    result = _run(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-800:]
    assert "Traceback" not in result.stderr
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], lines
