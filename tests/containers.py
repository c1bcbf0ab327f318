"""The serving image for the tests: built once per run by `make image` on a Debian base made with
debootstrap (no container registry needed; the build's pip reaches PyPI), and run as a rendered
Deployment says. Used by tests/test_image.py and tests/test_cluster_metrics.py."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/convserve-debian:bookworm"
MIRROR = "http://deb.debian.org/debian"
HOW = ("install podman (apt-get install podman runc; .ci/run writes /etc/containers/containers.conf) "
       "or run a Docker daemon to run the image tests")


def _engine() -> str | None:
    """podman, else a docker whose daemon answers (a docker client alone cannot build or run)."""
    if shutil.which("podman"):
        return "podman"
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return "docker"
    return None


ENGINE = _engine()


def sh(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def debian_base() -> str:
    """BASE, made once per machine (kept in the engine's store): debootstrap's minimal bookworm with
    python3 (~1-2 min, 176 MB), imported as an image. The Dockerfile adds python3-venv, make, curl."""
    if sh(ENGINE, "image", "inspect", BASE, check=False).returncode == 0:
        return BASE
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        sh("debootstrap", "--variant=minbase", "--include=python3", "bookworm", str(root), MIRROR,
           timeout=900)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / cache, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([ENGINE, "import", "-", BASE], stdin=tar.stdout, check=True, timeout=300,
                       capture_output=True)
        tar.wait(timeout=60)
    return BASE


def build(tag: str) -> float:
    """`make image` on the Debian base, tagged `tag`; returns its seconds."""
    started = time.monotonic()
    result = subprocess.run(["make", "image", f"ENGINE={ENGINE}", f"BASE={debian_base()}", f"IMAGE={tag}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return time.monotonic() - started


def mebibytes(quantity: str) -> int:
    """A Kubernetes memory quantity (e.g. 2Gi, 512Mi) in MiB."""
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) * (1024 if unit == "Gi" else 1)


# The Deployment takes its API keys from the Secret `convserve-api-keys` (not optional: keys fail
# closed), so a pod run here gets one, as a cluster's would
KEY = "image-test-key"
SECRETS = {"convserve-api-keys": {"keys": KEY}}
AUTH = {"Authorization": f"Bearer {KEY}"}

# What `run` translates from a container spec; anything else fails the test rather than be ignored.
KNOWN = {"name", "image", "imagePullPolicy", "ports", "envFrom", "env", "resources", "startupProbe",
         "readinessProbe", "livenessProbe", "lifecycle", "securityContext", "volumeMounts"}


class Pod:
    """One container run as a Deployment's pod template says: its image and command, the ConfigMap as
    environment, user and group, read-only root with its emptyDir mounts (as tmpfs), no capabilities,
    no privilege escalation, the CPU and memory limits. Each container port is published on a free
    127.0.0.1 port: the server inside listens on the manifest's port (podman: slirp4netns, so no
    bridge network and no port clash with the host)."""

    def __init__(self, deployment: dict, config: dict[str, str],
                 secrets: dict[str, dict[str, str]] | None = None) -> None:
        """`secrets`: {Secret name: {key: value}}, what the cluster would hold (secretKeyRef env)."""
        pod = deployment["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert set(c) <= KNOWN, f"tests/containers.py does not translate {set(c) - KNOWN}"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        security = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        # the kubelet ignores an image's HEALTHCHECK (its probes replace it); so does this
        args = ["run", "-d", "--pull=never", "--no-healthcheck",
                "--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
        if ENGINE == "podman":
            args.append("--network=slirp4netns")
        if security.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        args += [f"--cap-drop={cap}" for cap in security.get("capabilities", {}).get("drop", [])]
        for mount in c.get("volumeMounts", []):
            empty = volumes[mount["name"]]["emptyDir"]  # only emptyDir volumes can be run here
            size = mebibytes(empty.get("sizeLimit", "1Gi"))
            args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size}m,mode=1777"]
        limits = c["resources"]["limits"]
        args += ["--cpus", str(limits["cpu"]), "--memory", f"{mebibytes(limits['memory'])}m"]
        for source in c.get("envFrom", []):
            assert set(source) == {"configMapRef"}
            args += [f"--env={k}={v}" for k, v in config.items()]
        for var in c.get("env", []):  # from Secrets, as the kubelet resolves them
            ref = var["valueFrom"]["secretKeyRef"]
            value = (secrets or {}).get(ref["name"], {}).get(ref["key"])
            if value is not None:
                args.append(f"--env={var['name']}={value}")
            else:  # the kubelet starts no pod that lacks a Secret it needs
                assert ref.get("optional"), f"Secret {ref['name']}/{ref['key']} is required: {var}"
        self.ports = {p["name"]: free_port() for p in c["ports"]}
        args += [f"--publish=127.0.0.1:{self.ports[p['name']]}:{p['containerPort']}" for p in c["ports"]]
        self.spec = c
        self.started = time.monotonic()
        self.id = sh(ENGINE, *args, c["image"]).stdout.strip()

    def url(self, port: str = "http") -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    def logs(self) -> str:
        result = sh(ENGINE, "logs", self.id, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def running(self) -> bool:
        state = sh(ENGINE, "inspect", "--format", "{{.State.Running}}", self.id, check=False).stdout
        return state.strip() == "true"

    def remove(self) -> None:
        sh(ENGINE, "rm", "-f", self.id, check=False)


@dataclass
class Image:
    tag: str
    build_s: float  # this run's `make image` (layers cached from earlier runs on this machine count)
    size_mb: int
