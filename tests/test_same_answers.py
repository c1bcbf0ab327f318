"""Same answers as before: the service of this checkout against the service of a fixed baseline commit,
two real `bentoml serve` side by side in one run, on one store of the shipped models, asked the same
catalogue of requests. Every answer (status, body bytes, the headers that matter) and /docs.json must
be byte-identical.

Why two live servers and no golden files: float outputs differ between CPUs (onnxruntime picks AVX2 or
AVX-512 kernels), so recorded answers would fail on some machines. Both servers here run on the same
CPU with the same settings, so any difference is the code's. Only `service/` (and `modelcard/`)
are taken from the baseline commit; the models (bentomodels/) are this checkout's, imported once,
versions and all.

Each server imports the `service` package of its own tree (the working directory of `bentoml serve`
comes first on its sys.path, ahead of the venv's editable install, which may point at another
checkout): checked, from the files each server's processes opened to import (an audit hook, below)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import yaml
from conftest import ROOT
from PIL import Image
from test_v2 import BAD_REQUESTS, WHOLE_BODY

from loadtest.servers import Server
from models.pages import synth_page

# The commit whose service/ (and modelcard/) the answers are compared against. History: 983a211 (main
# before the layers of issue 20) gave the same 110 answers and /docs.json byte for byte as the layered
# service at c6a8f93; issue 21 then changed some on purpose (413s for work over budget, 422 for a text
# image part, the admin key in /docs.json, the page at /, …), so the baseline moved to f3f03e7. Move it when
# a change means to alter these answers, and say so in its commit.
BASELINE = "f3f03e7"
BASELINE_TARGET = "service.service:ConvServe"  # what `bentoml serve` serves at BASELINE
SHIPPED = ("lenet5", "digit-detector")  # CONVSERVE_MODELS' default
MAX_BYTES = 2**20  # the body limit on both sides (a catalogue body is at most ~150 kB)
# The same CONVSERVE_* settings on both sides (and the same environment otherwise). Two intra-op threads
# each, as the servers share the machine; CPU pinned, so that a GPU machine compares the same path.
SETTINGS = {"models": ",".join(SHIPPED), "threads": 2, "max_request_bytes": MAX_BYTES, "max_images": 64,
            "warmup_rounds": 3, "batch_wait_ms": 0, "providers": "cpu", "timeout_s": 60}
# Compared on every answer besides status and body. X-Request-ID is sent on every request, so its echo
# is deterministic too; Date and Server are not compared (the clock, not the code).
HEADERS = ("content-type", "content-length", "retry-after", "inference-header-content-length",
           "x-request-id")
BOUNDARY = "convserve-same-answers"  # multipart: a fixed boundary (httpx draws a random one)


@dataclass
class Case:
    """One request, sent byte for byte alike to both servers."""

    name: str
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200  # the baseline's status: the case asks what it says it asks
    # headers left out of the comparison for this case (each use says why)
    skip_headers: tuple[str, ...] = ()
    # applied to both bodies before comparing (each use says why)
    normalize: Callable[[bytes], bytes] | None = None


# ---------------------------------------------------------------------------------------------------
# the two trees and the store


def git(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def baseline_tree(tmp_path_factory) -> Path:
    """`git archive BASELINE service modelcard` extracted into a folder of its own."""
    if git("rev-parse", "--git-dir").returncode != 0:
        pytest.fail(f"{ROOT} is not a git checkout: the baseline service/ (commit {BASELINE}) comes from "
                    f"its history")
    if git("cat-file", "-e", f"{BASELINE}^{{commit}}").returncode != 0:
        pytest.fail(f"baseline commit {BASELINE} is not in this repository (a shallow clone?): fetch "
                    f"the history (git fetch --unshallow) so that its service/ can be served beside "
                    f"this checkout's")
    # the packages the service imports from this repository (modelcard/ exists from issue 20 on)
    packages = [p for p in ("service", "modelcard")
                if git("cat-file", "-e", f"{BASELINE}:{p}").returncode == 0]
    archive = git("archive", "--format=tar", BASELINE, *packages, check=True)
    tree = tmp_path_factory.mktemp("baseline").resolve()
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    assert (tree / "service" / "service.py").is_file()
    return tree


def shipped_version(name: str) -> str:
    with tarfile.open(ROOT / "bentomodels" / f"{name}.bentomodel") as tar:
        return str(yaml.safe_load(tar.extractfile("./model.yaml"))["version"])


@pytest.fixture(scope="module")
def shipped_store(tmp_path_factory) -> Path:
    """A BENTOML_HOME holding the shipped models, imported from bentomodels/ (fixed versions)."""
    home = tmp_path_factory.mktemp("same-store") / "bentoml"
    bentoml = Path(sys.executable).with_name("bentoml")
    for name in SHIPPED:
        subprocess.run([str(bentoml), "models", "import", str(ROOT / "bentomodels" / f"{name}.bentomodel")],
                       env={**os.environ, "BENTOML_HOME": str(home)}, check=True, capture_output=True,
                       timeout=120)
    return home


# A sitecustomize for the servers' processes (PYTHONPATH): an audit hook that writes down every .py
# and .pyc file opened (imports open their source or bytecode through io.open_code, an audited "open").
# Each server gets one and its own list; nothing else changes, and both sides alike.
WATCH_IMPORTS = """
import os, sys

_LIST = os.environ["SAME_ANSWERS_OPENED"]


def _opened(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].endswith((".py", ".pyc")):
        with open(_LIST, "a") as out:  # a .txt: this open is not written down itself
            out.write(os.path.abspath(args[0]) + "\\n")


sys.addaudithook(_opened)
"""


def imported_outside_python(opened: Path, hook: Path) -> set[Path]:
    """The .py/.pyc files a server opened outside Python's own folders (stdlib, the venv) and the hook's:
    the project's code it imported."""
    python = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)} | {hook.resolve()}
    files = {Path(line).resolve() for line in opened.read_text().splitlines()} if opened.exists() else set()
    return {f for f in files if not any(f.is_relative_to(p) for p in python)}


class BaselineTarget(Server):
    """Server, serving the baseline's entry point whatever this checkout's Server serves."""

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("serve") + 1] = BASELINE_TARGET
        return command


@pytest.fixture(scope="module")
def servers(baseline_tree, shipped_store, tmp_path_factory):
    """(baseline, current): both started at once, each from its own tree, warm and ready."""
    logs = tmp_path_factory.mktemp("same-logs")
    trees = {"baseline": baseline_tree, "current": ROOT.resolve()}
    kinds = {"baseline": BaselineTarget, "current": Server}
    hook = logs / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WATCH_IMPORTS)
    started = {}
    try:
        for side, tree in trees.items():
            env = {"PYTHONPATH": f"{hook}{os.pathsep}{tree}",
                   "SAME_ANSWERS_OPENED": str(logs / f"{side}.txt")}
            started[side] = kinds[side](shipped_store, logs / f"{side}.log", cwd=tree, env=env, **SETTINGS)
        for srv in started.values():
            srv.readiness()
        for side, tree in trees.items():
            code = imported_outside_python(logs / f"{side}.txt", hook)
            assert any(f.is_relative_to(tree / "service") for f in code), f"{side}: no service/ from {tree}"
            elsewhere = sorted(str(f) for f in code if not f.is_relative_to(tree))
            assert not elsewhere, f"the {side} server imported code from outside {tree}: {elsewhere[:5]}"
        yield started["baseline"], started["current"]
    finally:
        for srv in started.values():
            srv.stop()


# ---------------------------------------------------------------------------------------------------
# the catalogue


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def as_json(payload: object) -> bytes:
    return json.dumps(payload).encode()


JSON = {"Content-Type": "application/json"}


def form(fields: list[tuple[str, str | tuple[str, bytes]]]) -> tuple[bytes, dict[str, str]]:
    """multipart/form-data with a fixed boundary: text fields, and (filename, bytes) files."""
    parts = []
    for name, value in fields:
        if isinstance(value, tuple):
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                    f"Content-Type: image/png\r\n\r\n").encode()
            parts.append(b"--" + BOUNDARY.encode() + b"\r\n" + head + value[1] + b"\r\n")
        else:
            head = f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            parts.append(b"--" + BOUNDARY.encode() + b"\r\n" + head + value.encode() + b"\r\n")
    body = b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n"
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def binary(inputs: list[triton.InferInput], outputs: list[triton.InferRequestedOutput] | None = None,
           request_id: str = "", parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """A request in tritonclient's own binary format (JSON header + tensors)."""
    body, json_size = triton.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id=request_id, parameters=parameters)
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def tensor(name: str, array: np.ndarray, datatype: str, binary_data: bool = True) -> triton.InferInput:
    t = triton.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary_data)
    return t


def pixels_json(array: np.ndarray) -> dict:
    """A UINT8 `pixels` input in JSON, flat: (N, C, H, W), or one (H, W) page."""
    array = array if array.ndim == 4 else array[None, None]
    return {"name": "pixels", "shape": list(array.shape), "datatype": "UINT8", "data": array.ravel().tolist()}


def images_json(blobs: list[bytes], shape: list[int] | None = None) -> dict:
    """A BYTES `image` input in JSON: base64 strings."""
    return {"name": "image", "shape": shape or [len(blobs)], "datatype": "BYTES",
            "data": [b64(b) for b in blobs]}


def without_warmup_ms(body: bytes) -> bytes:
    """GET /models: each model's warmup_ms is a measured duration (differs run to run)."""
    payload = json.loads(body)
    for model in payload["models"]:
        model.pop("warmup_ms")
    return as_json(payload)


def catalogue(images: np.ndarray, labels: np.ndarray) -> list[Case]:
    """Every request both servers are asked, in order. `images`: held-out digits (N, 28, 28) uint8."""
    versions = {name: shipped_version(name) for name in SHIPPED}
    digits = images[[0, 97, 194, 291, 388, 485]]  # six real digits, several classes
    pngs = [png(d) for d in digits]
    pixels = digits[:4, None]  # (4, 1, 28, 28) uint8
    normalized = ((pixels.astype(np.float32) / 255 - 0.1307) / 0.3081).astype(np.float32)
    page = synth_page(np.random.default_rng(3), images, labels, 120, 160, 4).image  # (120, 160) uint8
    small_page = synth_page(np.random.default_rng(4), images, labels, 64, 72, 2).image
    cases: list[Case] = []

    def get(name: str, path: str, **kw) -> None:
        cases.append(Case(name, "GET", path, **kw))

    def post(name: str, path: str, body: bytes, headers: dict[str, str] | None = None, **kw) -> None:
        cases.append(Case(name, "POST", path, body, dict(headers or {}), **kw))

    def infer(name: str, payload: dict, model: str = "lenet5", headers: dict | None = None,
              status: int = 200) -> None:
        post(name, f"/v2/models/{model}/infer", as_json(payload), headers if headers is not None else JSON,
             status=status)

    # health and server metadata
    for path in ("/v2", "/v2/", "/v2/health/live", "/v2/health/ready", "/livez", "/healthz", "/readyz"):
        get(f"GET {path}", path)
    # model metadata, readiness and configuration: unversioned, the store's version, a wrong version
    for model in (*SHIPPED, "nope"):
        for prefix in ("", f"/versions/{versions.get(model, '1')}", "/versions/7"):
            for action in ("", "/ready", "/config"):
                get(f"GET {model}{prefix}{action}", f"/v2/models/{model}{prefix}{action}",
                    status=404 if model == "nope" or prefix == "/versions/7" else 200)
    get("GET infer (405)", "/v2/models/lenet5/infer", status=405)
    post("POST metadata (405)", "/v2/models/lenet5", b"{}", JSON, status=405)
    get("GET unknown /v2 route", "/v2/models", status=404)

    # lenet5 in JSON: FP32 `input`, UINT8 `pixels` (flat and nested), BYTES `image` (base64 PNGs)
    flat = pixels_json(pixels)
    infer("FP32 input", {"inputs": [{"name": "input", "shape": list(normalized.shape), "datatype": "FP32",
                                     "data": normalized.ravel().tolist()}]})
    infer("FP32 input larger than the window: a map",
          {"inputs": [{"name": "input", "shape": [1, 1, 40, 44], "datatype": "FP32",
                       "data": np.resize(normalized, (1, 1, 40, 44)).ravel().tolist()}]})
    infer("UINT8 pixels", {"id": "req-1", "inputs": [flat]})
    infer("UINT8 pixels, nested data, no Content-Type",
          {"inputs": [{**flat, "data": pixels.tolist()}]}, headers={})
    infer("numeric id", {"id": 42, "inputs": [flat]})
    infer("probabilities and scores", {"inputs": [flat], "outputs": [{"name": "probabilities"},
                                                                     {"name": "scores"}]})
    infer("classification 3", {"inputs": [flat], "outputs": [{"name": "probabilities",
                                                              "parameters": {"classification": 3}}]})
    infer("classification on scores, k over the classes",
          {"inputs": [flat], "outputs": [{"name": "scores", "parameters": {"classification": 20}}]})
    infer("classification 0 (off)", {"inputs": [flat], "outputs": [{"name": "probabilities",
                                                                    "parameters": {"classification": 0}}]})
    infer("BYTES [N]", {"id": "png", "inputs": [images_json(pngs)]})
    infer("BYTES [N, 1], inverted",
          {"inputs": [images_json(pngs[:2], [2, 1])], "parameters": {"invert": True}})
    infer("BYTES, JSON binary_data_output",
          {"inputs": [images_json(pngs[:3])], "parameters": {"binary_data_output": True}})
    infer("BYTES, one output binary, one JSON",
          {"inputs": [images_json(pngs[:2])],
           "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                       {"name": "scores", "parameters": {"binary_data": False}}]})

    # lenet5 in tritonclient's binary format, in and out
    post("binary UINT8 pixels", "/v2/models/lenet5/infer", *binary([tensor("pixels", pixels, "UINT8")]))
    post("binary FP32 input, classification 2", "/v2/models/lenet5/infer",
         *binary([tensor("input", normalized, "FP32")],
                 [triton.InferRequestedOutput("probabilities", class_count=2)], request_id="b-2"))
    post("binary BYTES images, both outputs binary", f"/v2/models/lenet5/versions/{versions['lenet5']}/infer",
         *binary([tensor("image", np.array(pngs, dtype=np.object_), "BYTES")],
                 [triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("scores")]))
    post("binary in, JSON out", "/v2/models/lenet5/infer",
         *binary([tensor("pixels", pixels[:2], "UINT8")],
                 [triton.InferRequestedOutput("probabilities", binary_data=False)]))
    post("JSON in, binary out", "/v2/models/lenet5/infer",
         *binary([tensor("pixels", pixels, "UINT8", binary_data=False)],
                 [triton.InferRequestedOutput("probabilities", class_count=3)]))

    # the detector: window-sized digits, and pages (score maps)
    page_pixels = page[None, None]
    detector = f"/v2/models/digit-detector/versions/{versions['digit-detector']}/infer"
    infer("detector: window-sized pixels", {"inputs": [pixels_json(pixels[:2])]}, "digit-detector")
    post("detector: page pixels, binary map", detector, *binary([tensor("pixels", page_pixels, "UINT8")]))
    infer("detector: page pixels in JSON", {"inputs": [pixels_json(small_page)]}, "digit-detector")
    infer("detector: page PNG", {"inputs": [images_json([png(small_page)])]}, "digit-detector")
    post("detector: two page PNGs, binary", "/v2/models/digit-detector/infer",
         *binary([tensor("image", np.array([png(page), png(page[::-1])], dtype=np.object_), "BYTES")]))
    post("detector: FP32 page", "/v2/models/digit-detector/infer",
         *binary([tensor("input", (small_page[None, None] / np.float32(255)).astype(np.float32), "FP32")],
                 [triton.InferRequestedOutput("scores", binary_data=False)]))

    # errors: tests/test_v2.py's, then more
    for i, (path, body, headers, status, fragment) in enumerate(BAD_REQUESTS):
        if headers is WHOLE_BODY:
            headers = {"Inference-Header-Content-Length": str(len(body))}
        post(f"test_v2 bad request {i} ({fragment})", path, body, headers, status=status)
    one = pixels_json(pixels[:1])
    for name, payload in [
        ("unknown output", {"inputs": [one], "outputs": [{"name": "logits"}]}),
        ("outputs not a list", {"inputs": [one], "outputs": {"name": "scores"}}),
        ("parameters not an object", {"inputs": [one], "parameters": [1]}),
        ("two inputs", {"inputs": [one, one]}),
        ("wrong input name", {"inputs": [{**one, "name": "x"}]}),
        ("unknown datatype", {"inputs": [{**one, "datatype": "FP8"}]}),
        ("negative shape", {"inputs": [{**one, "shape": [-1, 1, 28, 28]}]}),
        ("neither data nor binary_data_size", {"inputs": [{k: v for k, v in one.items() if k != "data"}]}),
        ("pixels of three dimensions", {"inputs": [{**one, "shape": [1, 28, 28]}]}),
        ("pixels with no image", {"inputs": [{**one, "shape": [0, 1, 28, 28], "data": []}]}),
        ("65 images", {"inputs": [{**one, "shape": [65, 1, 28, 28], "data": [0] * (65 * 784)}]}),
        ("BYTES image [N, 2]", {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "BYTES",
                                            "data": [b64(pngs[0]), b64(pngs[1])]}]}),
        ("BYTES data not strings", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                "data": [7]}]}),
        ("BYTES count off the shape", {"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                                                   "data": [b64(pngs[0])]}]}),
        ("BYTES not an image", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                            "data": [b64(b"not an image at all")]}]}),
        ("invert not a bool", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                           "data": [b64(pngs[0])]}], "parameters": {"invert": "yes"}}),
        ("classification -1", {"inputs": [one], "outputs": [{"name": "probabilities",
                                                             "parameters": {"classification": -1}}]}),
        ("classification '3'", {"inputs": [one], "outputs": [{"name": "probabilities",
                                                              "parameters": {"classification": "3"}}]}),
    ]:
        infer(f"error: {name}", payload, status=413 if name == "65 images" else 400)
    infer("error: probabilities of a page", {"inputs": [pixels_json(small_page)],
                                             "outputs": [{"name": "probabilities"}]}, "digit-detector",
          status=400)
    infer("error: classification of a map",
          {"inputs": [pixels_json(small_page)],
           "outputs": [{"name": "scores", "parameters": {"classification": 2}}]}, "digit-detector",
          status=400)
    infer("error: pages of two sizes", {"inputs": [images_json([png(small_page), png(page)])]},
          "digit-detector", status=400)
    head = as_json({"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                "parameters": {"binary_data_size": 784}}]})
    sized = {"Inference-Header-Content-Length": str(len(head))}
    post("error: binary part cut short", "/v2/models/lenet5/infer", head + bytes(100), sized,
         status=400)
    post("error: binary bytes belonging to no input", "/v2/models/lenet5/infer", head + bytes(790), sized,
         status=400)
    cut = as_json({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                               "parameters": {"binary_data_size": 6}}]})
    post("error: cut BYTES element", "/v2/models/lenet5/infer", cut + b"\x09\x00\x00\x00ab",
         {"Inference-Header-Content-Length": str(len(cut))}, status=400)
    post("error: Content-Encoding gzip", "/v2/models/lenet5/infer", as_json({"inputs": [one]}),
         {**JSON, "Content-Encoding": "gzip"}, status=400)
    post("error: body over the limit (413)", "/v2/models/lenet5/infer", bytes(MAX_BYTES + 1), JSON,
         status=413)
    # An X-Request-ID the gate does not take gets a random one (uuid4) in its place: the id in the body
    # fixes the answer's `id`; the echoed header is random, so it is not compared here.
    infer("X-Request-ID refused, id in the body", {"id": "body-id", "inputs": [one]},
          headers={**JSON, "X-Request-ID": "not a sane id"})
    cases[-1].skip_headers = ("x-request-id",)

    # the other routes whose answers are deterministic
    body, headers = form([("image", (f"{i}.png", p)) for i, p in enumerate(pngs[:3])] + [("top_k", "3")])
    post("POST /classify top_k=3", "/classify", body, headers)
    body, headers = form([("image", ("d.png", pngs[3])), ("model", "digit-detector"), ("top_k", "2"),
                          ("invert", "true")])
    post("POST /classify detector, inverted", "/classify", body, headers)
    body, headers = form([("image", ("d.png", pngs[0])), ("top_k", "0")])
    post("POST /classify top_k=0 (422)", "/classify", body, headers, status=422)
    body, headers = form([("image", ("d.png", pngs[0])), ("model", "nope")])
    post("POST /classify unknown model (404)", "/classify", body, headers, status=404)
    post("POST /classify as JSON (415)", "/classify", b"{}", JSON, status=415)
    post("POST /classify_base64", "/classify_base64",
         as_json({"images_b64": [b64(p) for p in pngs[:2]], "top_k": 2}), JSON)
    post("POST /classify_base64 not base64", "/classify_base64", as_json({"images_b64": ["%%%"]}), JSON,
         status=422)
    for outputs in ("detections,argmax", "scores,heatmap"):
        body, headers = form([("image", ("page.png", png(page))), ("outputs", outputs)])
        post(f"POST /score_map {outputs}", "/score_map", body, headers)
    body, headers = form([("image", ("page.png", png(page))), ("threshold", "0.5"), ("stride_factor", "2"),
                          ("scales", "1,1.5")])
    post("POST /score_map stride_factor=2, two scales", "/score_map", body, headers)
    # GET /models: warmup_ms is a measured duration: removed from both bodies (so content-length too)
    get("GET /models (no warmup_ms)", "/models", normalize=without_warmup_ms,
        skip_headers=("content-length",))
    return cases


# ---------------------------------------------------------------------------------------------------
# asking both


def ask(client: httpx.Client, case: Case, rid: str) -> tuple[int, dict[str, str | None], bytes]:
    # every request carries an X-Request-ID (else the gate makes a random one) and asks for no
    # compression, so that the bytes compared are the bytes the server wrote
    headers = {"X-Request-ID": rid, "Accept-Encoding": "identity", **case.headers}
    response = client.request(case.method, case.path, content=case.body or None, headers=headers)
    body = case.normalize(response.content) if case.normalize else response.content
    headers = {h: response.headers.get(h) for h in HEADERS if h not in case.skip_headers}
    return response.status_code, headers, body


def difference(a: bytes, b: bytes) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return (f"bodies of {len(a)} and {len(b)} bytes differ from byte {at}: "
            f"baseline …{a[max(0, at - 60):at + 60]!r}… current …{b[max(0, at - 60):at + 60]!r}…")


@pytest.mark.slow
def test_every_request_gets_the_baselines_answer(servers, mnist):
    baseline, current = servers
    cases = catalogue(mnist[1].images, mnist[1].labels)
    assert len({c.name for c in cases}) == len(cases), "case names must be unique"
    differences, unexpected = [], []
    with httpx.Client(base_url=baseline.url, timeout=60) as old, \
            httpx.Client(base_url=current.url, timeout=60) as new:
        for i, case in enumerate(cases):  # one at a time: the same batches on both sides
            rid = f"same-{i}"
            theirs, ours = ask(old, case, rid), ask(new, case, rid)
            if theirs[0] != case.status:
                unexpected.append(f"{case.name}: {theirs[0]}, not {case.status}: {theirs[2][:200]!r}")
            if theirs != ours:
                what = [f"status {theirs[0]} → {ours[0]}"] if theirs[0] != ours[0] else []
                what += [f"{h}: {theirs[1][h]!r} → {ours[1][h]!r}"
                         for h in theirs[1] if theirs[1][h] != ours[1][h]]
                if theirs[2] != ours[2]:
                    what.append(difference(theirs[2], ours[2]))
                differences.append(f"{case.method} {case.path} [{case.name}]: " + "; ".join(what))
    assert not unexpected, "the baseline answers these cases unlike the catalogue expects (fix the " \
                           "catalogue):\n" + "\n".join(unexpected)
    assert not differences, (f"{len(differences)} of {len(cases)} answers differ from baseline "
                             f"{BASELINE}'s:\n" + "\n".join(differences))


@pytest.mark.slow
def test_openapi_document_is_the_baselines(servers):
    theirs, ours = (httpx.get(f"{s.url}/docs.json", headers={"X-Request-ID": "docs"}, timeout=30)
                    for s in servers)
    assert theirs.status_code == ours.status_code == 200
    assert theirs.headers["content-type"] == ours.headers["content-type"]
    assert theirs.content == ours.content, difference(theirs.content, ours.content)

