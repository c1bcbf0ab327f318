"""The execution provider: which one a session gets (CUDA when onnxruntime-gpu sees a GPU, else CPU),
its options, and whether the CUDA provider really loads and what to do when it does not.

CUDA gets cuDNN's conv algorithm search set explicitly and bounded arena growth; CPU gets every graph
optimization (layout transforms matter: measured ~30 % on AlexNet) and intra-op threads sized so that
workers × threads = cores.

onnxruntime-gpu lists CUDAExecutionProvider as available whether or not its libraries can load; when
they cannot (a CUDA 12 image under a CUDA 13 build, no cuDNN, no driver), the session quietly comes up
on CPU with one line on stderr. So the service checks the provider a session actually got, and keeps
onnxruntime's words for the message (they name the missing library).

What the pinned onnxruntime-gpu needs (pyproject's `gpu` extra; tests/test_docker_gpu.py checks it
against the wheel's metadata and the Dockerfile's base image): CUDA 13 and cuDNN 9 libraries, an
NVIDIA driver of the CUDA 13 generation (≥ 580).

    python -m service.engine.provider    # which provider a session gets here, and why (JSON)
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import onnxruntime as ort

from service.settings import Settings

log = logging.getLogger("convserve")

CUDA_MAJOR, CUDNN_MAJOR, MIN_DRIVER = 13, 9, 580
ADVICE = (f"To fix: the pinned onnxruntime-gpu needs CUDA {CUDA_MAJOR} and cuDNN {CUDNN_MAJOR} libraries "
          f"and an NVIDIA driver >= {MIN_DRIVER}: use the GPU image (docker build --build-arg VARIANT=gpu, "
          f"a CUDA {CUDA_MAJOR} cuDNN runtime base) or install `.[gpu-pip]` "
          f"(onnxruntime-gpu[cuda,cudnn] brings the libraries from PyPI); check the driver with "
          f"nvidia-smi; or set CONVSERVE_PROVIDERS=cpu")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "2026-12-02 21:43:54.449 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] message"
_LOGGED = re.compile(r"^\S+ \S+ \[([EWF]):onnxruntime:[^\]]*\]\s*(.*)$")


CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """CONVSERVE_PROVIDERS=cuda, and CUDA is not what onnxruntime can run here."""


def wants_cuda(settings: Settings) -> bool:
    return settings.providers == "cuda" or (settings.providers == "auto"
                                            and CUDA in ort.get_available_providers())


def gpu_ids(settings: Settings) -> list[int]:
    """The GPUs an engine process each (supervisor.py): CONVSERVE_CUDA_DEVICES (comma-separated ids)
    when set, else the one CONVSERVE_CUDA_DEVICE. Listed, not probed: a probe would need a CUDA
    context in the server's main process, and each engine process checks its own session's provider
    (create_session) anyway."""
    listed = os.environ.get("CONVSERVE_CUDA_DEVICES", "")
    return [int(i) for i in listed.split(",") if i.strip()] or [settings.cuda_device]


def providers(settings: Settings) -> list:
    if not wants_cuda(settings):
        return [CPU]
    if CUDA not in ort.get_available_providers():
        raise ProviderError("CONVSERVE_PROVIDERS=cuda, but this onnxruntime has no CUDA provider: "
                            "install the `gpu` extra (onnxruntime-gpu) instead of `cpu`. "
                            + ADVICE)
    cuda = {
        "device_id": settings.cuda_device,
        # EXHAUSTIVE benchmarks every conv algorithm once per new input shape: worth it for the few
        # shapes /classify sees (warmed up), costly for arbitrary /score_map sizes; HEURISTIC is the
        # middle ground and the choice is explicit either way.
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",  # grow by what is asked, not by doubling
        "gpu_mem_limit": int(settings.cuda_mem_limit_gb * 2**30),
        "do_copy_in_default_stream": True,
        "use_tf32": int(settings.cuda_tf32),
    }
    return [(CUDA, cuda), CPU]


def session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads spin for work by default: with a small model that is a core burnt while the
    # event loop (decode, HTTP) starves; measured 152 % vs 103 % worker CPU for the same load.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def create_session(model: str | bytes, settings: Settings,
                   quiet: bool = False) -> tuple[ort.InferenceSession, str]:
    """The session for `model` (a path or ONNX bytes), and "" or why it runs on CPU although CUDA was
    wanted (auto). Raises ProviderError for that with CONVSERVE_PROVIDERS=cuda. `quiet`: only errors
    from the session's own log (for graphs with an optional input: onnxruntime warns about it on every
    load; export/heads.py). The provider's load errors come from onnxruntime's default log, kept."""
    options = session_options(settings)
    if quiet:
        options.log_severity_level = 3
    chosen = providers(settings)
    if chosen == [CPU]:
        return ort.InferenceSession(model, options, providers=chosen), ""
    with stderr_captured() as said:
        session = ort.InferenceSession(model, options, providers=chosen)
    got = session.get_providers()[0]
    if got == CUDA:
        return session, ""
    why = (f"the CUDA provider did not load, so the session runs on {got}. onnxruntime said: "
           f"{onnxruntime_said(said)}. {ADVICE}")
    if settings.providers == "cuda":
        raise ProviderError(f"CONVSERVE_PROVIDERS=cuda, but {why}")
    log.warning("CONVSERVE_PROVIDERS=auto: %s", why)
    return session, why


@contextlib.contextmanager
def stderr_captured():
    """Collect what is written to file descriptor 2 (onnxruntime's C++ logger writes there, not to
    Python's sys.stderr) and Python warnings, then write the text back to stderr so that nothing is
    lost from the log. Yields a list that holds the text once the block ends."""
    said: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(tmp.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            os.write(2, text.encode())
            said.extend(line for line in _ANSI.sub("", text).splitlines() if line.strip())
            said.extend(str(w.message) for w in caught)


def onnxruntime_said(lines: list[str]) -> str:
    """onnxruntime's errors and warnings among captured lines, without timestamps, as one string (all
    lines if none looks like onnxruntime's, so that nothing is hidden). Left out, as they say nothing
    about CUDA: "No registered plugin EP device found" (every CUDA session, loaded or not) and the
    optional `pixels` input's "Initializer ... appears in graph inputs" (export/heads.py)."""
    kept = []
    for line in lines:
        if "No registered plugin EP device" in line or "appears in graph inputs" in line:
            continue
        logged = _LOGGED.match(line)
        kept.append(f"[{logged[1]}] {logged[2]}" if logged else line)
    return " | ".join(kept or lines).rstrip(".") or "nothing (no error was logged)"


# A one-Conv model (1×1×4×4 input, a 3×3 kernel of ones), serialized: creating its session loads the
# CUDA provider library, running it loads cuDNN (loaded lazily: a session alone would not find a missing
# cuDNN). Bytes, not built with `onnx`: the serving image has onnxruntime only. IR 8 / opset 17 load in
# every onnxruntime this project allows; tests/test_gpu_path.py rebuilds it with onnx's helpers.
PROBE_MODEL = base64.b64decode(
    "CAgSCWNvbnZzZXJ2ZTp1Cg8KAXgKAXcSAXkiBENvbnYSBXByb2JlKjMIAQgBCAMIAxABQgF3SiQAAIA/AACAPwAAgD8AAIA/"
    "AACAPwAAgD8AAIA/AACAPwAAgD9aGwoBeBIWChQIARIQCgIIAQoCCAEKAggECgIIBGIJCgF5EgQKAggBQgQKABAR")


def probe() -> dict:
    """Open and run the probe model as the service would (CONVSERVE_* settings from the environment):
    {"provider": the one the session got, "error": why not CUDA, "" when CUDA or CPU was asked for}."""
    import numpy as np

    settings = Settings()
    try:
        session, warning = create_session(PROBE_MODEL, settings)
        session.run(None, {"x": np.ones((1, 1, 4, 4), np.float32)})
    except ProviderError as e:
        return {"provider": "none", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - a failed first run (cuDNN) is the answer, not a crash
        return {"provider": "none", "error": f"a session on CUDA failed its first run: {e}. {ADVICE}"}
    return {"provider": session.get_providers()[0], "error": warning}


def check_at_start(timeout_s: float = 120) -> None:
    """Called where the server starts (before workers), when CUDA is wanted: probe in a subprocess, so
    this process never holds a CUDA context of its own. CONVSERVE_PROVIDERS=cuda and no CUDA →
    SystemExit with onnxruntime's error and what to install; auto → a warning (the workers warn too,
    in the log and in GET /models)."""
    strict = Settings().providers == "cuda"
    try:
        done = subprocess.run([sys.executable, "-m", "service.engine.provider"], capture_output=True,
                              text=True, timeout=timeout_s, cwd=Path(__file__).resolve().parents[2])
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        result = {"provider": "none", "error": f"the CUDA probe gave no answer ({e!r}). {ADVICE}"}
    if result["provider"] == "CUDAExecutionProvider":
        return
    error = result["error"]
    if strict:
        prefix = "" if error.startswith("CONVSERVE_PROVIDERS=cuda") else "CONVSERVE_PROVIDERS=cuda, but "
        raise SystemExit(f"error: {prefix}{error}")
    log.warning("CONVSERVE_PROVIDERS=auto: serving on CPU. %s", error)


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):  # only the JSON line on stdout
        answer = probe()
    print(json.dumps(answer))
