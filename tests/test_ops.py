"""Operations (issue 21, item 7) against real `bentoml serve` processes: /metrics stays bounded under
made-up paths, keys fail closed, rollout takes admin keys only, the log escapes what clients send,
EXIF orientation is applied. (GET / offline: tests/test_demo.py; half-sent headers: README, "Running
at scale", says why there is no server-side knob.)"""

from __future__ import annotations

import io
import subprocess
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtest.servers import Server
from service.pipeline.images import ORIENTATION, decode
from service.settings import Settings

KEY, ADMIN = "ops-api-key", "ops-admin-key"


@pytest.fixture(scope="module")
def keyed(store, tmp_path_factory):
    log = tmp_path_factory.mktemp("keyed") / "serve.log"
    with Server(store, log, models="lenet5", api_keys=f"{KEY}, other", admin_keys=ADMIN) as srv:
        yield srv


def metrics_bytes(url: str) -> int:
    return len(httpx.get(f"{url}/metrics").content)


@pytest.mark.slow
def test_made_up_paths_share_one_metrics_label(server):
    """300 GETs to random paths: before, each became series of its own (/metrics grew by ~2.3 MB);
    now they share the label /{unknown}, and the answer is the same 404 in the error shape."""
    with httpx.Client(base_url=server.url) as client:
        first = client.get(f"/{uuid.uuid4().hex}")  # the unknown label's series exist from here on
        assert first.status_code == 404 and first.json()["error"]["status"] == 404
        before = metrics_bytes(server.url)
        for _ in range(300):
            assert client.get(f"/{uuid.uuid4().hex}/{uuid.uuid4().hex}").status_code == 404
        after = metrics_bytes(server.url)
        # /v2 is answered ahead of BentoML's metrics (fronts/stack.py): no series named by the client
        assert client.get("/v2/models/nosuchmodel/versions/x/ready").status_code == 404
        text = client.get("/metrics").text
    assert after - before < 1024, (before, after)  # the counters' digits, no new series
    assert 'endpoint="/{unknown}"' in text
    assert "nosuchmodel" not in text
    # routes the service has keep their own label
    httpx.get(f"{server.url}/models")
    assert 'endpoint="/models"' in httpx.get(f"{server.url}/metrics").text


def test_key_settings_fail_closed_when_set_but_empty(monkeypatch):
    for blank in ("", " ", ",", " , ,"):
        monkeypatch.setenv("CONVSERVE_API_KEYS", blank)
        with pytest.raises(ValueError, match="CONVSERVE_API_KEYS is set but holds no key"):
            Settings()
    monkeypatch.setenv("CONVSERVE_API_KEYS", " a, b ,")
    monkeypatch.setenv("CONVSERVE_ADMIN_KEYS", ",")
    with pytest.raises(ValueError, match="CONVSERVE_ADMIN_KEYS is set but holds no key"):
        Settings()
    monkeypatch.delenv("CONVSERVE_API_KEYS")
    monkeypatch.delenv("CONVSERVE_ADMIN_KEYS")
    assert Settings().api_keys is None and Settings().admin_keys is None  # unset: no keys asked


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["api_keys", "admin_keys"])
def test_a_server_with_a_set_but_empty_key_setting_does_not_start(store, tmp_path, setting):
    srv = Server(store, tmp_path / "serve.log", models="lenet5", **{setting: " , "})
    try:
        code = srv.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        srv.stop()
        pytest.fail(f"the server started with CONVSERVE_{setting.upper()}=' , '")
    assert code != 0
    assert f"CONVSERVE_{setting.upper()} is set but holds no key" in srv.log.read_text()


@pytest.mark.slow
def test_rollout_takes_admin_keys_only(keyed):
    url = f"{keyed.url}/admin/models"
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer other"},
                    {"Authorization": f"Basic {ADMIN}"}):
        refused = httpx.post(url, json={"tag": "lenet5:latest"}, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized", headers
        assert "CONVSERVE_ADMIN_KEYS" in refused.json()["error"]["message"]
    # past the gate: the route itself answers (a model this server does not serve)
    passed = httpx.post(url, json={"tag": "resnet:1"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert passed.status_code == 404 and passed.json()["error"]["type"] == "unknown_model"
    # the admin key is no API key, and the API key still serves
    assert httpx.get(f"{keyed.url}/models", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 401
    assert httpx.get(f"{keyed.url}/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    doc = httpx.get(f"{keyed.url}/docs.json").json()
    responses = doc["paths"]["/admin/models"]["post"]["responses"]
    assert "CONVSERVE_ADMIN_KEYS" in responses["401"]["description"] and "403" in responses


@pytest.mark.slow
def test_the_log_escapes_what_the_client_sent(server):
    rid = uuid.uuid4().hex
    sent = httpx.get(f"{server.url}/x%0aFORGED%0d%1b[31mline", headers={"X-Request-ID": rid})
    assert sent.status_code == 404
    deadline = time.monotonic() + 5
    while rid not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = server.log.read_text().splitlines()
    (line,) = [line for line in lines if rid in line]
    assert "GET /x\\nFORGED\\r\\x1b[31mline 404" in line, line
    assert not [line for line in lines if line.startswith("FORGED")]
    assert "\x1b" not in server.log.read_text()


@pytest.mark.slow
def test_half_sent_request_heads_hold_no_slot(server):
    """Sockets that never finish their request line hold nothing a request needs: requests are served
    beside them. (No server-side timeout ends them: README, "Reliability", says why.)"""
    import socket

    port = int(server.url.rsplit(":", 1)[1])
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        for s in stalled:
            s.sendall(b"GET /mod")  # half a request line, then nothing
        for _ in range(3):
            assert httpx.get(f"{server.url}/models", timeout=5).status_code == 200
    finally:
        for s in stalled:
            s.close()


def jpeg(pixels: np.ndarray, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


# What a camera stores for each Orientation: the upright picture turned the other way
STORED = {6: lambda x: np.rot90(x, 1), 8: lambda x: np.rot90(x, -1), 3: lambda x: np.rot90(x, 2),
          2: np.fliplr}


def test_decode_turns_an_oriented_jpeg_upright():
    upright = np.zeros((20, 30), np.uint8)
    upright[2:6, 3:12] = 255  # a bar near the top-left corner
    for orientation, stored in STORED.items():
        image = decode(jpeg(np.ascontiguousarray(stored(upright)), orientation), 10**6)
        assert image.size == (30, 20), orientation
        assert np.abs(np.asarray(image, dtype=int) - upright).max() < 16, orientation
    # a transpose keeps the pixel count: the limit checked from the header still holds
    from service.errors import TooLarge

    with pytest.raises(TooLarge):
        decode(jpeg(np.zeros((20, 30), np.uint8), 6), 599)


@pytest.mark.slow
def test_a_rotated_phone_photo_is_classified_as_the_upright_digit(server, mnist):
    _, held = mnist
    with httpx.Client(base_url=server.url) as client:
        for i in range(0, 50, 5):  # ten held-out digits, several classes
            digit = held.images[i]
            files = [("image", ("upright.jpg", jpeg(digit)))]
            files += [("image", (f"o{o}.jpg", jpeg(np.ascontiguousarray(f(digit)), o)))
                      for o, f in STORED.items()]
            answer = client.post("/classify", files=files)
            assert answer.status_code == 200, answer.text
            labels = [p["top_k"][0]["label"] for p in answer.json()["predictions"]]
            assert labels == [labels[0]] * len(labels), (i, labels)
            assert labels[0] == str(held.labels[i])
