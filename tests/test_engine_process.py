"""One engine process per device (CONVSERVE_ENGINE=process), fed by every HTTP worker through shared
memory: the ring and its records on their own, then real `bentoml serve` servers with two workers —
the same answers as the in-process engine, one engine's batcher counting every worker's images, a
rollout reaching every worker, and the engine killed with SIGKILL under load (503 at once, not ready,
restarted, serving again without a server restart). Statuses and counts only, no timings."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from conftest import PYTHON, ROOT
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_rollout import NEW_VERSION

from loadtest.servers import Server
from service.engine import ring


def png(side: int, seed: int = 0) -> bytes:
    out, noise = io.BytesIO(), np.random.default_rng(seed).random((side, side))
    Image.fromarray((noise * 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


DIGITS = [png(28, seed) for seed in range(4)]


def test_a_request_and_its_answer_cross_the_ring_as_records():
    """Pixels into a slot, a record over a real socket pair, the answer after the request in the slot;
    an oversized request gets a segment of its own; records arriving together are all parsed."""
    r = ring.Ring(2, 4096)
    a, b = socket.socketpair()
    try:
        x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 1, 28, 28)
        slot = r.take(ring.response_offset(x.nbytes) + 256)
        assert slot.index != ring.NO_SLOT and not slot.seg
        ring.put(slot.buf, x)
        sender, receiver = ring.Channel(a), ring.Channel(b)
        for rid in (1, 2, 3):  # three records in one recv
            sender.send(ring.record(ring.OP_INFER, rid=rid, slot=slot.index, a=x))
        got = receiver.parse(b.recv(1 << 16))
        assert [f[ring.RID] for f, _ in got] == [1, 2, 3]
        engine_side = ring.attach(r.name)[slot.index * r.slot_bytes : (slot.index + 1) * r.slot_bytes]
        seen = ring.view(engine_side, got[0][0])
        assert np.array_equal(seen, x)  # a view of the worker's memory, not a copy
        scores = np.linspace(0, 1, 20, dtype=np.float32).reshape(2, 10, 1, 1)
        indices = np.arange(6, dtype=np.int64).reshape(2, 3)
        assert ring.put_answer(engine_side, x.nbytes, (scores, indices))
        answer = ring.record(ring.OP_RESULT, rid=1, a=scores, b=indices)
        (fields, _), = ring.Channel(None).parse(answer)
        out_a, out_b = ring.read_answer(slot.buf, x.nbytes, fields)
        assert np.array_equal(out_a, scores) and np.array_equal(out_b, indices)
        assert np.array_equal(x, ring.view(slot.buf, got[0][0]))  # the request was not overwritten
        error = ring.error_record(4, "overloaded", "queue full", 1.5)
        (fields, payload), = ring.Channel(None).parse(error[:50] + error[50:])
        assert fields[ring.OP] == ring.OP_ERROR and b"queue full" in payload
        big = r.take(10 * 4096)  # larger than a slot: a segment of its own, freed when given back
        assert big.index == ring.NO_SLOT and os.path.exists(f"/dev/shm/{big.seg}")
        r.give(big)
        assert not os.path.exists(f"/dev/shm/{big.seg}")
        r.give(slot)
    finally:
        a.close()
        b.close()
        r.close()


def test_a_broken_connection_is_dropped_and_the_engine_serves_on(store, tmp_path, monkeypatch):
    """One thread reads every worker's connection in the engine process: a connection that fails (here
    its HELLO names a ring that is not there) is dropped alone, and a worker's requests are still
    answered by the same process."""
    from service.engine import RemoteEngine
    from service.engine.remote import ModelView
    from service.engine.store import read_card
    from service.settings import Settings

    monkeypatch.setenv("BENTOML_HOME", str(store))
    monkeypatch.setenv("CONVSERVE_MODELS", "lenet5")
    path = str(tmp_path / "cpu.sock")
    with open(tmp_path / "engine.log", "w") as log:
        process = subprocess.Popen([PYTHON, "-m", "service.engine.process", "--socket", path],
                                   stdin=subprocess.PIPE, stderr=log, cwd=ROOT,
                                   env={**os.environ, "CONVSERVE_WORKERS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(path) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.connect(path)
            ring.Channel(bad).receive()  # the engine's greeting (MODELS)
            bad.sendall(ring.record(ring.OP_HELLO, payload=json.dumps(
                {"ring": "convserve-no-such-ring", "slot_bytes": 4096}).encode()))
            bad.settimeout(30)
            assert bad.recv(1 << 16) == b""  # dropped

        async def ask() -> np.ndarray:
            remote = RemoteEngine(path, Settings(), [ModelView(*read_card("lenet5"))])
            try:
                assert await asyncio.to_thread(remote.connected.wait, 60), "the engine is gone"
                return await asyncio.wait_for(remote.infer("lenet5", np.zeros((3, 1, 28, 28), np.uint8)), 60)
            finally:
                remote.close()

        assert asyncio.run(ask()).shape == (3, 10, 1, 1)
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()
    assert "dropping a connection" in (tmp_path / "engine.log").read_text()


def engines(srv: Server) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(srv.process.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "service.engine.process" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def metric(url: str, name: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == "lenet5":
                total += sample.value
    return total


@pytest.fixture(scope="module")
def served(store, tmp_path_factory):
    with Server(store, tmp_path_factory.mktemp("engine") / "serve.log", workers=2,
                engine="process") as srv:
        yield srv


def test_every_worker_is_served_by_one_engine_with_the_in_process_answers(served, store, monkeypatch):
    from service.engine import Engine
    from service.pipeline.dataplane import Dataplane
    from service.settings import Settings

    assert len(engines(served)) == 1
    before = metric(served.url, "convserve_batch_size_sum")
    answers = []
    with httpx.Client(base_url=served.url, timeout=30) as client:
        for digit in DIGITS:
            got = client.post("/classify", files={"image": ("d.png", digit)}, data={"top_k": "3"})
            assert got.status_code == 200, got.text
            answers.append(got.json()["predictions"][0]["top_k"])
        two = client.post("/v2/models/lenet5/infer", json={"inputs": [
            {"name": "pixels", "shape": [2, 1, 28, 28], "datatype": "UINT8", "data": [7] * 1568}]})
        assert two.status_code == 200 and two.json()["outputs"][0]["shape"] == [2, 10], two.text
        page = client.post("/score_map", files={"image": ("p.png", png(120))})
        assert page.status_code == 200 and "detections" in page.json(), page.text
    # every image of every worker went through the one engine's batcher (its metrics reach /metrics)
    assert metric(served.url, "convserve_batch_size_sum") - before == len(DIGITS) + 2

    monkeypatch.setenv("BENTOML_HOME", str(store))
    plane = Dataplane(Engine.from_store(Settings()), Settings())
    try:
        local = asyncio.run(plane.classify([("d.png", d) for d in DIGITS], "lenet5", 3, False))
    finally:
        plane.close()
    for i, answer in enumerate(answers):
        assert [int(a["label"]) for a in answer] == [int(plane.cards["lenet5"].labels[c])
                                                    for c in local.classes[i]]
        assert np.allclose([a["probability"] for a in answer], local.probabilities[i], atol=1e-5)


def test_bad_input_is_still_a_clear_4xx(served):
    with httpx.Client(base_url=served.url, timeout=30) as client:
        assert client.post("/classify", files={"image": ("d.png", b"not an image")}).status_code == 415
        assert client.post("/classify", files={"image": ("d.png", DIGITS[0])},
                           data={"model": "nope"}).status_code == 404
        wrong = client.post("/v2/models/lenet5/infer", json={"inputs": [
            {"name": "pixels", "shape": [1, 3, 28, 28], "datatype": "UINT8", "data": [0] * 2352}]})
        assert wrong.status_code == 400, wrong.text


def test_a_rollout_reaches_every_worker(store, tmp_path):
    home = tmp_path / "store"
    shutil.copytree(store / "models", home / "models", symlinks=True)
    with Server(home, tmp_path / "serve.log", workers=2, engine="process", models="lenet5",
                admin_keys="admin") as srv:
        made = subprocess.run([PYTHON, "-c", NEW_VERSION], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=True, env={**os.environ, "BENTOML_HOME": str(home)})
        new_tag = made.stdout.strip().splitlines()[-1]
        rolled = httpx.post(f"{srv.url}/admin/models", json={"tag": new_tag},
                            headers={"Authorization": "Bearer admin"}, timeout=120)
        assert rolled.status_code == 200, rolled.text
        time.sleep(0.5)  # the engine tells every worker; a worker reads it on its event loop
        versions = set()
        for _ in range(40):  # a new connection each: the kernel spreads them over both workers
            with httpx.Client(base_url=srv.url) as client:
                versions.add(client.get("/models").json()["models"][0]["version"])
                got = client.post("/classify", files={"image": ("d.png", DIGITS[0])})
                assert got.status_code == 200 and got.json()["version"] == new_tag.split(":")[1]
        assert versions == {new_tag.split(":")[1]}, versions
        for tag, status in (("resnet:1", 404), ("lenet5:nosuchversion", 404)):
            refused = httpx.post(f"{srv.url}/admin/models", json={"tag": tag},
                                 headers={"Authorization": "Bearer admin"})
            assert refused.status_code == status, refused.text


def test_a_killed_engine_fails_fast_says_not_ready_and_comes_back(store, tmp_path):
    """SIGKILL to the engine process under load: requests fail with 503 (engine_unavailable or
    overloaded), never 500 or a hang; /readyz says 503; the server starts and warms a new engine, and
    every request succeeds again, with no server restart."""
    srv = Server(store, tmp_path / "serve.log", workers=2, engine="process")
    outcomes: list[tuple[float, int, str]] = []
    readiness: list[tuple[float, int]] = []
    stop = threading.Event()

    def load(seed: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            while not stop.is_set():
                got = client.post("/classify", files={"image": ("d.png", DIGITS[seed % 4])})
                kind = got.json()["error"]["type"] if got.status_code != 200 else ""
                outcomes.append((time.monotonic(), got.status_code, kind))

    def ready() -> None:
        with httpx.Client(base_url=srv.url, timeout=5) as client:
            while not stop.is_set():
                readiness.append((time.monotonic(), client.get("/readyz").status_code))
                time.sleep(0.02)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=ready))
    try:
        srv.readiness()
        (engine,) = engines(srv)
        for t in threads:
            t.start()
        time.sleep(2)
        killed_at = time.monotonic()
        engine.kill()
        deadline = killed_at + 90
        while time.monotonic() < deadline:
            now = engines(srv)
            if len(now) == 1 and now[0].pid != engine.pid and readiness and readiness[-1][1] == 200 \
                    and readiness[-1][0] > killed_at:
                break
            time.sleep(0.1)
        back = time.monotonic()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(60)
        assert srv.process.poll() is None  # the server itself never restarted
    finally:
        stop.set()
        srv.stop()
    assert back < deadline, "no new engine served"
    after = [(s, k) for t, s, k in outcomes if t > killed_at]
    failed = [(s, k) for s, k in after if s != 200]
    assert failed, "the kill failed no request: nothing was in flight"
    assert all(s == 503 and k in {"engine_unavailable", "overloaded"} for s, k in failed), set(failed)
    assert any(s == 503 for t, s in readiness if t > killed_at)
    last = [s for t, s, _ in outcomes if t > back + 0.5]
    assert len(last) >= 20 and all(s == 200 for s in last)


def test_overload_is_shed_with_retry_after_in_process_mode(store, tmp_path):
    """The engine process's queue bound (CONVSERVE_MAX_QUEUE_MS, here 1 ms) sheds as the per-worker
    engine does: 503 `overloaded` with Retry-After at once, the rest answered, nothing else. LeNet goes
    through the queue and its inference thread here, as a model slower than CONVSERVE_INLINE_MAX_MS
    would (at its 0.1 ms it otherwise runs in the engine's loop, process.EngineServer, and never waits)."""
    many = [("image", (f"{i}.png", DIGITS[i % 4])) for i in range(32)]
    results: list[tuple[int, str, str]] = []

    def load() -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            for _ in range(6):
                got = client.post("/classify", files=many)
                kind = got.json()["error"]["type"] if got.status_code != 200 else ""
                results.append((got.status_code, kind, got.headers.get("retry-after", "")))

    with Server(store, tmp_path / "serve.log", workers=2, engine="process", models="lenet5",
                max_queue_ms=1, inline_max_ms=0) as srv:
        threads = [threading.Thread(target=load) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    shed = [r for r in results if r[0] == 503]
    assert len(results) == 72 and {s for s, _, _ in results} <= {200, 503}, set(results)
    assert shed and any(s == 200 for s, _, _ in results), (len(shed), len(results))
    assert all(kind == "overloaded" and int(after) >= 1 for _, kind, after in shed), set(shed)


def test_a_request_past_its_deadline_is_dropped_from_the_engine_queue_unrun(store, tmp_path):
    """The gate's deadline (1 s) passes while the image waits in the engine process's queue (a 4 s
    batch wait, LeNet on its inference thread): 504, the worker sends CANCEL, and the engine drops it at
    assembly: no batch runs for it. Then a full batch (4 images, max_batch_size) closes at once and is
    answered, alone in its batch."""
    with Server(store, tmp_path / "serve.log", workers=1, engine="process", models="lenet5",
                inline_max_ms=0, batch_wait_ms=4000, timeout_s=1, max_batch_size=4,
                max_queue_ms=60_000) as srv:  # not shed: only the CANCEL drops it
        late = httpx.post(f"{srv.url}/classify", files={"image": ("d.png", DIGITS[0])}, timeout=30)
        assert late.status_code == 504, late.text
        time.sleep(4)  # past the batch wait: the engine has assembled whatever was queued
        assert metric(srv.url, "convserve_batch_size_count") == 0  # nothing ran for it
        full = httpx.post(f"{srv.url}/v2/models/lenet5/infer", timeout=30, json={"inputs": [
            {"name": "pixels", "shape": [4, 1, 28, 28], "datatype": "UINT8", "data": [7] * 4 * 784}]})
        assert full.status_code == 200, full.text
        assert metric(srv.url, "convserve_batch_size_count") == 1
        assert metric(srv.url, "convserve_batch_size_sum") == 4


def test_sigterm_drains_in_flight_work_and_stops_the_engine(store, tmp_path):
    """SIGTERM with a page being scored through the engine process: it is answered, the server exits
    cleanly, and no engine process outlives it."""
    srv = Server(store, tmp_path / "serve.log", timeout_s=60, engine="process")
    srv.readiness()
    (engine,) = engines(srv)
    slow: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: slow.append(httpx.post(
        f"{srv.url}/score_map", files={"image": ("p.png", png(1024))},
        data={"stride_factor": "4", "scales": "0.75,1,2"}, timeout=120)))
    try:
        worker.start()
        time.sleep(1.0)  # the page is being scored
        assert worker.is_alive(), "the page was scored before SIGTERM; give it more work"
        srv.process.send_signal(signal.SIGTERM)
        worker.join(120)
        srv.process.wait(timeout=60)
    finally:
        srv.stop()
    assert slow and slow[0].status_code == 200 and "detections" in slow[0].json()
    assert srv.process.returncode == 0
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
