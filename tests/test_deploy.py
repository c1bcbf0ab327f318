"""deploy/: every overlay rendered with the real kustomize (kubectl's), validated offline against the
Kubernetes schemas of two versions (kubernetes-validate, strict, warnings are failures), and checked
against a running server: the probes answer, the scaler's metric is scraped, the grace period holds."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import PYTHON, ROOT

OVERLAYS = ("cpu", "gpu", "keda", "models-volume")
VERSIONS = ("1.31.0", "1.35.0")
CRDS = {"ScaledObject", "ServiceMonitor"}  # no schemas for these offline: checked field by field
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed; "
                                "install kubectl ≥ 1.27 to render deploy/ in make test")


def render(overlay: str) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def container(objects: list[dict]) -> dict:
    (c,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def settings(objects: list[dict]) -> dict[str, str]:
    return one(objects, "ConfigMap")["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_overlay_is_valid_kubernetes(overlay, version, tmp_path):
    builtin = [o for o in render(overlay) if o["kind"] not in CRDS]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    result = subprocess.run([str(Path(PYTHON).with_name("kubernetes-validate")), "--strict",
                             "--kubernetes-version", version, str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout.upper() and "ERROR" not in result.stdout.upper(), result.stdout
    assert result.stdout.count(" passed for resource ") == len(builtin), result.stdout


def test_the_deployment_is_hardened_and_rolls_without_losing_capacity():
    objects = render("cpu")
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(objects)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) <= set(c["resources"]["limits"])
    assert int(settings(objects)["CONVSERVE_THREADS"]) == int(c["resources"]["requests"]["cpu"])
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] >= 1
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == "convserve"
    # the Service and PDB select the Deployment's pods
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert one(objects, "Service")["spec"]["selector"].items() <= labels.items()
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_covers_the_prestop_sleep_and_the_longest_request(overlay):
    objects = render(overlay)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    command = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    timeout = int(settings(objects)["CONVSERVE_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= int(command[1]) + timeout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_starts_without_its_api_keys_secret(overlay):
    """Keys fail closed: CONVSERVE_API_KEYS comes from a Secret that is not optional (no Secret, no
    pod: Kubernetes holds it in CreateContainerConfigError), and the server refuses a blank one
    (tests/test_ops.py). Admin keys may be absent: rollout is then off (403)."""
    env = {e["name"]: e for e in container(render(overlay)).get("env", [])}
    ref = env["CONVSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and not ref.get("optional", False)
    assert "CONVSERVE_API_KEYS" not in settings(render(overlay))  # never a plain, open default
    admin = env["CONVSERVE_ADMIN_KEYS"]["valueFrom"]["secretKeyRef"]
    assert admin["name"] == ref["name"] and admin["key"] != ref["key"]


def test_the_gpu_overlay_asks_for_one_gpu_and_runs_on_cuda():
    objects = render("gpu")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":gpu")
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    assert settings(objects)["CONVSERVE_PROVIDERS"] == "cuda"
    assert settings(objects)["CONVSERVE_WORKERS"] == "1"


def test_models_can_come_from_a_read_only_volume_where_the_image_keeps_them():
    objects = render("models-volume")
    (mount,) = [m for m in container(objects)["volumeMounts"] if m["name"] == "models"]
    assert mount["readOnly"] and mount["mountPath"] == "/home/convserve/bentoml/models"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "BENTOML_HOME=/home/convserve/bentoml" in dockerfile  # the store the mount lands in
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"]["readOnly"]


def test_keda_replaces_the_cpu_hpa_and_targets_the_deployment():
    objects = render("keda")
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]  # KEDA makes its own
    scaled = one(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] > one(objects, "PodDisruptionBudget")["spec"]["minAvailable"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert set(trigger["metadata"]) == {"serverAddress", "query", "threshold"}
    threshold = float(trigger["metadata"]["threshold"])
    assert 0 < threshold < int(settings(objects)["CONVSERVE_MAX_CONCURRENCY"])  # scale before 429s
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in ports and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


def test_probes_and_scaler_metrics_exist_on_a_real_server(server):
    """The probe paths answer 200 on a running server, and every metric the KEDA query names is in
    its /metrics scrape."""
    objects = render("keda")
    c = container(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert httpx.get(f"{server.url}{c[probe]['httpGet']['path']}").status_code == 200, probe
    query = one(objects, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    names = set(re.findall(r"\b(convserve_[a-z_]+|bentoml_[a-z_]+)\b", query))
    assert names
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    scraped = {line.split("{")[0].split(" ")[0] for line in lines if line and not line.startswith("#")}
    assert names <= scraped, names - scraped


def test_the_image_copies_every_package_the_install_needs():
    """`make install` in the Dockerfile installs this project: every top-level package it lists must
    be copied in first (a missing one fails the image build: tests/test_image.py builds it, with
    podman, in seconds when cached; this says which package at once)."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = set(re.findall(r"^COPY (\w+)/ ", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert {p.split(".")[0] for p in packages} <= copied
