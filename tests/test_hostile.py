"""Requests nobody should send, against a real `bentoml serve` sized as the Deployment sizes it (a 2 GiB
memory limit): each gets a 4xx in the documented shape (or a bounded 200) in bounded time, the server's
RSS grows by less than 1 GiB, it opens no connection a request names, and a normal page is answered
promptly while a hostile one runs. The rows of RELIABILITY.md's "Hostile requests" table."""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from loadtest.servers import Server
from models.pages import synth_page

GiB = 2**30
BOUND_S = 30  # the bound for every hostile row


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


BLACK_4096 = png(np.zeros((4096, 4096), np.uint8))  # 16 KB on the wire, 16.7 M pixels decoded
FLAT_1024 = png(np.full((1024, 1024), 255, np.uint8))  # every cell a plateau: a 3×3 peak at threshold 0


class RSS:
    """The server's resident memory (every process of it), sampled every 20 ms: the peak growth."""

    def __init__(self, server: Server) -> None:
        self.root = psutil.Process(server.process.pid)
        self.base = self.now()
        self.peak = self.base
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> RSS:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.fixture(scope="module")
def hostile(store, tmp_path_factory):
    srv = Server(store, tmp_path_factory.mktemp("hostile") / "serve.log", memory_limit_mb=2048,
                 warmup_rounds=1)
    with srv:
        # one ordinary 4096² page first: onnxruntime's arena for a whole tile is then part of the
        # baseline, as in a server that has served for a while
        assert score(srv, BLACK_4096).status_code == 200
        yield srv


def score(srv: Server, image: bytes, timeout: float = BOUND_S + 30, **form: str) -> httpx.Response:
    return httpx.post(f"{srv.url}/score_map", files={"image": ("page.png", image)}, data=form,
                      timeout=timeout)


def refused(response: httpx.Response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["status"] == status and error["type"] and error["request_id"], error
    assert fragment in error["message"], error["message"]
    return error


@pytest.mark.slow
@pytest.mark.parametrize("form, status, fragment", [
    ({"scales": "0.25"}, 413, "scales"),  # a 16384² image to score: 268 M pixels
    ({"outputs": "heatmap"}, 413, "heatmap"),  # ~1.3 GB of heat map at 80 B per pixel
    ({"stride_factor": "4", "outputs": "scores"}, 413, "stride_factor"),  # 16 passes
    ({"outputs": "scores,argmax", "scales": "0.5,1"}, 413, "M pixels"),
])
def test_a_small_png_asking_for_a_lot_is_refused_before_it_runs(hostile, form, status, fragment):
    with RSS(hostile) as rss:
        started = time.monotonic()
        response = score(hostile, BLACK_4096, **form)
        took = time.monotonic() - started
    refused(response, status, fragment)
    assert took < BOUND_S and rss.growth < GiB, (took, rss.growth)


@pytest.mark.slow
def test_a_flat_page_at_threshold_zero_is_bounded_and_a_normal_page_is_answered_meanwhile(hostile, mnist):
    held = mnist[1]
    normal = png(synth_page(np.random.default_rng(0), held.images, held.labels, 512, 512, 12).image)
    out: dict = {}

    def flat() -> None:
        started = time.monotonic()
        out["flat"] = score(hostile, FLAT_1024, threshold="0", nms_iou="1")
        out["flat_s"] = time.monotonic() - started

    with RSS(hostile) as rss:
        thread = threading.Thread(target=flat)
        thread.start()
        time.sleep(0.3)  # the flat page is in flight
        started = time.monotonic()
        page = score(hostile, normal)
        page_s = time.monotonic() - started
        thread.join()
    assert page.status_code == 200 and page.json()["detections"], page.text[:300]
    assert page_s < 15, page_s
    assert out["flat"].status_code == 200 and out["flat_s"] < BOUND_S, (out["flat"].text[:300], out["flat_s"])
    assert rss.growth < GiB


@pytest.mark.slow
def test_a_client_that_hangs_up_stops_its_dense_job(hostile):
    """4096² with the map (~10 s here): the client leaves after 1 s; the job stops at its next tile and
    the next page does not wait for the rest of it."""
    with pytest.raises(httpx.TimeoutException):
        score(hostile, BLACK_4096, timeout=1, outputs="scores")
    started = time.monotonic()
    assert score(hostile, png(np.zeros((64, 64), np.uint8))).status_code == 200
    assert time.monotonic() - started < 5
    time.sleep(0.2)
    assert "a dense job stopped" in hostile.log.read_text()


@pytest.mark.slow
def test_the_server_never_fetches_what_a_request_names(hostile):
    """An image sent as text naming a URL on a listener of ours: 422, and no connection arrives."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(1.0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/page.png"
        for path in ("/score_map", "/classify"):
            response = httpx.post(f"{hostile.url}{path}", files={"image": (None, url)}, timeout=BOUND_S)
            assert response.status_code == 422 and "file part" in response.text, response.text
            assert response.json()["error"]["request_id"]
        with pytest.raises(TimeoutError):
            listener.accept()


def v2(srv: Server, body: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{srv.url}/v2/models/lenet5/infer", content=body, headers=headers or {},
                      timeout=BOUND_S)


def one_input(**tensor) -> dict:
    return {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                        "data": [0] * 784, **tensor}]}


MALFORMED = [
    ("a header length of 5,000 digits", json.dumps(one_input()).encode(),
     {"Inference-Header-Content-Length": "9" * 5000}, 400, "Inference-Header-Content-Length"),
    ("JSON nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, {}, 400, "nested too deep"),
    ("data nested 100,000 deep", json.dumps(one_input()).encode().replace(
        b"[0, 0", b"[" * 100_000 + b"0" + b"]" * 100_000 + b", [0, 0", 1), {}, 400, ""),
    ("a shape of 2^64 elements", json.dumps(one_input(shape=[2**32, 2**32, 1, 1], data=[])).encode(), {},
     400, ""),
    ("a shape with a huge dimension", json.dumps(one_input(shape=[10**30, 1, 28, 28])).encode(), {}, 400,
     "shape"),
    ("a boolean in a shape", json.dumps(one_input(shape=[True, 1, 28, 28])).encode(), {}, 400, "shape"),
    ("a million images declared", json.dumps({"inputs": [{"name": "image", "shape": [10**6],
                                                          "datatype": "BYTES", "data": ["x"]}]}).encode(),
     {}, 413, "images"),
    ("the same output twice", json.dumps({**one_input(), "outputs": [{"name": "scores"}] * 2}).encode(), {},
     400, "once"),
    ("three outputs", json.dumps({**one_input(), "outputs": [{"name": "scores"}, {"name": "probabilities"},
                                                             {"name": "x"}]}).encode(), {}, 400, "once"),
]


@pytest.mark.slow
@pytest.mark.parametrize("what, body, headers, status, fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_v2_requests_get_the_protocols_400_in_bounded_time(hostile, what, body, headers, status,
                                                                     fragment):
    started = time.monotonic()
    response = v2(hostile, body, headers)
    assert response.status_code == status, response.text[:500]
    assert fragment in response.json()["error"]
    assert time.monotonic() - started < BOUND_S


@pytest.mark.slow
def test_malformed_form_fields_and_too_many_parts(hostile):
    digit = png(np.zeros((28, 28), np.uint8))
    response = httpx.post(f"{hostile.url}/classify", files={"image": ("d.png", digit)},
                          data={"top_k": "²"}, timeout=BOUND_S)
    refused(response, 422, "top_k")
    many = [("model", (None, "")) for _ in range(10_000)]
    started = time.monotonic()
    for path in ("/classify", "/score_map"):
        response = httpx.post(f"{hostile.url}{path}", files=many, timeout=BOUND_S)
        refused(response, 413, "parts")
    assert time.monotonic() - started < BOUND_S


@pytest.mark.slow
def test_bodies_are_admitted_against_the_workers_memory(store, tmp_path):
    """With room for one 3 MB body, a second declared alongside it gets 503 and Retry-After at once,
    before the server reads it; once the first is answered there is room again."""
    srv = Server(store, tmp_path / "serve.log", worker_memory_mb=5, warmup_rounds=1)
    with srv, socket.create_connection(("127.0.0.1", srv.port)) as slow:
        size = 3 * 2**20
        slow.sendall(f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                     f"boundary=b\r\nContent-Length: {size}\r\n\r\n".encode())  # and no body yet
        time.sleep(0.5)
        second = httpx.post(f"{srv.url}/classify", content=b"x" * size,
                            headers={"content-type": "multipart/form-data; boundary=b"}, timeout=BOUND_S)
        refused(second, 503, "MiB")
        assert int(second.headers["retry-after"]) >= 1
        slow.close()
        time.sleep(0.5)
        digit = png(np.zeros((28, 28), np.uint8))
        assert httpx.post(f"{srv.url}/classify", files={"image": ("d.png", digit)},
                          timeout=BOUND_S).status_code == 200
