"""The heads in the graph (issue 14, items 1, 2 and 4): uint8 pixels normalized inside the graph, softmax
and TopK inside it, and the fp16 export, each against the numpy path the service had before, on real
MNIST digits; and a model exported the old way (no heads, old card) serving as it did."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest

from export.__main__ import main as export_main
from export.card import read_embedded
from modelcard import ModelCard
from modelcard.reference import softmax
from models import pages
from service.engine import Engine
from service.engine.sessions import Model, open_model
from service.settings import Settings

SETTINGS = Settings(threads=1, max_batch_size=64, batch_buckets="none", warmup_rounds=1,
                    switch_interval_ms=0)


@pytest.fixture(scope="module")
def exported(trained_lenet, tmp_path_factory):
    """The same trained LeNet exported with the heads (+ int8, fp16) and the old way (no heads)."""
    out = tmp_path_factory.mktemp("heads")
    export_main(["--arch", "lenet5-relu", "--weights", str(trained_lenet), "--out", str(out / "new"),
                 "--int8", "--fp16", "--no-store", "--name", "digits"])
    export_main(["--arch", "lenet5-relu", "--weights", str(trained_lenet), "--out", str(out / "old"),
                 "--no-heads", "--no-store", "--name", "digits"])
    return out


def model(path) -> Model:
    return open_model("digits:test", ModelCard.from_dict(read_embedded(path)), str(path), SETTINGS)


@pytest.fixture(scope="module")
def digits(mnist):
    """1,000 held-out real digits as the service feeds them, uint8 (N, 1, 28, 28), and a page of them."""
    held = mnist[1]
    page = pages.synth_page(np.random.default_rng(3), held.images, held.labels, 200, 260, n_digits=12)
    return held.images[:, None], page.image[None, None]


def test_the_card_says_what_the_graph_takes(exported):
    card = read_embedded(exported / "new" / "digits.onnx")
    assert card["input"]["dtype"] == "uint8" and card["input"]["layout"] == "NCHW"
    assert card["onnx"]["pixels"] == "pixels" and card["onnx"]["input"] == "input"  # float input kept
    assert card["onnx"]["heads"]["classify"]["k"] == 10
    assert card["onnx"]["heads"]["verified"]["pixels_vs_float"] <= 1e-5
    sess = ort.InferenceSession(str(exported / "new" / "digits.onnx"), providers=["CPUExecutionProvider"])
    # `input` as before (consumers that feed it alone keep working); `pixels` optional, empty by default
    assert [(i.name, i.type) for i in sess.get_inputs()] == [("input", "tensor(float)")]
    assert [i.name for i in sess.get_overridable_initializers()] == ["pixels"]
    old = read_embedded(exported / "old" / "digits.onnx")
    assert "dtype" not in old["input"] and "pixels" not in old["onnx"] and "heads" not in old["onnx"]


def test_uint8_pixels_give_the_float_paths_scores_on_real_digits(exported, digits):
    window, page = digits
    new, old = model(exported / "new" / "digits.onnx"), model(exported / "old" / "digits.onnx")
    assert new.takes_pixels and not old.takes_pixels
    for pixels in (window, page):
        reference = old.infer(old.input.normalize(pixels))["scores"]  # the numpy normalization, float graph
        scale = np.abs(reference).max()
        np.testing.assert_allclose(new.infer(pixels)["scores"], reference, rtol=0, atol=1e-5 * scale)
        # the old card
        np.testing.assert_allclose(old.infer(pixels)["scores"], reference, rtol=0, atol=1e-5 * scale)
        # float32 input, already normalized, still works on the new graph
        np.testing.assert_allclose(new.infer(new.input.normalize(pixels))["scores"], reference, rtol=0,
                                   atol=1e-5 * scale)


def test_topk_in_the_graph_equals_numpy_softmax_and_argsort(exported, digits):
    window, _ = digits
    new, old = model(exported / "new" / "digits.onnx"), model(exported / "old" / "digits.onnx")
    engine = Engine([new], SETTINGS)
    old_engine = Engine([old], SETTINGS)
    try:
        async def both():
            return (await engine.infer("digits", window[:64], "topk", k=3),
                    await old_engine.infer("digits", window[:64], "topk", k=3))

        (values, indices), (old_values, old_indices) = asyncio.run(both())
        scores = engine.infer_blocking("digits", window[:64])
    finally:
        engine.close()
        old_engine.close()
    probs = softmax(scores[:, :, 0, 0], axis=1)  # what ConvServe.classify computed before
    top = np.argsort(-probs, axis=1)[:, :3]
    assert values.shape == indices.shape == (64, 3)
    margin = -np.diff(-np.sort(-probs, axis=1)[:, :4], axis=1).min(axis=1)  # gap to the next class
    clear = margin > 1e-6  # where the order is not a float tie
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(indices[clear], top[clear])
    np.testing.assert_array_equal(old_indices, indices)  # numpy fallback: ties broken the same way
    np.testing.assert_allclose(values, np.take_along_axis(probs, top, 1), atol=1e-6)
    np.testing.assert_allclose(old_values, values, atol=1e-6)


def test_a_k_beyond_the_head_and_mixed_batches(exported, digits):
    """top_k over the head's k falls back to the scores; scores and top-k callers share batches."""
    window, _ = digits
    path = exported / "heads-k2.onnx"
    card = read_embedded(exported / "new" / "digits.onnx")
    card["onnx"]["heads"]["classify"]["k"] = 2  # the graph returns 10; the engine must not ask past 2
    card = ModelCard.from_dict(card)
    path.write_bytes((exported / "new" / "digits.onnx").read_bytes())
    engine = Engine([open_model("digits:k2", card, str(path), SETTINGS)], SETTINGS)
    try:
        async def mixed():
            return await asyncio.gather(engine.infer("digits", window[:5]),
                                        engine.infer("digits", window[5:9], "topk", k=2),
                                        engine.infer("digits", window[9:12], "topk", k=4))

        scores, (v2, i2), (v4, i4) = asyncio.run(mixed())
    finally:
        engine.close()
    assert scores.shape == (5, 10, 1, 1) and v2.shape == (4, 2) and v4.shape == (3, 4)
    probs = softmax(engine.models["digits"].infer(window[9:12])["scores"][:, :, 0, 0], axis=1)
    np.testing.assert_allclose(v4, -np.sort(-probs, axis=1)[:, :4], atol=1e-6)


def test_fp16_agrees_with_fp32_on_real_digits_and_says_so_in_its_card(exported, digits):
    card = read_embedded(exported / "new" / "digits-fp16.onnx")
    report = card["provenance"]["quantization"]
    assert report["method"].startswith("fp16") and report["images"] == 1000
    assert report["top1_agreement"] >= 0.99 and report["fp32_accuracy"] - report["fp16_accuracy"] <= 0.01
    assert 0 < report["relative_diff"] < 1e-2 and report["dense_argmax_agreement"] >= 0.99
    window, page = digits
    fp16, fp32 = model(exported / "new" / "digits-fp16.onnx"), model(exported / "new" / "digits.onnx")
    for pixels in (window[:256], page):
        a, b = fp16.infer(pixels)["scores"], fp32.infer(pixels)["scores"]
        assert a.dtype == np.float32 and np.abs(a - b).max() / np.abs(b).max() < 1e-2
        assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    int8 = read_embedded(exported / "new" / "digits-int8.onnx")
    assert int8["onnx"]["pixels"] == "pixels" and int8["provenance"]["quantization"]["top1_agreement"] >= 0.98


def test_io_binding_gives_the_same_answers_and_keeps_each_batchs_own(exported, digits):
    """CONVSERVE_IO_BINDING=on runs the CUDA binding code on a CPU: reused buffers, same numbers."""
    window, page = digits
    path = exported / "new" / "digits.onnx"
    bound = open_model("digits:b", ModelCard.from_dict(read_embedded(path)), str(path),
                       Settings(threads=1, io_binding="on"))
    plain = model(path)
    assert bound.binder is not None and plain.binder is None and bound.describe()["io_binding"]
    first = bound.infer(window[:8], {"scores", "topk"})
    second = bound.infer(window[8:16], {"topk"})  # the same buffers: `first` must not change
    np.testing.assert_array_equal(first["scores"], plain.infer(window[:8])["scores"])
    for got, rows in ((first["topk"], window[:8]), (second["topk"], window[8:16])):
        expected = plain.infer(rows, {"topk"})["topk"]
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    # dense: not bound, the same
    np.testing.assert_array_equal(bound.infer(page)["scores"], plain.infer(page)["scores"])
    np.testing.assert_array_equal(bound.infer(bound.input.normalize(window[:4]))["scores"],
                                  plain.infer(window[:4])["scores"])


def test_the_datapath_bench_runs(store, tmp_path):
    """bench/datapath.py, one round on LeNet (in a subprocess: BentoML fixes its store per process)."""
    import json
    import os
    import subprocess

    from conftest import PYTHON, ROOT

    subprocess.run([PYTHON, "-m", "bench.datapath", "--models", "lenet5", "--rounds", "1", "--no-score-map",
                    "--provider", "cpu", "--tile-pages", "700x520", "--tile-pixels", str(2**16),
                    "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=300,
                   env={**os.environ, "BENTOML_HOME": str(store)}, capture_output=True)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["levers"]["lenet5"]["batches"]["32"]
    assert set(rows) == {"before", "uint8 head", "uint8 + top-k heads", "+ IO binding",
                         "fp16, uint8 + top-k heads"}
    assert "| before |" in (tmp_path / "report.md").read_text()
    assert all(r["ms"] > 0 for r in results["dense_head"])  # [] where the detector has no peak head
    tiles = {r["tiles"]: r for r in results["tile_shapes"]}  # the same peaks asserted in the bench
    if tiles:
        assert tiles["one shape"]["shapes"] == 1 and tiles["cut to the page"]["shapes"] > 1
