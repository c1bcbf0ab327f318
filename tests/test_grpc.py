"""The Open Inference Protocol over gRPC against a real `bentoml serve`, through the real clients:
tritonclient.grpc (in a process of its own: tests/triton_grpc.py says why) and kserve's
InferenceGRPCClient; bad and hostile calls built with kserve's generated messages, so the wire is
theirs. Mirrors tests/test_v2.py (HTTP /v2): the same answers, as gRPC says them."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import threading

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as kpb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.infer_type import RequestedOutput
from PIL import Image
from triton_grpc import TritonError, TritonGrpc

from loadtest.servers import Server
from models.pages import synth_page

UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def pngs(blobs: list[bytes]) -> tuple[str, str, np.ndarray]:
    return "image", "BYTES", np.array(blobs, dtype=np.object_).reshape(-1, 1)


@pytest.fixture(scope="module")
def triton(server):
    client = TritonGrpc(server.grpc_target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target, options=UNLIMITED) as channel:
        yield GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def held(mnist):
    return mnist[1].images, mnist[1].labels  # (N, 28, 28) uint8, (N,)


def test_tritonclient_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("lenet5")
    assert "classification" in triton.get_server_metadata(as_json=True)["extensions"]
    meta = triton.get_model_metadata("lenet5", as_json=True)
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "pixels": "UINT8",
                                                                  "input": "FP32"}
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"probabilities": ["-1", "10"],
                                                                "scores": ["-1", "10", "-1", "-1"]}
    config = triton.get_model_config("lenet5", as_json=True)["config"]
    assert int(config["max_batch_size"]) >= 1
    assert {i["name"] for i in config["input"]} == {"image", "pixels", "input"}
    assert triton.is_model_ready("lenet5", model_version=meta["versions"][0])
    with pytest.raises(TritonError, match="NOT_FOUND.*unknown model 'nope'"):
        triton.get_model_metadata("nope")
    with pytest.raises(TritonError, match="NOT_FOUND.*version '7' is not served"):
        triton.get_model_metadata("lenet5", model_version="7")


def test_tritonclient_labels_held_out_pngs(triton, held):
    """Every held-out digit as a PNG in BYTES tensors (raw contents, tritonclient's way): ≥ 98 %."""
    images, labels = held
    predicted = []
    for start in range(0, len(images), 64):  # the server's per-request image limit
        out = triton.infer("lenet5", [pngs([png(a) for a in images[start:start + 64]])])
        probabilities = out["probabilities"]  # (n, 10)
        assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
        predicted.append(probabilities.argmax(1))
    accuracy = (np.concatenate(predicted) == labels).mean()
    assert accuracy >= 0.98, accuracy


def test_classification_extension(triton, held):
    images, labels = held
    picks = np.arange(0, len(images), 97)[:8]
    blobs = [png(images[i]) for i in picks]
    rows = triton.infer("lenet5", [pngs(blobs)], outputs=[("probabilities", 3)])["probabilities"]
    assert rows.shape == (8, 3)
    plain = triton.infer("lenet5", [pngs(blobs)])["probabilities"]
    for row, probabilities in zip(rows, plain, strict=True):
        parsed = [entry.decode().split(":") for entry in row]
        values = [float(v) for v, _, _ in parsed]
        assert values == sorted(values, reverse=True)
        assert [int(i) for _, i, _ in parsed] == list(np.argsort(-probabilities)[:3])
        assert abs(values[0] - probabilities.max()) < 1e-5
    assert (np.array([int(r[0].decode().split(":")[1]) for r in rows]) == labels[picks]).mean() >= 0.875


def test_fp32_tensor_gives_classify_probabilities(triton, server, held):
    """A client that preprocesses itself, from what ModelConfig says, gets /classify's numbers."""
    images, _ = held
    picks = images[:: len(images) // 12][:12]
    params = {k: v["string_value"]
              for k, v in triton.get_model_config("lenet5", as_json=True)["config"]["parameters"].items()}
    scale, mean, std = (float(params["scale"]), json.loads(params["mean"])[0], json.loads(params["std"])[0])
    x = ((picks[:, None].astype(np.float32) * scale - mean) / std).astype(np.float32)  # (12, 1, 28, 28)
    ours = triton.infer("lenet5", [("input", "FP32", x)])["probabilities"]
    files = [("image", (f"{i}.png", png(a))) for i, a in enumerate(picks)]
    answer = httpx.post(f"{server.url}/classify", files=files, data={"top_k": "10"}, timeout=30).json()
    for row, prediction in zip(ours, answer["predictions"], strict=True):
        for entry in prediction["top_k"]:
            assert abs(row[int(entry["label"])] - entry["probability"]) < 1e-4


def test_dense_model_returns_its_score_map(triton, server, held):
    """The detector on a page: /score_map's `scores`, from UINT8 pixels and from a PNG alike."""
    images, labels = held
    page = synth_page(np.random.default_rng(3), images, labels, 120, 160, 4).image  # (120, 160) uint8
    version = triton.get_model_metadata("digit-detector", as_json=True)["versions"][0]
    by_pixels = triton.infer("digit-detector", [("pixels", "UINT8", page[None, None])],
                             model_version=version)["scores"]
    by_png = triton.infer("digit-detector", [pngs([png(page)])])["scores"]
    assert by_pixels.shape == (1, 11, (120 - 28) // 4 + 1, (160 - 28) // 4 + 1)
    answer = httpx.post(f"{server.url}/score_map", files={"image": ("p.png", png(page))},
                        data={"outputs": "scores"}, timeout=60).json()["scores"]
    reference = np.frombuffer(base64.b64decode(answer["data"]), "<f4").reshape(answer["shape"])
    assert np.allclose(by_pixels[0], reference, atol=1e-5) and np.allclose(by_png, by_pixels, atol=1e-6)
    with pytest.raises(TritonError, match="INVALID_ARGUMENT.*per image"):
        triton.infer("digit-detector", [("pixels", "UINT8", page[None, None])],
                     outputs=[("probabilities", 0)])


def test_kserve_grpc_client(server, held):
    """kserve's InferenceGRPCClient: health, model readiness, infer with typed and with raw contents."""
    images, labels = held
    x = images[:16:2][:, None]  # (8, 1, 28, 28) uint8

    async def talk():
        async with InferenceGRPCClient(server.grpc_target, timeout=30) as kserve:
            assert await kserve.is_server_live() and await kserve.is_server_ready()
            assert await kserve.is_model_ready("lenet5")
            answers = []
            for raw in (False, True):
                tensor = InferInput("pixels", list(x.shape), "UINT8")
                tensor.set_data_from_numpy(x, binary_data=raw)
                request = InferRequest(model_name="lenet5", infer_inputs=[tensor],
                                       request_outputs=[RequestedOutput("probabilities")])
                answers.append((await kserve.infer(request)).outputs[0].as_numpy())
            return answers

    typed, raw = asyncio.run(talk())
    assert typed.shape == (8, 10) and np.allclose(typed, raw, atol=1e-6)
    assert (typed.argmax(1) == labels[:16:2]).mean() >= 0.875


def tensor(name: str, datatype: str, shape: list[int], **contents) -> kpb.ModelInferRequest.InferInputTensor:
    return kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape,
                                                  contents=kpb.InferTensorContents(**contents))


def call(*inputs, raw: list[bytes] = (), outputs: list[str] = (), model: str = "lenet5", version: str = "",
         parameters: dict | None = None) -> kpb.ModelInferRequest:
    return kpb.ModelInferRequest(model_name=model, model_version=version, inputs=inputs,
                                 raw_input_contents=raw, parameters=parameters or {},
                                 outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=n)
                                          for n in outputs])


def length_prefixed(*items: bytes) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


DIGIT = np.zeros((28, 28), np.uint8)
PIXELS = tensor("pixels", "UINT8", [1, 1, 28, 28])
INVALID, NOT_FOUND, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
# (id, request, status, fragment of the details): what gRPC callers get wrong, and hostile calls
BAD_CALLS = [
    ("huge-declared-shape", call(tensor("input", "FP32", [2**32, 2**32, 1, 1]), raw=[b"\0" * 16]), INVALID,
     "at most 8 integers"),
    ("huge-shape-within-dims", call(tensor("input", "FP32", [2**31 - 1] * 4), raw=[b"\0" * 16]), INVALID,
     "raw_input_contents[0] has 16"),
    ("raw-size-not-shape", call(PIXELS, raw=[b"\0" * 783]), INVALID, "is 784 bytes, raw_input_contents[0]"),
    ("raw-count-not-inputs", call(PIXELS, raw=[b"\0" * 784] * 2), INVALID, "one raw_input_contents entry"),
    ("raw-and-typed", call(tensor("pixels", "UINT8", [1, 1, 28, 28], uint_contents=[0] * 784),
                           raw=[b"\0" * 784]), INVALID, "both contents and raw_input_contents"),
    ("typed-count-not-shape", call(tensor("pixels", "UINT8", [1, 1, 28, 28], uint_contents=[1, 2, 3])),
     INVALID, "contents.uint_contents has 3"),
    ("typed-value-overflows", call(tensor("pixels", "UINT8", [1, 1, 28, 28], uint_contents=[300] * 784)),
     INVALID, "does not fit UINT8"),
    ("fp16-typed", call(tensor("input", "FP16", [1, 1, 28, 28])), INVALID, "no typed contents"),
    ("unknown-datatype", call(tensor("input", "FP8", [1]), raw=[b"\0"]), INVALID, "unknown datatype"),
    ("bytes-cut-prefix", call(tensor("image", "BYTES", [1]), raw=[b"\x05\x00"]), INVALID,
     "length prefix is cut off"),
    ("bytes-cut-element", call(tensor("image", "BYTES", [1]), raw=[b"\x05\x00\x00\x00abc"]), INVALID,
     "says 5 bytes"),
    ("bytes-more-than-shape", call(tensor("image", "BYTES", [1]), raw=[length_prefixed(b"a", b"b", b"c")]),
     INVALID, "more BYTES elements"),
    ("not-an-image", call(tensor("image", "BYTES", [1]), raw=[length_prefixed(b"hello")]), INVALID,
     "image[0]"),
    ("too-many-images", call(tensor("image", "BYTES", [65]), raw=[length_prefixed(*[b"x"] * 65)]), EXHAUSTED,
     "65 images in one request, over the limit of 64"),
    ("image-too-small", call(tensor("pixels", "UINT8", [1, 1, 4, 4]), raw=[b"\0" * 16]), INVALID,
     "at least 28"),
    ("wrong-datatype", call(tensor("pixels", "FP32", [1, 1, 28, 28]), raw=[b"\0" * 4 * 784]), INVALID,
     "takes UINT8"),
    ("wrong-input-name", call(tensor("x", "FP32", [1]), raw=[b"\0" * 4]), INVALID, "send exactly one input"),
    ("no-inputs", call(), INVALID, "needs inputs"),
    ("duplicate-outputs", call(PIXELS, raw=[DIGIT.tobytes()], outputs=["probabilities"] * 2), INVALID,
     "ask for each output once"),
    ("unknown-output", call(PIXELS, raw=[DIGIT.tobytes()], outputs=["nope"]), INVALID, "unknown output"),
    ("invert-not-bool", call(tensor("image", "BYTES", [1]), raw=[length_prefixed(png(DIGIT))],
                             parameters={"invert": kpb.InferParameter(string_param="yes")}), INVALID,
     "parameters.invert"),
    ("unknown-model", call(PIXELS, raw=[DIGIT.tobytes()], model="nope"), NOT_FOUND, "unknown model 'nope'"),
    ("unknown-version", call(PIXELS, raw=[DIGIT.tobytes()], version="0"), NOT_FOUND, "not served"),
    # 4.25 MiB, over the test server's 4 MiB (conftest.MAX_BYTES): gRPC refuses it before reading it whole
    ("over-the-message-limit", call(tensor("input", "FP32", [1, 1, 1024, 1088]), raw=[bytes(4456448)]),
     EXHAUSTED, "larger than max"),
]


@pytest.mark.parametrize("request_, status, fragment", [row[1:] for row in BAD_CALLS],
                         ids=[row[0] for row in BAD_CALLS])
def test_bad_calls_get_status_codes_that_say_what_to_change(stub, request_, status, fragment):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_, timeout=30)
    assert caught.value.code() == status, caught.value.details()
    assert fragment in caught.value.details(), caught.value.details()
    trailing = dict(caught.value.trailing_metadata() or ())
    assert "retry-after" not in trailing  # none of these is worth retrying unchanged


def test_health_and_methods_not_served(stub, server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "inference.GRPCInferenceService"):
            assert check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        # Triton's statistics method (not in kserve's proto: called by name, with an empty request)
        statistics = channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics")
        with pytest.raises(grpc.RpcError) as caught:
            statistics(b"")
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    response, call_ = stub.ModelInfer.with_call(call(PIXELS, raw=[DIGIT.tobytes()]),
                                                metadata=[("x-request-id", "grpc-test-1")])
    assert response.id == "grpc-test-1" and dict(call_.trailing_metadata())["x-request-id"] == "grpc-test-1"
    assert response.outputs[0].name == "probabilities" and len(response.raw_output_contents[0]) == 40


def test_the_calls_deadline_is_kept(stub, server, held):
    """A call's timeout ends it (DEADLINE_EXCEEDED), its dense job stops, and the server goes on."""
    images, labels = held
    page = synth_page(np.random.default_rng(4), images, labels, 1500, 1500, 20).image
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(call(tensor("image", "BYTES", [1]), raw=[length_prefixed(png(page))],
                             model="digit-detector"), timeout=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stub.ModelInfer(call(PIXELS, raw=[DIGIT.tobytes()]), timeout=30).outputs[0].name == "probabilities"


@pytest.fixture(scope="module")
def guarded(store, tmp_path_factory):
    """A server with an API key, two workers on one gRPC port (SO_REUSEPORT) and one call in flight
    per worker; warm-up made long enough (as conftest's) to watch grpc.health.v1 say NOT_SERVING."""
    srv = Server(store, tmp_path_factory.mktemp("glog") / "serve.log", warmup_rounds=120, workers=2,
                 api_keys="grpc-key", max_concurrency=1)
    seen = []
    try:
        # reconnect every 50 ms while the port is not open yet (gRPC's backoff starts at 1 s and grows)
        quick = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                 ("grpc.max_reconnect_backoff_ms", 50)]
        with grpc.insecure_channel(srv.grpc_target, options=quick) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while not seen or seen[-1] != "SERVING":
                try:
                    status = check(health_pb2.HealthCheckRequest(), timeout=1).status
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e  # not listening yet
                    assert srv.process.poll() is None, srv.log.read_text()[-3000:]
                    name = "no answer"
                if not seen or seen[-1] != name:
                    seen.append(name)
        srv.seen = seen
        srv.readiness()
        yield srv
    finally:
        srv.stop()


KEY = [("authorization", "Bearer grpc-key")]


def test_keys_health_and_admission(guarded, held):
    assert "NOT_SERVING" in guarded.seen and guarded.seen[-1] == "SERVING", guarded.seen
    live = kpb.ServerLiveRequest()
    with grpc.insecure_channel(guarded.grpc_target, options=UNLIMITED) as channel:
        stub = GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(live).live  # open, as are ServerReady and grpc.health.v1
        # this channel's worker may be another than the fixture's (each warms up on its own)
        while not stub.ServerReady(kpb.ServerReadyRequest()).ready:
            assert guarded.process.poll() is None
            threading.Event().wait(0.05)
        for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "grpc-key")]):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(call(PIXELS, raw=[DIGIT.tobytes()]), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "CONVSERVE_API_KEYS" in caught.value.details()
        with pytest.raises(grpc.RpcError, match="UNAUTHENTICATED"):
            stub.ModelMetadata(kpb.ModelMetadataRequest(name="lenet5"))
        assert stub.ModelInfer(call(PIXELS, raw=[DIGIT.tobytes()]), metadata=KEY).outputs

        # one channel is one connection, so one worker: with a page's dense job in flight there, the
        # worker's one slot is taken, and SIGTERM drains it, answered, while new calls are turned away
        images, labels = held
        page = synth_page(np.random.default_rng(5), images, labels, 2500, 2500, 30).image
        future = stub.ModelInfer.future(call(tensor("image", "BYTES", [1]), raw=[length_prefixed(png(page))],
                                             model="digit-detector"), metadata=KEY, timeout=120)
        busy = threading.Event()
        while not busy.is_set() and not future.done():
            try:
                stub.ModelInfer(call(PIXELS, raw=[DIGIT.tobytes()]), metadata=KEY)
                busy.wait(0.02)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert "CONVSERVE_MAX_CONCURRENCY" in e.details()
                assert int(dict(e.trailing_metadata())["retry-after"]) >= 1
                busy.set()
        assert busy.is_set(), "the dense call ended before a second call found the worker busy"
        os.killpg(guarded.process.pid, signal.SIGTERM)
        refused = None
        while refused is None and not future.done():
            try:
                stub.ModelInfer(call(PIXELS, raw=[DIGIT.tobytes()]), metadata=KEY, timeout=5)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # until SIGTERM is seen
                    refused = e
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE, refused
        scores = future.result()  # the call in flight was answered, not cut
        assert list(scores.outputs[0].shape) == [1, 11, (2500 - 28) // 4 + 1, (2500 - 28) // 4 + 1]
