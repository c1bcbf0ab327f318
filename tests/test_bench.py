"""The benchmark's measuring code: FLOP counting, window extraction, and int8 correctness on the trained
default model (the numbers `make bench` reports are only as good as these). No timings are asserted."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bench import inprocess
from export.card import read_embedded
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
