"""Tensors of the Open Inference Protocol (KServe v2 / Triton HTTP) in and out of HTTP bodies: JSON
and Triton's binary tensor data extension. numpy only; the front that uses it is fronts/kserve_v2.py.

    body = JSON header [+ binary tensors, in input order]   (header length: Inference-Header-Content-Length)
    BYTES element = 4-byte little-endian length + the bytes

Written by hand: the codecs that exist live in client packages (tritonclient) or in KServe's server
(FastAPI, gRPC, Kubernetes client), and the serving image stays free of both. The format is small and
fully specified: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md

The checks on a tensor (check_tensor: datatype, shape, counts; from_buffer: bytes against the shape)
are the protocol's, not HTTP's: the gRPC front (fronts/grpc_v2.py) runs the same ones on its messages.
They raise domain errors (service/errors.py), which each front maps with its own table.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from service.errors import InvalidInput, TooLarge
from service.fronts.asgi import is_length

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
          "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
HEADER_LENGTH = "inference-header-content-length"


def bad(message: str) -> InvalidInput:
    return InvalidInput(message)


@dataclass
class Tensor:
    """One input: a numpy array, or for BYTES a list of byte strings (N elements, any shape)."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    parameters: dict = field(default_factory=dict)
    binary: bool = False  # sent after the JSON header (else in it: BYTES then hold base64 text)


@dataclass
class Request:
    inputs: list[Tensor]
    outputs: list[dict]  # [{"name": …, "parameters": {…}}]; empty: the model's default outputs
    parameters: dict
    id: str | None


# Dimensions and elements a tensor may declare, checked before anything is built: a shape's product in
# Python integers (numpy's int64 wrapped [2^32, 2^32, 1, 1] to 0 and the reshape failed as a 500).
MAX_DIM = 2**31 - 1
MAX_OUTPUTS = 2  # `probabilities` and the score map: each once


def parse_request(body: bytes, header_length: str | None, max_bytes_elements: int) -> Request:
    """The infer request body → Request, checking every shape against its data, and every count
    before building: outputs (at most two, no name twice), BYTES elements (TooLarge past
    max_bytes_elements, before any is split or decoded), JSON depth (InvalidInput, not a
    RecursionError)."""
    if header_length is None:
        head, rest = body, b""
    else:
        if not is_length(header_length) or int(header_length) > len(body):
            raise bad(f"Inference-Header-Content-Length: {header_length!r} is not a length within the "
                      f"{len(body)}-byte body")
        head, rest = body[: int(header_length)], body[int(header_length):]
    try:
        request = json.loads(head)
    except RecursionError:
        raise bad("the request's JSON is nested too deep; a tensor is a flat or [N, C, H, W] list") from None
    except ValueError as e:
        raise bad(f"the request is not JSON ({e}); send the inference request of the Open Inference "
                  f"Protocol, with binary tensors after it and Inference-Header-Content-Length") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise bad('the request needs "inputs": a list of {"name", "shape", "datatype", "data"}')
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise bad('"outputs" must be a list of {"name": …, "parameters": {…}}')
    check_outputs([o["name"] for o in outputs])
    offset, inputs = 0, []
    for raw in request["inputs"]:
        tensor, offset = parse_input(raw, rest, offset, max_bytes_elements)
        inputs.append(tensor)
    if offset != len(rest):
        raise bad(f"{len(rest) - offset} bytes of binary data after the header belong to no input; "
                  f"check each input's binary_data_size")
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad('"parameters" must be an object')
    rid = request.get("id")
    return Request(inputs, outputs, parameters, None if rid is None else str(rid))


def check_outputs(names: list[str]) -> None:
    if len(names) > MAX_OUTPUTS or len(set(names)) < len(names):
        raise bad(f"outputs {names}: ask for each output once, at most {MAX_OUTPUTS} of them")


def check_tensor(name: str, datatype: object, shape: object, max_bytes_elements: int) -> int:
    """A declared tensor's datatype and shape, checked before any of its data is touched; returns its
    element count (a Python integer: numpy's int64 wraps [2^32, 2^32, 1, 1] to 0)."""
    if datatype != "BYTES" and datatype not in DTYPES:
        raise bad(f"input {name!r}: unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"input {name!r}: shape must be a list of non-negative integers")
    if len(shape) > 8 or not all(not isinstance(d, bool) and d <= MAX_DIM for d in shape):
        raise bad(f"input {name!r}: shape must be a list of at most 8 integers from 0 to {MAX_DIM}")
    count = math.prod(shape)
    if datatype == "BYTES" and count > max_bytes_elements:
        raise TooLarge(f"input {name!r}: {count} images in one request, over the limit of "
                       f"{max_bytes_elements}; split the request", "too_many_images")
    return count


def from_buffer(name: str, datatype: str, shape: list[int], count: int, chunk: bytes,
                sent: str) -> np.ndarray | list[bytes]:
    """A tensor's data from its bytes (Triton's binary layout: little-endian, row-major; BYTES
    length-prefixed), the size checked against the shape before anything is built. `sent` says where
    the size came from, for the message (e.g. "binary_data_size says 12")."""
    if datatype == "BYTES":
        return check_elements(name, shape, count, split_bytes(chunk, name, count))
    itemsize = np.dtype(DTYPES[datatype]).itemsize
    if len(chunk) != count * itemsize:
        raise bad(f"input {name!r}: shape {shape} of {datatype} is {count * itemsize} bytes, {sent}")
    return np.frombuffer(chunk, np.dtype(DTYPES[datatype]).newbyteorder("<")).reshape(shape)


def check_elements(name: str, shape: list[int], count: int, data: list[bytes]) -> list[bytes]:
    if len(data) != count:
        raise bad(f"input {name!r}: shape {shape} holds {count} elements, the data has {len(data)}")
    return data


def parse_input(raw: object, binary: bytes, offset: int, max_bytes_elements: int) -> tuple[Tensor, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise bad('each input needs "name", "shape", "datatype" and "data" (or binary_data_size)')
    name, datatype, shape = raw["name"], raw.get("datatype"), raw.get("shape")
    count = check_tensor(name, datatype, shape, max_bytes_elements)
    parameters = raw.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise bad(f"input {name!r}: binary_data_size {size!r} runs past the body's binary part")
        chunk, offset = binary[offset: offset + size], offset + size
        data = from_buffer(name, datatype, shape, count, chunk, f"binary_data_size says {size}")
    elif "data" in raw:
        try:
            data = json_data(raw["data"], datatype, shape, name)
        except RecursionError:
            raise bad(f"input {name!r}: data nested deeper than its shape") from None
        if datatype == "BYTES":
            check_elements(name, shape, count, data)
    else:
        raise bad(f"input {name!r} has neither data nor binary_data_size")
    return Tensor(name, datatype, shape, data, parameters if isinstance(parameters, dict) else {},
                  size is not None), offset


def json_data(data: object, datatype: str, shape: list[int], name: str) -> np.ndarray | list[bytes]:
    """JSON tensor data, nested or flat, row-major. BYTES elements are strings: base64 for binary
    content such as encoded images (JSON strings cannot hold arbitrary bytes)."""
    if datatype == "BYTES":
        flat = list(flatten(data))
        if not all(isinstance(s, str) for s in flat):
            raise bad(f"input {name!r}: BYTES data must be strings (base64 for images)")
        return [s.encode() for s in flat]
    try:
        array = np.asarray(data, dtype=DTYPES[datatype])
        return array.reshape(shape)
    except (ValueError, TypeError, OverflowError):
        raise bad(f"input {name!r}: data does not fit shape {shape} as {datatype}") from None


def flatten(data: object):
    if isinstance(data, list):
        for item in data:
            yield from flatten(item)
    else:
        yield data


def split_bytes(chunk: bytes, name: str, most: int | None = None) -> list[bytes]:
    """Triton's serialized BYTES tensor: each element a uint32 little-endian length, then its bytes.
    Stops at `most` + 1 elements: more than the shape says is an error, found without building them
    all (32 MB of empty elements would be 8 M of them)."""
    out, i = [], 0
    while i < len(chunk):
        if most is not None and len(out) > most:
            raise bad(f"input {name!r}: more BYTES elements than its shape holds ({most})")
        if i + 4 > len(chunk):
            raise bad(f"input {name!r}: a BYTES element's 4-byte length prefix is cut off")
        (n,) = struct.unpack_from("<I", chunk, i)
        if i + 4 + n > len(chunk):
            raise bad(f"input {name!r}: a BYTES element says {n} bytes, fewer are left")
        out.append(chunk[i + 4: i + 4 + n])
        i += 4 + n
    return out


def join_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


@dataclass
class Output:
    name: str
    data: np.ndarray | list[bytes]  # BYTES: a flat list, row-major
    shape: list[int]
    binary: bool


def encode_response(model: str, version: str, rid: str,
                    outputs: list[Output]) -> tuple[bytes, dict[str, str]]:
    """The infer response body and its headers: JSON, plus binary tensors after it for the outputs
    asked for in binary (then Inference-Header-Content-Length says where the JSON ends)."""
    described, blobs = [], []
    for out in outputs:
        datatype = "BYTES" if isinstance(out.data, list) else dtype_name(out.data.dtype)
        entry = {"name": out.name, "datatype": datatype, "shape": out.shape}
        if out.binary:
            blob = join_bytes(out.data) if datatype == "BYTES" else \
                np.ascontiguousarray(out.data, out.data.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [b.decode() for b in out.data] if datatype == "BYTES" else \
                out.data.ravel().tolist()
        described.append(entry)
    header = {"model_name": model, "model_version": version, "id": rid, "outputs": described}
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream",
                                    HEADER_LENGTH: str(len(head))}


def dtype_name(dtype: np.dtype) -> str:
    return next(name for name, t in DTYPES.items() if np.dtype(t) == dtype)
