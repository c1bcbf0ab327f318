"""The benchmark's measuring code: FLOP counting, window extraction, and int8 correctness on the trained
default model (the numbers `make bench` reports are only as good as these). No timings are asserted."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bench import inprocess, peers, report
from export.card import read_embedded
from loadtest import samples, wrk
from loadtest.servers import TritonServer, stored_model, triton_python
from modelcard import ModelCard
from service.pipeline import images


def stored_onnx(store, name: str) -> str:
    return str(next((store / "models" / name).glob("*/model.onnx")))


def test_conv_macs_counts_a_conv_by_hand(tmp_path):
    weight = numpy_helper.from_array(np.zeros((4, 2, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "one-conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    assert inprocess.conv_macs(str(path), (1, 2, 10, 10)) == 4 * 8 * 8 * (2 * 3 * 3)
    assert inprocess.conv_macs(str(path), (3, 2, 10, 12)) == 3 * 4 * 8 * 10 * (2 * 3 * 3)


def test_windows_are_every_crop_at_the_stride():
    image = np.random.default_rng(0).standard_normal((3, 40, 50), dtype=np.float32)
    crops = inprocess.windows(image, 28, 4)
    expected = [image[:, y:y + 28, x:x + 28] for y in range(0, 13, 4) for x in range(0, 23, 4)]
    np.testing.assert_array_equal(crops, np.stack(expected))


def test_dense_vs_windows_reports_the_flop_ratio(store):
    path = stored_onnx(store, "lenet5")
    card = ModelCard.from_dict(read_embedded(path))
    image = np.random.default_rng(0).standard_normal((1, 64, 64), dtype=np.float32)
    row = inprocess.dense_vs_windows(path, card, image, threads=1)
    assert row["windows"] == ((64 - 28) // 4 + 1) ** 2 == 100
    assert 1 < row["flop_ratio"] < row["windows"] and row["speedup"] > 0


def test_int8_default_model_keeps_accuracy(store, mnist):
    """Issue 5's bar for the served int8 LeNet: ≤ 0.3 points accuracy lost on the held-out digits."""
    fp32, int8 = stored_onnx(store, "lenet5"), stored_onnx(store, "lenet5-int8")
    card = read_embedded(fp32)
    _, held = mnist
    spec = ModelCard.from_dict(card).input
    x = spec.normalize(np.stack([images.window_pixels(Image.fromarray(p), spec) for p in held.images]))
    result = inprocess.agreement(fp32, int8, x, held.labels, threads=1)
    # What users get: the same answers, no accuracy lost; stable across training seeds (≈ across
    # CPUs): agreement ≥ 0.999, drop ≤ 0.0 on seeds 0-2 (0.996 and 0.0 seen on another machine).
    assert result["top1_agreement"] >= 0.99, result
    assert result["fp32_accuracy"] - result["int8_accuracy"] <= 0.003, result
    # How far the scores move. Not result["relative_score_error"]: one norm over all images is ruled
    # by a few outlier digits (5 images = 11-70 % of it) and swung 0.009-0.21 between seeds/CPUs.
    # The median image's error is stable (0.0090-0.0091 on seeds 0-2 with 8-bit weights, 0.0118 with
    # the 7-bit ones of issue 20 (seed 0), the same on AVX2 and VNNI; 8-bit weights gave 0.2 on AVX2: see
    # export/quantize.py and tests/test_int8_isa.py, which runs this check under AVX2 emulation too);
    # it must be > 0 (the int8 file really is quantized) and small (a bad scale or calibration moves
    # every image).
    fp, q = (inprocess.session(path, 1).run(None, {"input": x})[0].reshape(len(x), -1)
             for path in (fp32, int8))
    median = float(np.median(np.linalg.norm(q - fp, axis=1) / np.linalg.norm(fp, axis=1)))
    assert 0.001 < median < 0.05, median


# PyTriton, the bench's Triton peer (bench/peers.py): skipped cleanly without its venv; where
# `make bench-triton-venv` made it, a real tritonserver (never a mock) answers as convserve does.
needs_triton = pytest.mark.skipif(triton_python() is None or shutil.which("wrk") is None,
                                  reason="no Triton venv (make bench-triton-venv) or no wrk")


def test_triton_race_is_skipped_without_its_venv(tmp_path):
    result = peers.run(tmp_path / "no-store", tmp_path, seconds=1, rounds=1, venv=tmp_path / "no-venv")
    assert result == {"skipped": peers.SKIPPED}
    assert report.peers(result)[-1] == "skipped: make bench-triton-venv"
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def probabilities(url: str, body: bytes, header_length: str) -> np.ndarray:
    r = httpx.post(f"{url}{peers.V2}", content=body, timeout=30,
                   headers={"Content-Type": "application/octet-stream",
                            "Inference-Header-Content-Length": header_length.split(": ")[1]})
    assert r.status_code == 200, r.text
    head = int(r.headers["inference-header-content-length"])
    (out,) = json.loads(r.content[:head])["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32", out
    return np.frombuffer(r.content[head:], "<f4").reshape(out["shape"])


@needs_triton
def test_pytriton_answers_identical_bodies_as_convserve_does(store, server, tmp_path):
    """The same /v2 bodies (FP32 tensors, BYTES PNGs) to both: the same probabilities, mostly the
    right digits; and no process of PyTriton's group (tritonserver, its stub) outlives the context."""
    digits = samples.digits(8)
    pngs, labels = [d for d, _ in digits], [label for _, label in digits]
    _, meta = stored_model(store, "lenet5")
    card = ModelCard.from_dict(meta)
    tensor = (card.onnx.input, "FP32", [1, 1, 28, 28])
    with TritonServer(store, tmp_path / "pytriton.log") as triton:
        assert triton.grpc_port != triton.port
        for bodies, length in (wrk.v2_bodies(pngs), wrk.v2_bodies(peers.fp32_tensors(card, pngs), tensor)):
            right = 0
            for body, label in zip(bodies, labels, strict=True):
                ours, theirs = (probabilities(url, body, length) for url in (server.url, triton.url))
                np.testing.assert_allclose(theirs, ours, atol=1e-5)
                right += int(theirs.argmax()) == label
            assert right >= 7, right  # the model's own accuracy (98.4 %): 7 of these 8 digits
        group = triton.process.pid
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
    assert not triton.workspace.exists()


@needs_triton
def test_triton_race_runs_real_servers(store, tmp_path):
    """One short round: every server answered every request, and each /v2 pair got identical bodies."""
    result = peers.run(store, tmp_path, seconds=1, rounds=1, connections=4)
    assert set(result["rows"]) == set(peers.PAIRS_FLAT), result
    for name, row in result["rows"].items():
        assert row["requests"] > 0 and row["failures"] == 0, (name, row)
    assert all(x["identical_bodies"] for x in result["ratios"].values()), result["ratios"]
    text = "\n".join(report.peers(result))
    assert "PyTriton /v2 BYTES PNG" in text and "bodies differ" not in text
