"""The service, end to end: a real `bentoml serve` process over HTTP, with models made by the real
train and export CLIs (see conftest.store)."""

from __future__ import annotations

import base64
import io
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import MAX_BYTES, PYTHON, ROOT
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from loadtest import samples
from loadtest.servers import BaselineServer, Server


def png(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def classify(url: str, files: list[bytes], **form) -> httpx.Response:
    parts = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(files)]
    return httpx.post(f"{url}/classify", files=parts, data={k: str(v) for k, v in form.items()},
                      timeout=60)


def metric(url: str, name: str, model: str, kind: str = "window") -> float:
    """A per-model engine series from /metrics (kind: classifier-sized batches, or dense)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == name and s.labels.get("model") == model and s.labels.get("kind") == kind:
                return s.value
    return 0.0


def test_not_ready_until_warmed_up(server):
    assert server.statuses[-1] == 200
    assert 503 in server.statuses and 200 not in server.statuses[:-1], server.statuses
    cards = httpx.get(f"{server.url}/models").json()
    assert cards["ready"] and all(m["warmup_ms"] > 0 for m in cards["models"])


def test_models_lists_cards_and_provider(server):
    body = httpx.get(f"{server.url}/models").json()
    names = {m["name"]: m for m in body["models"]}
    assert set(names) == {"lenet5", "digit-detector"}
    assert body["defaults"] == {"classify": "lenet5", "score_map": "digit-detector"}
    lenet = names["lenet5"]
    assert lenet["provider"] == "CPUExecutionProvider"
    # 0.975, not the 0.98 bar: seeds 0-2 (what another CPU's float order amounts to) reach 0.984-0.987
    assert lenet["dense"]["stride"] == 4 and lenet["provenance"]["held_out_accuracy"] >= 0.975
    assert names["digit-detector"]["labels"][-1] == "background"


def test_held_out_digits_over_http(server):
    digits = samples.digits(200)
    correct = 0
    for i in range(0, len(digits), 50):
        chunk = digits[i : i + 50]
        response = classify(server.url, [data for data, _ in chunk], top_k=3)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "lenet5" and body["version"]
        for prediction, (_, label) in zip(body["predictions"], chunk, strict=True):
            assert len(prediction["top_k"]) == 3
            correct += prediction["top_k"][0]["label"] == str(label)
    assert correct / len(digits) >= 0.965, correct  # seeds 0-2: 2 of 200 wrong, which 2 varies


def test_fastapi_baseline_answers_the_same_labels(server, store, tmp_path):
    """The benchmark's baseline must do the same work: same model, same preprocessing, same answers."""
    digits = [data for data, _ in samples.digits(40)]
    with BaselineServer(store, tmp_path / "baseline.log") as baseline:
        theirs = [httpx.post(f"{baseline.url}/classify", files={"image": ("d.png", d)}, timeout=30).json()
                  for d in digits]
    ours = classify(server.url, digits).json()["predictions"]
    for mine, their in zip(ours, theirs, strict=True):
        (a,), (b,) = mine["top_k"], their["predictions"][0]["top_k"]
        assert a["label"] == b["label"] and abs(a["probability"] - b["probability"]) < 1e-4, (a, b)


def test_base64_json_gives_the_same_answer(server):
    data = samples.digits(10)[3][0]
    multipart = classify(server.url, [data], top_k=2).json()["predictions"][0]["top_k"]
    response = httpx.post(f"{server.url}/classify_base64", timeout=30,
                          json={"images_b64": [base64.b64encode(data).decode()], "top_k": 2})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["top_k"] == multipart


def test_score_map_geometry_and_cells_equal_classify_on_crops(server, mnist):
    from models.pages import synth_page

    page = synth_page(np.random.default_rng(3), mnist[1].images, mnist[1].labels, 60, 88, 3).image
    response = httpx.post(f"{server.url}/score_map", files={"image": ("page.png", png(page))},
                          data={"outputs": "argmax,scores"}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    geo = body["geometry"]
    assert (geo["window"], geo["stride"], geo["offset"], geo["exact"]) == (28, 4, 0, True)
    assert (geo["map_height"], geo["map_width"]) == ((60 - 28) // 4 + 1, (88 - 28) // 4 + 1)
    raw = body["scores"]
    scores = np.frombuffer(base64.b64decode(raw["data"]), "<f4").reshape(raw["shape"])
    assert scores.shape == (11, geo["map_height"], geo["map_width"])
    probs = np.exp(scores - scores.max(0)) / np.exp(scores - scores.max(0)).sum(0)
    assert (probs.argmax(0) == np.array(body["argmax"])).all()

    cells = [(i, j) for i in range(geo["map_height"]) for j in range(geo["map_width"])]
    for start in range(0, len(cells), 64):
        batch = cells[start : start + 64]
        crops = [png(page[4 * i : 4 * i + 28, 4 * j : 4 * j + 28]) for i, j in batch]
        got = classify(server.url, crops, model="digit-detector", top_k=11).json()["predictions"]
        for (i, j), prediction in zip(batch, got, strict=True):
            p = {t["label"]: t["probability"] for t in prediction["top_k"]}
            expected = probs[:, i, j]
            assert max(abs(p[label] - expected[k]) for k, label in enumerate(body["labels"])) <= 1e-4


def test_batches_form_under_concurrent_load(server):
    digits = [data for data, _ in samples.digits(50)]
    before_batches = metric(server.url, "convserve_batch_size_count", "lenet5")
    before_images = metric(server.url, "convserve_batch_size_sum", "lenet5")
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(lambda d: classify(server.url, [d]).status_code, digits * 8))
    assert statuses == [200] * 400
    batches = metric(server.url, "convserve_batch_size_count", "lenet5") - before_batches
    images = metric(server.url, "convserve_batch_size_sum", "lenet5") - before_images
    assert images == 400 and batches < images, (batches, images)  # some calls carried > 1 image
    assert metric(server.url, "convserve_queue_seconds_count", "lenet5") > 0


def test_metrics_split_queue_compute_batch_and_request_time(server):
    """Triton-style visibility: per model queue time, compute time and batch size; per endpoint and
    status the request time (ClassifyRoute's histogram: /classify has no access log, see service.py)."""
    classify(server.url, [samples.digits(1)[0][0]])
    classify(server.url, [samples.digits(1)[0][0]], model="resnet")
    samples_ = [s for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
                for s in f.samples if s.name.startswith("convserve_")]
    for name in ("batch_size", "queue_seconds", "compute_seconds", "request_seconds"):
        assert any(s.name == f"convserve_{name}_count" for s in samples_), sorted({s.name for s in samples_})
    page = {"image": ("p.png", png(np.zeros((64, 64), np.uint8)))}
    assert httpx.post(f"{server.url}/score_map", files=page, timeout=30).status_code == 200
    assert metric(server.url, "convserve_compute_seconds_count", "digit-detector", kind="dense") >= 1
    requests = {s.labels["status"]: s.value for s in samples_ if s.name == "convserve_request_seconds_count"}
    assert requests.get("200", 0) >= 1 and requests.get("404", 0) >= 1, requests


def _bad_requests(url):
    digit = samples.digits(1)[0][0]
    big = Image.new("L", (12000, 12000))  # 144 megapixels of zeros: a ~140 kB PNG "bomb"
    bomb = io.BytesIO()
    big.save(bomb, format="PNG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 40)).save(cmyk, format="JPEG")
    post = lambda route, **kw: httpx.post(f"{url}{route}", timeout=60, **kw)  # noqa: E731
    files = lambda *blobs: [("image", (f"{i}.png", b)) for i, b in enumerate(blobs)]  # noqa: E731
    return {
        "not an image": (post("/classify", files=files(b"hello, world")), 415, "unsupported_image"),
        "truncated": (post("/classify", files=files(digit[: len(digit) // 2])), 422, "invalid_image"),
        "empty file": (post("/classify", files=files(b"")), 422, "invalid_image"),
        "decompression bomb": (post("/classify", files=files(bomb.getvalue())), 413, "image_too_large"),
        "CMYK": (post("/classify", files=files(cmyk.getvalue())), 415, "unsupported_mode"),
        "16-bit": (post("/classify", files=files(png(np.zeros((30, 30), np.uint16)))),
                   415, "unsupported_mode"),
        "too small to classify": (post("/classify", files=files(png(np.zeros((4, 4), np.uint8)))),
                                  422, "image_too_small"),
        "smaller than the window": (post("/score_map", files={"image": ("s.png", png(np.zeros((20, 90),
                                    np.uint8)))}), 422, "image_too_small"),
        "body over the limit": (post("/classify", files=files(b"\0" * (MAX_BYTES + 1))), 413,
                                "payload_too_large"),
        "too many images": (post("/classify", files=files(*[digit] * 65)), 413, "too_many_images"),
        "unknown model": (post("/classify", files=files(digit), data={"model": "resnet"}), 404,
                          "unknown_model"),
        "top_k not a number": (post("/classify", files=files(digit), data={"top_k": "abc"}), 422,
                               "invalid_parameter"),
        "top_k zero": (post("/classify", files=files(digit), data={"top_k": "0"}), 422,
                       "invalid_parameter"),
        "invert not a boolean": (post("/classify", files=files(digit), data={"invert": "maybe"}), 422,
                                 "invalid_parameter"),
        "misspelt field": (post("/classify", files=files(digit), data={"topk": "3"}), 422,
                           "invalid_parameter"),
        # BentoML's own file inputs download a URL sent as text; ours refuse text where a file belongs
        # (issue 21: a text value where a file is expected is a 422)
        "URL in the image field": (post("/classify", files={"image": (None, b"http://127.0.0.1:1/x")}),
                                   422, "invalid_image"),
        "multipart without an image": (post("/classify", files={"top_k": (None, b"1")}), 422,
                                       "no_image"),
        "broken multipart": (post("/classify", content=b"--x\r\nnonsense",
                                  headers={"content-type": "multipart/form-data; boundary=x"}), 400,
                             "bad_request"),
        "top_k over labels": (post("/classify", files=files(digit), data={"top_k": "11"}), 422,
                              "invalid_parameter"),
        "unknown output": (post("/score_map", files={"image": ("d.png", digit)},
                                data={"outputs": "pixels"}), 422, "invalid_parameter"),
        "not multipart": (post("/classify", data={"top_k": "1"}), 415, "unsupported_media_type"),
        "bad base64": (post("/classify_base64", json={"images_b64": ["%%%"]}), 422, "invalid_image"),
        "unknown route": (post("/nope"), 404, "not_found"),
        "wrong method": (httpx.get(f"{url}/classify"), 405, "method_not_allowed"),
    }


def test_bad_input_gets_json_4xx_and_the_server_keeps_serving(server):
    for name, (response, status, kind) in _bad_requests(server.url).items():
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        error = response.json()["error"]
        assert error["type"] == kind and error["status"] == status and error["message"], (name, error)
    digit, label = samples.digits(20)[5]
    response = classify(server.url, [digit])
    assert response.status_code == 200
    assert response.json()["predictions"][0]["top_k"][0]["label"] == str(label)
    assert server.process.poll() is None


def test_locust_ten_seconds_without_failures(server, tmp_path):
    from loadtest.run import run

    summary = run(server.url, "mixed", users=16, run_time=10, out=tmp_path)
    assert summary["total"]["requests"] > 100 and summary["total"]["failures"] == 0, summary
    assert summary["endpoints"]["/score_map"]["requests"] > 0
    assert (tmp_path / "mixed_stats.csv").exists() and (tmp_path / "mixed.html").exists()


def test_loadtest_refuses_other_hosts():
    from loadtest.run import run

    with pytest.raises(SystemExit, match="loopback"):
        run("http://10.0.0.1:3000", "classify", 1, 1, ROOT / "results" / "never")


def test_service_never_imports_torch(store):
    code = "import sys, service.service; sys.exit('torch' in sys.modules or 'models' in sys.modules)"
    result = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"BENTOML_DO_NOT_TRACK": "true", "PATH": "/usr/bin:/bin",
                                 "BENTOML_HOME": str(store)})
    assert result.returncode == 0, result.stderr[-2000:]


def test_missing_model_stops_the_server_with_advice(tmp_path):
    """A server asked for a model the store lacks says which and how to make it, then exits."""
    srv = Server(tmp_path / "empty", tmp_path / "serve.log", models="lenet5")
    try:
        with pytest.raises(RuntimeError, match="exited"):
            srv.readiness(timeout=60)
        assert "make artifacts" in (tmp_path / "serve.log").read_text()
    finally:
        srv.stop()
