"""tritonclient.grpc, called in a process of its own (tests/test_grpc.py).

Why a process: tritonclient.grpc and kserve (imported by tests/test_v2.py, and by test_grpc.py for
kserve's InferenceGRPCClient) each register the protocol's messages (inference.ModelInferRequest, …)
in protobuf's one pool per process, and the second to load fails with "duplicate symbol". A spawned
worker imports tritonclient.grpc alone; the tests send it plain values (names, numpy arrays) and get
plain values back. The calls themselves are tritonclient's, unchanged.
"""

from __future__ import annotations

import multiprocessing

import numpy as np

_clients: dict = {}


class TritonError(Exception):
    """An InferenceServerException, carried back: its gRPC status name and message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


def _client(target: str):
    import tritonclient.grpc as tg  # only ever in the worker process

    if target not in _clients:
        _clients[target] = tg.InferenceServerClient(target)
    return _clients[target]


def _call(target: str, method: str, args: tuple, kwargs: dict):
    from tritonclient.utils import InferenceServerException

    try:
        return "ok", getattr(_client(target), method)(*args, **kwargs)
    except InferenceServerException as e:
        return "error", str(e.status()), e.message()


def _infer(target: str, model: str, inputs: list[tuple[str, str, np.ndarray]],
           outputs: list[tuple[str, int]] | None, kwargs: dict):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    tensors = []
    for name, datatype, array in inputs:
        tensors.append(tg.InferInput(name, list(array.shape), datatype))
        tensors[-1].set_data_from_numpy(array)
    wanted = None if outputs is None else [tg.InferRequestedOutput(n, class_count=k) for n, k in outputs]
    try:
        result = _client(target).infer(model, tensors, outputs=wanted, **kwargs)
    except InferenceServerException as e:
        return "error", str(e.status()), e.message()
    names = [o["name"] for o in result.get_response(as_json=True)["outputs"]]
    return "ok", {n: result.as_numpy(n) for n in names}


class TritonGrpc:
    """tritonclient.grpc.InferenceServerClient(target), in a spawned worker: `client.is_server_live()`,
    `client.get_model_metadata("lenet5", as_json=True)`, `client.infer(model, [(name, datatype,
    array)], outputs=[(name, class_count)])` → {output name: array}. Errors raise TritonError."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.pool = multiprocessing.get_context("spawn").Pool(1)

    def _unwrap(self, answer):
        if answer[0] == "error":
            raise TritonError(answer[1], answer[2])
        return answer[1]

    def infer(self, model: str, inputs, outputs=None, **kwargs) -> dict[str, np.ndarray]:
        return self._unwrap(self.pool.apply(_infer, (self.target, model, inputs, outputs, kwargs)))

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self._unwrap(self.pool.apply(_call, (self.target, method, args,
                                                                            kwargs)))

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
