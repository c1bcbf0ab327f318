"""Zero-downtime model rollout on one server (POST /admin/models): a new store version of the served
model, made by export's own store step, replaces the old one while locust keeps classifying."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import httpx
from conftest import PYTHON, ROOT
from prometheus_client.parser import text_string_to_metric_families

from loadtest import run as loadrun
from loadtest.servers import Server

KEY = "rollout-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_KEY = "rollout-admin-key"  # rollout takes admin keys only (CONVSERVE_ADMIN_KEYS)
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
NEW_VERSION = """
import bentoml
from pathlib import Path
from export.card import save_to_store
from modelcard import ModelCard
stored = bentoml.models.get("lenet5")
print(save_to_store("lenet5", Path(stored.path_of("model.onnx")), ModelCard.from_dict(stored.info.metadata)))
"""


def answered(url: str) -> float:
    """/classify requests answered 200 so far (ClassifyRoute's histogram)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "convserve_request_seconds_count" and sample.labels.get("status") == "200":
                return sample.value
    return 0.0


def served_version(url: str) -> str:
    models = httpx.get(f"{url}/models", headers=AUTH).json()["models"]
    (model,) = [m for m in models if m["name"] == "lenet5"]
    return model["version"]


def test_a_new_version_rolls_out_under_load_with_no_failed_request(store, tmp_path, monkeypatch):
    home = tmp_path / "store"
    shutil.copytree(store / "models", home / "models", symlinks=True)  # a version is added: a copy
    with Server(home, tmp_path / "serve.log", models="lenet5", api_keys=KEY,
                admin_keys=ADMIN_KEY) as srv:
        old = served_version(srv.url)
        made = subprocess.run([PYTHON, "-c", NEW_VERSION], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=True, env={**os.environ, "BENTOML_HOME": str(home)})
        new_tag = made.stdout.strip().splitlines()[-1]
        assert new_tag.startswith("lenet5:") and not new_tag.endswith(old)

        monkeypatch.setenv("LOADTEST_API_KEY", KEY)
        summary: dict = {}
        load = threading.Thread(target=lambda: summary.update(
            loadrun.run(srv.url, "classify", users=8, run_time=30, out=tmp_path / "load")))
        load.start()
        deadline = time.monotonic() + 60
        while answered(srv.url) < 200 and time.monotonic() < deadline:  # locust is up and sending
            time.sleep(0.5)
        before = answered(srv.url)
        rolled = httpx.post(f"{srv.url}/admin/models", json={"tag": new_tag}, headers=ADMIN, timeout=120)
        load.join()
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["previous_version"] == old
        assert rolled.json()["version"] == new_tag.split(":")[1] == served_version(srv.url)
        assert summary["total"]["failures"] == 0 and summary["total"]["requests"] > 200, summary["total"]
        assert before >= 200 and answered(srv.url) - before >= 200  # load on both sides of the swap

        # what the route refuses, in the error shape
        for tag, status in (("resnet:1", 404), ("lenet5:nosuchversion", 404), ("", 422)):
            refused = httpx.post(f"{srv.url}/admin/models", json={"tag": tag}, headers=ADMIN)
            assert refused.status_code == status and refused.json()["error"]["status"] == status, tag
        assert httpx.post(f"{srv.url}/admin/models", json={"tag": new_tag}).status_code == 401
        assert httpx.post(f"{srv.url}/admin/models", json={"tag": new_tag}, headers=AUTH).status_code == 401


def test_rollout_is_off_without_admin_keys(server):
    refused = httpx.post(f"{server.url}/admin/models", json={"tag": "lenet5:latest"})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
    assert "CONVSERVE_ADMIN_KEYS" in refused.json()["error"]["message"]
