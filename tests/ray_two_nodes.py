"""A two-node Ray cluster on this machine, inside the namespaces tests/test_cluster_ray.py makes with
`unshare --net --pid --fork --mount-proc` (only loopback, so Ray cannot advertise the machine's
outside address; this script is process 1 there). The head (1 CPU) and a worker (1 CPU) are separate
`ray start --block` processes with ports of their own. `python -m batch` is submitted with `ray job
submit` twice: on the head alone (1 actor), then with the worker joined (2 actors, one per node).
Then both `ray start` processes get SIGTERM by pid (never `ray stop`: it kills Ray processes by name,
anyone's), and what is still running in the namespace is reported. Prints one JSON line.

    python tests/ray_two_nodes.py PAGES OUT BENTOML_HOME
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD, DASHBOARD = 6380, 8265
DASHBOARD_URL = f"http://127.0.0.1:{DASHBOARD}"
# On SIGTERM a node drains before it stops, until idle or for 30 s by default; the head is never idle
# (Ray Data's detached actors live there), so it took the whole 30 s. 5 s: the jobs are over by then.
DRAIN_S = 5
# Every port a node opens, distinct per node (the same defaults on one machine collide).
PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
         "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


def ray_start(role: str, base: int, temp: str, log: Path) -> subprocess.Popen:
    ports = [f"--{name}={base + i}" for i, name in enumerate(PORTS)]
    ports += [f"--min-worker-port={base + 100}", f"--max-worker-port={base + 199}"]
    if role == "head":
        ports += ["--head", f"--port={HEAD}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={DASHBOARD}", "--ray-client-server-port=10001"]
    else:
        ports += [f"--address=127.0.0.1:{HEAD}"]
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--disable-usage-stats",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                             "--object-store-memory=200000000", *ports],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def alive_nodes() -> int:
    from ray.util.state import list_nodes

    try:
        return sum(n.state == "ALIVE" for n in list_nodes(address=DASHBOARD_URL, timeout=10))
    except Exception:  # the dashboard is not up yet
        return 0


def wait_nodes(n: int, timeout: float = 120) -> float:
    started = time.monotonic()
    while alive_nodes() < n:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{n} Ray nodes not alive after {timeout} s")
        time.sleep(0.5)
    return time.monotonic() - started


def submit(pages: str, out: Path, actors: int) -> dict:
    """`ray job submit` of `python -m batch` (this checkout as the working dir); its summary line. The
    job's driver gets BENTOML_HOME from its node's environment (as in the image) and hands it to its
    actors itself (batch's ray.init): given here too, Ray refuses the job (conflicting env_vars)."""
    started = time.monotonic()
    job = subprocess.run([str(BIN / "ray"), "job", "submit", f"--address={DASHBOARD_URL}",
                          f"--working-dir={ROOT}",
                          "--", sys.executable, "-m", "batch", "--address", "auto", "--input", pages,
                          "--out", str(out), "--actors", str(actors)],
                         capture_output=True, text=True, timeout=600)
    if job.returncode:
        raise RuntimeError(job.stdout[-3000:] + job.stderr[-3000:])
    (line,) = [s for s in job.stdout.splitlines() if s.startswith('{"pages"')]
    return {**json.loads(line), "submit_s": round(time.monotonic() - started, 1)}


def scorer_nodes() -> int:
    """Distinct nodes that ran batch's PageScorer actors, both jobs (the state API keeps dead actors a
    while). The first job ran before the worker joined, so 2 means the second used both nodes."""
    from ray.util.state import list_actors

    actors = list_actors(address=DASHBOARD_URL, limit=1000, detail=True, timeout=30)
    return len({a.node_id for a in actors if "PageScorer" in a.class_name})


def others() -> list[str]:
    """Processes in this PID namespace besides this one (zombies reaped first)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) != os.getpid():
            try:
                left.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
            except OSError:
                pass
    return left


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
    try:
        process.wait(timeout=DRAIN_S + 25)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(pages: str, out: str, home: str) -> None:
    result: dict = {}
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray's token authentication, with a token of this cluster's own: Ray keeps it in ~/.ray/auth_token,
    # so every Ray process here gets a HOME of its own (the machine's ~/.ray is left alone).
    os.environ.update(HOME=f"{temp}/home", RAY_AUTH_MODE="token", BENTOML_HOME=home,
                      BENTOML_DO_NOT_TRACK="true", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=str(DRAIN_S))
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
    logs = Path(out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    nodes = [ray_start("head", 20000, temp, logs / "head.log")]
    try:
        wait_nodes(1)
        result["one_node"] = submit(pages, Path(out) / "one", 1)
        nodes.append(ray_start("worker", 21000, temp, logs / "worker.log"))
        result["worker_join_s"] = round(wait_nodes(2), 1)
        result["two_nodes"] = submit(pages, Path(out) / "two", 2)
        result["scorer_nodes"] = scorer_nodes()
    finally:
        for process in reversed(nodes):
            stop(process)
        deadline = time.monotonic() + 10  # the dashboard's forkserver exits a moment after it
        while (left := others()) and time.monotonic() < deadline:
            time.sleep(0.5)
        result["left"] = left
        result["cluster_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
