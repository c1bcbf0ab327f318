"""The Open Inference Protocol (/v2) against a real `bentoml serve`, through the real clients: tritonclient
(binary mode, its default), the kserve SDK's REST client, JSON checked against the protocol's data
model as the kserve package ships it, and BentoML's own client on every endpoint."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import bentoml
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest import v2_datamodels as protocol
from PIL import Image
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from models.pages import synth_page


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as c:
        yield c


@pytest.fixture(scope="module")
def held(mnist):
    return mnist[1].images, mnist[1].labels  # (N, 28, 28) uint8, (N,)


def bytes_input(blobs: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(blobs), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_).reshape(-1, 1))
    return tensor


def test_tritonclient_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lenet5")
    server_meta = client.get_server_metadata()
    assert {"classification", "binary_tensor_data"} <= set(server_meta["extensions"])
    meta = client.get_model_metadata("lenet5")
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "pixels": "UINT8",
                                                                  "input": "FP32"}
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"probabilities": [-1, 10],
                                                                "scores": [-1, 10, -1, -1]}
    config = client.get_model_config("lenet5")
    assert config["max_batch_size"] >= 1
    assert {i["name"] for i in config["input"]} == {"image", "pixels", "input"}
    assert client.is_model_ready("lenet5", model_version=meta["versions"][0])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="version '7' is not served"):
        client.get_model_metadata("lenet5", model_version="7")


def test_tritonclient_labels_held_out_pngs(client, held):
    """Every held-out digit as a PNG in BYTES tensors, binary mode (tritonclient's default): ≥ 98 %."""
    images, labels = held
    predicted = []
    for start in range(0, len(images), 64):  # the server's per-request image limit
        result = client.infer("lenet5", [bytes_input([png(a) for a in images[start:start + 64]])])
        probabilities = result.as_numpy("probabilities")  # (n, 10)
        assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
        predicted.append(probabilities.argmax(1))
    accuracy = (np.concatenate(predicted) == labels).mean()
    assert accuracy >= 0.98, accuracy


def test_classification_extension(client, held):
    images, labels = held
    picks = np.arange(0, len(images), 97)[:8]
    blobs = [png(images[i]) for i in picks]
    result = client.infer("lenet5", [bytes_input(blobs)],
                          outputs=[triton.InferRequestedOutput("probabilities", class_count=3)])
    rows = result.as_numpy("probabilities")  # (8, 3) of b"value:index:label"
    assert rows.shape == (8, 3)
    plain = client.infer("lenet5", [bytes_input(blobs)]).as_numpy("probabilities")
    for row, probabilities in zip(rows, plain, strict=True):
        parsed = [entry.decode().split(":") for entry in row]
        values = [float(v) for v, _, _ in parsed]
        assert values == sorted(values, reverse=True)
        assert [int(i) for _, i, _ in parsed] == list(np.argsort(-probabilities)[:3])
        assert all(label == index for _, index, label in parsed)  # lenet5's labels are "0".."9"
        assert abs(values[0] - probabilities.max()) < 1e-5
    assert (np.array([int(r[0].decode().split(":")[1]) for r in rows]) == labels[picks]).mean() >= 0.875


def test_fp32_tensor_gives_classify_probabilities(client, server, held):
    """A client that preprocesses itself, from what /config says, gets /classify's numbers."""
    images, _ = held
    picks = images[:: len(images) // 12][:12]
    params = {k: v["string_value"] for k, v in client.get_model_config("lenet5")["parameters"].items()}
    scale, mean, std = (float(params["scale"]), json.loads(params["mean"])[0], json.loads(params["std"])[0])
    x = ((picks[:, None].astype(np.float32) * scale - mean) / std).astype(np.float32)  # (12, 1, 28, 28)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    ours = client.infer("lenet5", [tensor]).as_numpy("probabilities")
    files = [("image", (f"{i}.png", png(a))) for i, a in enumerate(picks)]
    answer = httpx.post(f"{server.url}/classify", files=files, data={"top_k": "10"}, timeout=30).json()
    for row, prediction in zip(ours, answer["predictions"], strict=True):
        for entry in prediction["top_k"]:
            assert abs(row[int(entry["label"])] - entry["probability"]) < 1e-4


def test_dense_model_returns_its_score_map(client, server, held):
    """The detector's infer on a page: the same map as /score_map's `scores`, from UINT8 pixels and
    from a PNG alike; versioned path included."""
    images, labels = held
    page = synth_page(np.random.default_rng(3), images, labels, 120, 160, 4).image  # (120, 160) uint8
    version = client.get_model_metadata("digit-detector")["versions"][0]
    pixels = triton.InferInput("pixels", [1, 1, *page.shape], "UINT8")
    pixels.set_data_from_numpy(page[None, None])
    by_pixels = client.infer("digit-detector", [pixels], model_version=version).as_numpy("scores")
    by_png = client.infer("digit-detector", [bytes_input([png(page)])]).as_numpy("scores")
    assert by_pixels.shape == (1, 11, (120 - 28) // 4 + 1, (160 - 28) // 4 + 1)
    answer = httpx.post(f"{server.url}/score_map", files={"image": ("p.png", png(page))},
                        data={"outputs": "scores"}, timeout=60).json()["scores"]
    reference = np.frombuffer(base64.b64decode(answer["data"]), "<f4").reshape(answer["shape"])
    assert np.allclose(by_pixels[0], reference, atol=1e-5) and np.allclose(by_png, by_pixels, atol=1e-6)
    with pytest.raises(InferenceServerException, match="per image"):
        client.infer("digit-detector", [pixels], outputs=[triton.InferRequestedOutput("probabilities")])


def test_kserve_rest_client(server, held):
    """kserve's InferenceRESTClient (v2): health, model readiness, infer in JSON and in binary. It has
    no metadata call; metadata is checked against kserve's data model in the next test."""
    images, labels = held
    x = images[:16:2][:, None]  # (8, 1, 28, 28) uint8

    async def talk():
        kserve = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            assert await kserve.is_server_live(server.url) and await kserve.is_server_ready(server.url)
            assert await kserve.is_model_ready(server.url, "lenet5")
            answers = []
            for binary in (False, True):
                tensor = InferInput("pixels", list(x.shape), "UINT8")
                tensor.set_data_from_numpy(x, binary_data=binary)
                request = InferRequest(model_name="lenet5", infer_inputs=[tensor], request_outputs=[
                    RequestedOutput("probabilities", {"binary_data": binary})])
                response = await kserve.infer(server.url, request, model_name="lenet5")
                answers.append(response.outputs[0].as_numpy())
            return answers
        finally:
            await kserve.close()

    as_json, as_binary = asyncio.run(talk())
    assert as_json.shape == (8, 10) and np.allclose(as_json, as_binary, atol=1e-6)
    assert (as_json.argmax(1) == labels[:16:2]).mean() >= 0.875


def test_json_follows_the_protocols_data_model(server, held):
    """Plain JSON requests and answers, validated with the pydantic models kserve ships for the v2 REST
    protocol (kserve/protocol/rest/v2_datamodels.py, from its rest_predict_v2.yaml)."""
    url = server.url
    protocol.ServerLiveResponse.model_validate(httpx.get(f"{url}/v2/health/live").json())
    protocol.ServerReadyResponse.model_validate(httpx.get(f"{url}/v2/health/ready").json())
    protocol.ServerMetadataResponse.model_validate(httpx.get(f"{url}/v2").json())
    for name in ("lenet5", "digit-detector"):
        meta = protocol.ModelMetadataResponse.model_validate(httpx.get(f"{url}/v2/models/{name}").json())
        assert meta.name == name and meta.inputs and meta.outputs
        protocol.ModelReadyResponse.model_validate(httpx.get(f"{url}/v2/models/{name}/ready").json())
    digit = held[0][0]
    request = protocol.InferenceRequest(id="req-1", inputs=[
        protocol.RequestInput(name="image", shape=[1], datatype="BYTES",
                              data=[base64.b64encode(png(digit)).decode()]),
    ], outputs=[protocol.RequestOutput(name="probabilities")])
    response = httpx.post(f"{url}/v2/models/lenet5/infer", content=request.model_dump_json(exclude_none=True),
                          headers={"Content-Type": "application/json"})
    answer = protocol.InferenceResponse.model_validate(response.json())
    assert answer.id == "req-1" and answer.outputs[0].shape == [1, 10]
    assert int(np.argmax(answer.outputs[0].data)) == held[1][0]
    nested = {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                          "data": digit[None, None].tolist()}]}  # nested data, and no Content-Type
    bare = httpx.post(f"{url}/v2/models/lenet5/infer", content=httpx.Request("POST", url, json=nested).read())
    assert bare.status_code == 200 and "id" in bare.json()  # the X-Request-ID when the request has none
    assert np.allclose(bare.json()["outputs"][0]["data"], answer.outputs[0].data, atol=1e-6)


def one_input(**tensor) -> bytes:
    return json.dumps({"inputs": [tensor]}).encode()


WHOLE_BODY = {"Inference-Header-Content-Length": "whole body"}  # replaced by the body's length
INFER = "/v2/models/lenet5/infer"


# (path, body, headers, status, fragment of the error); tests/test_same_answers.py sends them too
BAD_REQUESTS = [
    (INFER, b"{not json", {}, 400, "not JSON"),
    (INFER, b'{"inputs": []}', {}, 400, '"inputs"'),
    (INFER, one_input(name="pixels", shape=[1, 1, 28, 28], datatype="UINT8", data=[1, 2, 3]), {}, 400,
     "does not fit shape"),
    (INFER, one_input(name="pixels", shape=[1, 1, 4, 4], datatype="UINT8", data=[0] * 16), {}, 400,
     "at least 28"),
    (INFER, one_input(name="pixels", shape=[1, 1, 28, 28], datatype="FP32", data=[0] * 784), {}, 400,
     "takes UINT8"),
    (INFER, one_input(name="image", shape=[1], datatype="BYTES", data=["%%%"]), {}, 400, "not base64"),
    (INFER, one_input(name="image", shape=[1], datatype="BYTES", parameters={"binary_data_size": 9}),
     WHOLE_BODY, 400, "binary_data_size"),
    (INFER, one_input(name="x", shape=[1], datatype="FP32", data=[1]),
     {"Inference-Header-Content-Length": "999"}, 400, "Inference-Header-Content-Length"),
    ("/v2/models/nope/infer", b"{}", {}, 404, "unknown model"),
    ("/v2/models/lenet5/versions/0/infer", b"{}", {}, 404, "not served"),
    ("/v2/elsewhere", b"", {}, 404, "no route"),
]


@pytest.mark.parametrize("path, body, headers, status, fragment", BAD_REQUESTS)
def test_bad_requests_get_the_protocols_error_shape(server, path, body, headers, status, fragment):
    if headers is WHOLE_BODY:
        headers = {"Inference-Header-Content-Length": str(len(body))}
    response = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and fragment in response.json()["error"], response.text
    assert response.headers["x-request-id"]


def test_wrong_method_and_server_still_serves(server):
    response = httpx.get(f"{server.url}/v2/models/lenet5/infer")
    assert response.status_code == 405 and "takes POST" in response.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}


def test_bentoml_client_calls_every_endpoint(server, held, tmp_path):
    """BentoML's SyncHTTPClient knows the service from /schema.json: /classify included."""
    images, labels = held
    paths = []
    for i in (0, 300, 600):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(images[i]))
    page = synth_page(np.random.default_rng(5), images, labels, 100, 140, 3)
    (tmp_path / "page.png").write_bytes(png(page.image))
    with bentoml.SyncHTTPClient(server.url) as bento:
        assert bento.is_ready()
        answer = bento.classify(image=paths, model="lenet5", top_k=2)
        assert [p["filename"] for p in answer["predictions"]] == ["0.png", "300.png", "600.png"]
        best = [int(p["top_k"][0]["label"]) for p in answer["predictions"]]
        assert best == [labels[i] for i in (0, 300, 600)]
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
        assert bento.classify_base64(images_b64=encoded)["predictions"][2]["top_k"][0]["label"] == \
            str(labels[600])
        found = bento.score_map(image=tmp_path / "page.png", outputs="detections,argmax")
        assert found["model"] == "digit-detector" and len(found["argmax"]) == found["geometry"]["map_height"]
        with pytest.raises(bentoml.exceptions.NotFound, match="unknown model 'nope'"):
            bento.classify(image=paths[:1], model="nope")


def test_bytes_tensors_round_trip_and_refuse_cut_data():
    """Triton's BYTES serialization (4-byte little-endian length, then the bytes), without a server."""
    from service.errors import InvalidInput
    from service.fronts import v2_tensors

    items = [b"", b"\x00\xff", b"png" * 100]
    assert v2_tensors.split_bytes(v2_tensors.join_bytes(items), "x") == items
    theirs = serialize_byte_tensor(np.array(items, dtype=np.object_)).item()  # tritonclient's
    assert theirs == v2_tensors.join_bytes(items) and v2_tensors.split_bytes(theirs, "x") == items
    for cut in (b"\x05\x00\x00\x00abc", b"\x05\x00"):
        with pytest.raises(InvalidInput, match="BYTES element"):
            v2_tensors.split_bytes(cut, "x")
