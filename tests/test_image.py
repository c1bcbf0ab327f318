"""The serving image run as the CPU overlay's Deployment says (`kubectl kustomize`, not a copy): its
command, the ConfigMap as environment, user 10001, read-only root with /tmp writable, no capabilities,
the CPU and memory limits, port 3000 (published on a free loopback port). The probes answer as the
manifest expects; a digit is classified; /models lists the shipped models; SIGTERM after the preStop
hook turns readiness to 503 at once, lets the requests in flight finish and exits within the grace
period. Timings are printed. Needs podman (or a Docker daemon); skipped without one."""

from __future__ import annotations

import re
import tarfile
import threading
import time

import httpx
import pytest
import yaml
from conftest import CI, ROOT
from containers import AUTH, ENGINE, HOW, SECRETS, Pod, sh
from test_deploy import container, one, render, settings

from loadtest import samples

pytestmark = pytest.mark.skipif(ENGINE is None and not CI, reason=HOW)


def probe(url: str, spec: dict) -> tuple[bool, float]:
    """One kubelet HTTP probe: success is a 2xx/3xx within timeoutSeconds (default 1 s)."""
    started = time.monotonic()
    try:
        status = httpx.get(url + spec["httpGet"]["path"], timeout=spec.get("timeoutSeconds", 1)).status_code
    except httpx.HTTPError:
        status = 0
    return 200 <= status < 400, time.monotonic() - started


def in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return float(re.search(r"^convserve_in_flight_requests(?:\{[^}]*\})? (\S+)$", text, re.M)[1])


@pytest.fixture(scope="module")
def pod(image):
    """The container, started and past its startup probe (polled every 0.1 s to time it; the kubelet
    would give it periodSeconds × failureThreshold)."""
    objects = render("cpu")
    p = Pod(one(objects, "Deployment"), settings(objects), SECRETS)
    try:
        spec = p.spec["startupProbe"]
        p.startup_budget_s = spec["periodSeconds"] * spec["failureThreshold"]
        while not probe(p.url(), spec)[0]:
            assert time.monotonic() - p.started < p.startup_budget_s, p.logs()
            assert p.running(), p.logs()
            time.sleep(0.1)
        p.startup_s = time.monotonic() - p.started
        p.image = image
        yield p
    finally:
        p.remove()


def test_the_probes_answer_as_the_manifest_expects(pod, capsys):
    assert pod.startup_s < pod.startup_budget_s
    timings = {}
    for name in ("readinessProbe", "livenessProbe"):
        ok, seconds = probe(pod.url(), pod.spec[name])
        assert ok, (name, pod.logs())
        timings[name] = round(seconds * 1000, 1)
    with capsys.disabled():
        print(f"\nimage {pod.image.tag}: {pod.image.size_mb} MB, make image {pod.image.build_s} s; "
              f"container start to startupProbe success {pod.startup_s:.1f} s "
              f"(budget {pod.startup_budget_s} s); readiness/liveness answered in {timings} ms")


def test_it_runs_as_the_user_on_a_read_only_root_without_torch(pod):
    def run(*command: str) -> int:
        return sh(ENGINE, "exec", pod.id, *command, check=False).returncode

    user = one(render("cpu"), "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert sh(ENGINE, "exec", pod.id, "id", "-u").stdout.strip() == str(user)
    assert run("touch", "/app/written") != 0 and run("touch", "/home/convserve/written") != 0
    assert run("touch", "/tmp/written") == 0
    assert run("/opt/venv/bin/python", "-c", "import torch") != 0
    assert run("/opt/venv/bin/python", "-c", "import onnxruntime, bentoml") == 0


def test_a_digit_is_classified(pod):
    digits = samples.digits(20)
    right = 0
    for png, label in digits:
        r = httpx.post(f"{pod.url()}/classify", files={"image": ("d.png", png, "image/png")}, headers=AUTH,
                       timeout=30)
        assert r.status_code == 200, r.text
        right += r.json()["predictions"][0]["top_k"][0]["label"] == str(label)
    assert right >= 18, f"{right}/20 held-out digits right"  # the shipped LeNet: ~97 % held out


def test_models_lists_the_shipped_models(pod):
    shipped = {}
    for export in (ROOT / "bentomodels").glob("*.bentomodel"):
        with tarfile.open(export) as tar:
            card = yaml.safe_load(tar.extractfile("./model.yaml"))
        shipped[card["name"]] = card["version"]
    answer = httpx.get(f"{pod.url()}/models", headers=AUTH, timeout=10).json()
    served = {m["name"]: m["version"] for m in answer["models"]}
    assert served and served.items() <= shipped.items(), (served, shipped)
    assert {"lenet5", "digit-detector"} <= set(served)


def test_sigterm_drains_in_flight_requests_and_exits_within_the_grace_period(pod, capsys):
    """As the kubelet ends a pod: the preStop hook (in the container), then SIGTERM to its process 1;
    all within terminationGracePeriodSeconds. Runs last: it ends the container."""
    objects = render("cpu")
    grace = one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    readiness = container(objects)["readinessProbe"]
    started = time.monotonic()
    sh(ENGINE, "exec", pod.id, *pod.spec["lifecycle"]["preStop"]["exec"]["command"], timeout=grace)
    assert probe(pod.url(), readiness)[0], "not ready after the preStop hook"
    # three slow requests: /score_map takes one at a time and lets two wait (the gate's route limit);
    # a 3072² page takes ~2.8 s here, so the last answers ~8 s after SIGTERM
    page = samples.pages(1, 3072, 3072)[0]
    answers: list[int] = []

    def score() -> None:
        r = httpx.post(f"{pod.url()}/score_map", files={"image": ("p.png", page, "image/png")}, headers=AUTH,
                       timeout=120)
        answers.append(r.status_code)

    clients = [threading.Thread(target=score) for _ in range(3)]
    for t in clients:
        t.start()
    while in_flight(pod.url()) < 3:
        assert time.monotonic() - started < grace and all(t.is_alive() for t in clients), answers
        time.sleep(0.05)
    sh(ENGINE, "kill", "--signal", "TERM", pod.id)
    signalled = time.monotonic()
    ok, _ = probe(pod.url(), readiness)
    not_ready_s = time.monotonic() - signalled
    assert not ok, "/readyz still says ready after SIGTERM"
    assert not_ready_s < readiness["periodSeconds"]
    exit_code = int(sh(ENGINE, "wait", pod.id, timeout=grace).stdout.strip())
    exited_s = time.monotonic() - signalled
    for t in clients:
        t.join(timeout=30)
    assert answers == [200, 200, 200], (answers, pod.logs())
    assert time.monotonic() - started <= grace
    assert exit_code == 0, pod.logs()
    with capsys.disabled():
        print(f"\nSIGTERM with 3 requests in flight: /readyz not ready after {not_ready_s * 1000:.0f} ms, "
              f"all 3 answered 200, exit {exit_code} after {exited_s:.1f} s; preStop + drain "
              f"{time.monotonic() - started:.1f} s of the {grace} s grace period")
