"""The shipped models: bentomodels/*.bentomodel, store exports that `make artifacts` writes and a fresh
`make serve` imports instead of training. Imported here into a fresh BENTOML_HOME by the Makefile's
own `make store` step; checked as the service loads them (card from the store, onnxruntime session),
and against the held-out digits. Training and export end to end stay tested through conftest.store.

BentoML fixes its store directory once per process, so the store is read in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PYTHON, ROOT
from PIL import Image

from modelcard import ModelCard
from service.engine.sessions import open_model
from service.settings import Settings

SHIPPED_DIR = ROOT / "bentomodels"
SHIPPED = ["lenet5", "lenet5-int8", "digit-detector"]  # the Makefile's SHIPPED
VENV = Path(sys.prefix)


def make(target: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    """`make TARGET` with this interpreter's venv and BENTOML_HOME=home; -o keeps make from
    (re)installing the serving venv, which is not what these tests are about."""
    cmd = ["make", "--no-print-directory", target, f"VENV={VENV}", "SERVE_EXTRAS=cpu",
           "-o", f"{VENV}/.installed-cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "BENTOML_HOME": str(home)},
                          capture_output=True, text=True, timeout=180)


def shipped_version(name: str) -> str:
    with tarfile.open(SHIPPED_DIR / f"{name}.bentomodel") as tar:
        return yaml.safe_load(tar.extractfile("./model.yaml"))["version"]


READ_STORE = """
import json, sys, bentoml
out = {}
for name in sys.argv[1:]:
    m = bentoml.models.get(name)
    out[name] = {"tag": str(m.tag), "card": dict(m.info.metadata), "onnx": m.path_of("model.onnx")}
print(json.dumps(out))
"""


def read_store(home: Path, names: list[str]) -> dict:
    done = subprocess.run([PYTHON, "-c", READ_STORE, *names], env={**os.environ, "BENTOML_HOME": str(home)},
                          capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def fresh_store(tmp_path_factory):
    """What the first `make serve` on a fresh machine does before it serves: `make store` on an empty
    BENTOML_HOME. Then the int8 model, as `make bench` would (`need_models` with all three)."""
    home = tmp_path_factory.mktemp("shipped") / "bentoml"
    first = make("store", home)
    subprocess.run([str(VENV / "bin" / "bentoml"), "models", "import",
                    str(SHIPPED_DIR / "lenet5-int8.bentomodel")],
                   env={**os.environ, "BENTOML_HOME": str(home)}, check=True, capture_output=True, timeout=60)
    return home, first


@pytest.fixture(scope="module")
def shipped(fresh_store):
    home, _ = fresh_store
    stored = read_store(home, SHIPPED)
    return {name: (s, open_model(s["tag"], ModelCard.from_dict(s["card"]), s["onnx"], Settings(threads=1)))
            for name, s in stored.items()}


def test_every_shipped_export_is_there_and_small():
    for name in SHIPPED:
        size = (SHIPPED_DIR / f"{name}.bentomodel").stat().st_size
        assert 10_000 < size < 1_500_000, (name, size)
    served = Settings().model_tags
    assert set(served) <= set(SHIPPED), "a default `make serve` needs a model that is not shipped"


def test_a_fresh_store_gets_the_shipped_models_without_training(fresh_store):
    home, first = fresh_store
    assert first.returncode == 0, first.stdout + first.stderr
    assert "training" not in first.stdout + first.stderr and "models.train" not in first.stdout
    stored = read_store(home, Settings().model_tags)
    for name, s in stored.items():
        assert s["tag"] == f"{name}:{shipped_version(name)}"
    again = make("store", home)  # models already there: kept, nothing imported
    assert again.returncode == 0 and "import" not in again.stdout.lower(), again.stdout


def test_without_an_export_make_serve_trains(tmp_path):
    """The fallback: no export for a missing model → `make artifacts` (recorded here, not run)."""
    empty = tmp_path / "no-exports"
    empty.mkdir()
    done = make("store", tmp_path / "bentoml", f"SHIPPED_DIR={empty}", "MAKE=echo WOULD-RUN make")
    assert done.returncode == 0, done.stderr
    assert "WOULD-RUN make artifacts" in done.stdout


def test_plan_of_make_serve_and_bench(tmp_path):
    serve = subprocess.run(["make", "-n", "serve", "VENV=.venv-nonexistent"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "BENTOML_HOME": str(tmp_path)})
    plan = serve.stdout
    assert "-e '.[cpu]'" in plan, plan  # a fresh `make serve` installs only the serving extra
    assert plan.index("models import") < plan.index("bentoml serve")
    assert "models.train" not in plan
    bench = subprocess.run(["make", "-n", "bench", "VENV=.venv-nonexistent"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert "for m in lenet5 lenet5-int8 digit-detector" in bench.stdout


def test_cards_are_complete_and_match_the_onnx_files(shipped):
    from export.card import read_embedded

    for name, (stored, model) in shipped.items():
        card = stored["card"]
        assert card["name"] == name and stored["tag"] == f"{name}:{card['version']}"
        assert {"schema", "name", "version", "arch", "description", "labels", "input", "dense", "onnx",
                "provenance", "exported_at"} <= card.keys()
        assert {"mode", "channels", "height", "width", "scale", "mean", "std"} <= card["input"].keys()
        assert {"window", "stride", "offset", "receptive_field", "receptive_field_offset", "padded",
                "exact", "deviation"} <= card["dense"].keys()
        assert {"input", "output", "opset"} <= card["onnx"].keys()
        prov = card["provenance"]
        assert {"data", "held_out_accuracy", "train_record", "versions", "quantization"} <= prov.keys()
        assert prov["data"] == "mnist" and 0.97 < prov["held_out_accuracy"] <= 1
        assert {"seed", "epochs"} <= prov["train_record"].keys()
        assert card["dense"]["exact"] and card["dense"]["deviation"]["argmax_agreement"] == 1.0
        assert read_embedded(Path(stored["onnx"])) == card
        assert model.window_shape == (1, 28, 28)
    assert shipped["digit-detector"][0]["card"]["labels"][-1] == "background"
    assert shipped["lenet5"][0]["card"]["labels"] == [str(d) for d in range(10)]
    assert shipped["lenet5-int8"][0]["card"]["provenance"]["quantization"]["top1_agreement"] > 0.99


def held_out_accuracy(model, mnist) -> float:
    _, held = mnist
    scores = model.infer(held.images[:, None])["scores"]  # uint8 (N, 1, 28, 28): normalized as the card says
    return float((scores.reshape(len(held.labels), -1).argmax(1) == held.labels).mean())


@pytest.mark.parametrize("name", ["lenet5", "digit-detector"])
def test_served_models_reach_their_stated_accuracy_on_held_out_digits(shipped, mnist, name):
    stored, model = shipped[name]
    stated = stored["card"]["provenance"]["held_out_accuracy"]
    assert held_out_accuracy(model, mnist) == pytest.approx(stated, abs=0.0015)  # ONNX vs torch: ≤ 1 digit


def test_int8_stays_within_a_point_of_fp32(shipped, mnist):
    fp32 = shipped["lenet5"][0]["card"]["provenance"]["held_out_accuracy"]
    assert held_out_accuracy(shipped["lenet5-int8"][1], mnist) >= fp32 - 0.01


def test_the_readme_example_digit_is_a_held_out_two_and_lenet_says_so(shipped, mnist):
    pixels = np.asarray(Image.open(ROOT / "docs" / "digit.png"))
    _, held = mnist
    (index,) = np.flatnonzero((held.images == pixels).all(axis=(1, 2)))
    assert held.labels[index] == 2
    assert shipped["lenet5"][1].infer(pixels[None, None])["scores"].reshape(-1).argmax() == 2
