"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, Triton's and KServe's
service): the servicer, which translates its messages to the data plane and back. What /v2 over HTTP
answers, this answers (fronts/kserve_v2.py does the work for both: find_model, metadata, config,
infer; fronts/v2_tensors.py checks every tensor for both); the lifecycle, keys, admission, deadlines
and the table from domain errors to gRPC status codes are fronts/grpc_server.py's.

    ServerLive, ServerReady, ModelReady          health (ready: warmed and not draining)
    ServerMetadata, ModelMetadata, ModelConfig   as GET /v2, /v2/models/{m}, /v2/models/{m}/config
    ModelInfer                                   as POST /v2/models/{m}/infer

A ModelInfer input arrives either typed (`contents.fp32_contents`, `bytes_contents`, …) or raw: one
`raw_input_contents` entry per input, in Triton's binary layout (little-endian, row-major; BYTES
elements length-prefixed), which is what tritonclient and kserve send. Outputs always go back raw
(`raw_output_contents`), as Triton answers: both clients read them. The classification extension is
an output parameter, `classification` (tritonclient's class_count): BYTES "value:index:label".
The other methods of the service (streaming, statistics, repository, shared memory, trace, logs)
answer UNIMPLEMENTED, the generated servicer's default.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import json_format

from service.errors import InvalidInput
from service.fronts import kserve_v2
from service.fronts import v2_tensors as tensors
from service.fronts.asgi import REQUEST_ID, PlaneHandle
from service.fronts.triton_proto import grpc_service_pb2 as pb
from service.fronts.triton_proto import grpc_service_pb2_grpc as pb_grpc
from service.fronts.triton_proto import model_config_pb2

# Typed contents: which repeated field of InferTensorContents carries each datatype (the protocol's
# table; FP16 has none and must come raw).
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
            "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """One per worker, around the worker's data plane (the handle every front gets)."""

    def __init__(self, plane: PlaneHandle, settings) -> None:
        self.plane, self.settings = plane, settings

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:  # noqa: N802 - the protocol's
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.plane().ready)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:  # noqa: N802
        plane = self.plane()
        kserve_v2.find_model(plane, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=plane.ready)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:  # noqa: N802
        return pb.ServerMetadataResponse(name="convserve", version=kserve_v2.SERVER_VERSION,
                                         extensions=["classification", "model_configuration"])

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:  # noqa: N802
        card = kserve_v2.find_model(self.plane(), request.name, request.version or None)
        return json_format.ParseDict(kserve_v2.metadata(card), pb.ModelMetadataResponse())

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:  # noqa: N802
        card = kserve_v2.find_model(self.plane(), request.name, request.version or None)
        config = kserve_v2.config(card, self.settings)
        # Triton numbers versions (int64); a store version is a name, so the policy says "the latest
        # one", which is the one served (ModelMetadata.versions names it).
        config["version_policy"] = {"latest": {"num_versions": 1}}
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:  # noqa: N802
        plane = self.plane()
        card = kserve_v2.find_model(plane, request.model_name, request.model_version or None)
        parsed = to_request(request, self.settings.max_images)
        # A dense job ends at its next tile when its call is cancelled (deadline, client gone):
        # grpc cancels this coroutine then, and Dataplane.run_dense sets the job's stop.
        outputs = await kserve_v2.infer(plane, card, parsed)
        rid = parsed.id if parsed.id is not None else REQUEST_ID.get()
        return to_response(card.name, card.version, rid, outputs)


def to_request(message: pb.ModelInferRequest, max_bytes_elements: int) -> tensors.Request:
    """A ModelInferRequest as the protocol's Request, every tensor checked as /v2 checks it
    (v2_tensors.check_tensor, from_buffer) before any is built."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(f"{len(message.inputs)} inputs and {len(raw)} raw_input_contents: send one "
                           f"raw_input_contents entry per input, in input order, or none")
    if not message.inputs:
        raise InvalidInput("the request needs inputs: one of name, datatype, shape and contents")
    tensors.check_outputs([o.name for o in message.outputs])
    inputs = []
    for i, tensor in enumerate(message.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        count = tensors.check_tensor(name, datatype, shape, max_bytes_elements)
        typed = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
        if raw:
            if typed:
                raise InvalidInput(f"input {name!r} has both contents and raw_input_contents: send one")
            data = tensors.from_buffer(name, datatype, shape, count, raw[i],
                                       f"raw_input_contents[{i}] has {len(raw[i])}")
        else:
            data = from_contents(name, datatype, shape, count, tensor.contents)
        inputs.append(tensors.Tensor(name, datatype, shape, data, parameters(tensor.parameters),
                                     binary=True))
    outputs = [{"name": o.name, "parameters": parameters(o.parameters)} for o in message.outputs]
    return tensors.Request(inputs, outputs, parameters(message.parameters), message.id or None)


def from_contents(name: str, datatype: str, shape: list[int], count: int,
                  contents: pb.InferTensorContents) -> np.ndarray | list[bytes]:
    """Typed contents: the count checked against the shape before an array is built."""
    field = CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: {datatype} has no typed contents; send it in "
                           f"raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: shape {shape} holds {count} elements, "
                           f"contents.{field} has {len(values)}")
    if datatype == "BYTES":
        return list(values)
    try:
        return np.asarray(values, dtype=tensors.DTYPES[datatype]).reshape(shape)
    except OverflowError:
        raise InvalidInput(f"input {name!r}: a value in contents.{field} does not fit {datatype}") from None


def parameters(message_map) -> dict:
    """InferParameter map → plain values (bool, int, float or str), as /v2's JSON has them."""
    out = {}
    for key, parameter in message_map.items():
        kind = parameter.WhichOneof("parameter_choice")
        out[key] = None if kind is None else getattr(parameter, kind)
    return out


def to_response(model: str, version: str, rid: str,
                outputs: list[tensors.Output]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=rid)
    for out in outputs:
        if isinstance(out.data, list):
            datatype, blob = "BYTES", tensors.join_bytes(out.data)
        else:
            datatype = tensors.dtype_name(out.data.dtype)
            blob = np.ascontiguousarray(out.data, out.data.dtype.newbyteorder("<")).tobytes()
        response.outputs.add(name=out.name, datatype=datatype, shape=out.shape)
        response.raw_output_contents.append(blob)
    return response
