"""gRPC ModelInfer against HTTP /v2 binary infer, on one convserve server, with identical tensors: which
front costs less per LeNet request? Rounds alternate (gRPC, HTTP, gRPC, …) so that a noisy phase of
the shared machine hits both sides.

    python -m bench.grpc_race [--rounds 5 --seconds 5 --concurrency 16]       (starts its own server)
    python -m bench.grpc_race --http http://127.0.0.1:3000 --grpc 127.0.0.1:8001   (a running one)

Payloads, each request one held-out digit (64 of them, cycled): `FP32` the normalized [1, 1, 28, 28]
tensor (as /v2/models/lenet5/config says to make it), `BYTES` its PNG; the answer asked for is
`probabilities`, binary on HTTP, raw on gRPC (each protocol's cheapest form).

The clients, equally cheap on both sides so that the comparison is of the servers: one asyncio loop in
this process, `--concurrency` callers per side, each request encoded once before the race and every
answer decoded into numpy and checked. gRPC: grpc.aio on one channel (one HTTP/2 connection; C-core
does the framing), requests passed as serialized bytes. HTTP: one keep-alive HTTP/1.1 connection per
caller on asyncio streams, the request's bytes written as they are, the answer read by Content-Length.
wrk (loadtest/wrk.py) would be cheaper on the HTTP side but has no gRPC counterpart here, and a C
client against a Python one would measure the clients. Both clients still cost CPU on the machine the
server runs on: each row reports the client's CPU per request, so the reader sees what it took.

Reported per payload and side: requests/s (median of the rounds, and their min–max), p50 and p99 of
latency over every request of every round, errors, and CPU per request of the client (this process)
and of the server (its process tree; only when this script started it): the server's CPU per request
is the comparison that the client's cost does not blur. Loopback only.

PyTriton (or Triton) over gRPC: `versus_peer` races convserve's gRPC front against any server of the
protocol (make bench does, against PyTriton: bench/peers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import statistics
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from loadtest import samples
from loadtest.run import loopback
from loadtest.servers import Server
from service.fronts.triton_proto import grpc_service_pb2 as pb


@dataclass
class Round:
    side: str
    requests: int
    errors: int
    seconds: float
    cpu_s: float  # this process's CPU (user + system) over the round: the client's cost
    latencies: list[float]
    server_cpu_s: float = 0.0  # the server's processes' CPU over the round (when this started it)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


SERVER_PID: int | None = None  # the server this run started: its CPU per request is the fair measure


def server_cpu() -> float:
    """CPU seconds used so far by the server's process tree (the arbiter and its workers)."""
    if SERVER_PID is None:
        return 0.0
    import psutil

    root = psutil.Process(SERVER_PID)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


Tensors = list[tuple[str, str, np.ndarray | bytes]]  # (input name, datatype, array or PNG bytes)


def infer_requests(model: str, tensors: Tensors, output: str) -> list[bytes]:
    """Serialized ModelInferRequests, one per (input name, datatype, array or PNG bytes), raw contents."""
    out = []
    for name, datatype, data in tensors:
        request = pb.ModelInferRequest(model_name=model)
        shape = [1] if datatype == "BYTES" else list(data.shape)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.outputs.add(name=output)
        blob = struct.pack("<I", len(data)) + data if datatype == "BYTES" else data.astype("<f4").tobytes()
        request.raw_input_contents.append(blob)
        out.append(request.SerializeToString())
    return out


def http_requests(host: str, model: str, tensors: Tensors, output: str) -> list[bytes]:
    """Whole HTTP/1.1 requests (head and body) of /v2 binary infer, tritonclient's layout."""
    out = []
    for name, datatype, data in tensors:
        blob = struct.pack("<I", len(data)) + data if datatype == "BYTES" else data.astype("<f4").tobytes()
        shape = [1] if datatype == "BYTES" else list(data.shape)
        head = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                       "parameters": {"binary_data_size": len(blob)}}],
                           "outputs": [{"name": output, "parameters": {"binary_data": True}}]}).encode()
        body = head + blob
        out.append(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\n"
                   f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(head)}"
                   f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


async def race(side: str, caller, requests: list[bytes], concurrency: int, seconds: float) -> Round:
    """`concurrency` callers, each sending the next request as soon as its last is answered."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one(worker: int) -> None:
        nonlocal errors
        call = await caller()
        i = worker
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            ok = await call(requests[i % len(requests)])
            latencies.append(time.perf_counter() - started)
            errors += not ok
            i += concurrency

    started, cpu_before, server_before = time.perf_counter(), cpu(), server_cpu()
    await asyncio.gather(*(one(w) for w in range(concurrency)))
    return Round(side, len(latencies), errors, time.perf_counter() - started, cpu() - cpu_before, latencies,
                 server_cpu() - server_before)


async def grpc_round(target: str, requests: list[bytes], concurrency: int, seconds: float,
                     side: str = "gRPC") -> Round:
    """One round of ModelInfer calls on one channel; any server of the protocol (convserve, PyTriton,
    Triton) at `target` ("127.0.0.1:<port>"). Each answer is parsed and its first output decoded."""
    import grpc

    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as ch:
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        await infer(requests[0], timeout=30)  # connected and warm before the clock starts

        async def caller():
            async def call(request: bytes) -> bool:
                try:
                    answer = pb.ModelInferResponse.FromString(await infer(request, timeout=30))
                except grpc.RpcError:
                    return False
                return np.frombuffer(answer.raw_output_contents[0], "<f4").size == 10
            return call

        return await race(side, caller, requests, concurrency, seconds)


async def http_round(host: str, port: int, requests: list[bytes], concurrency: int, seconds: float) -> Round:
    async def caller():
        reader, writer = await asyncio.open_connection(host, port)

        async def call(request: bytes) -> bool:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:-2])
            body = await reader.readexactly(int(fields[b"content-length"]))
            if not head.startswith(b"HTTP/1.1 200"):
                return False
            split = int(fields[b"inference-header-content-length"])
            json.loads(body[:split])
            return np.frombuffer(body[split:], "<f4").size == 10
        return call

    return await race("HTTP", caller, requests, concurrency, seconds)


def summary(rounds: list[Round]) -> dict:
    rates = [r.rate for r in rounds]
    latencies = np.concatenate([r.latencies for r in rounds]) * 1000
    requests = sum(r.requests for r in rounds)
    return {"req_s": round(statistics.median(rates)), "req_s_min": round(min(rates)),
            "req_s_max": round(max(rates)), "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2), "errors": sum(r.errors for r in rounds),
            "client_cpu_us_per_request": round(sum(r.cpu_s for r in rounds) / max(requests, 1) * 1e6),
            "server_cpu_us_per_request": round(sum(r.server_cpu_s for r in rounds) / max(requests, 1) * 1e6)}


def normalization(http_url: str) -> tuple[float, float, float]:
    """(scale, mean, std) of convserve's LeNet, from its /v2 config: x = (pixel·scale − mean) / std."""
    config = httpx.get(f"{http_url}/v2/models/lenet5/config", timeout=30).json()
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    return float(params["scale"]), json.loads(params["mean"])[0], json.loads(params["std"])[0]


def payloads(scale: float, mean: float, std: float) -> dict[str, Tensors]:
    """64 held-out digits as normalized FP32 tensors (`input`) and as PNGs (`image`)."""
    digits = [png for png, _ in samples.digits(64)]
    pixels = [np.asarray(Image.open(io.BytesIO(png)), np.float32)[None, None] for png in digits]
    fp32 = [("input", "FP32", ((x * scale - mean) / std).astype(np.float32)) for x in pixels]
    return {"FP32 [1,1,28,28]": fp32, "BYTES PNG": [("image", "BYTES", png) for png in digits]}


async def compare(http_url: str, grpc_target: str, rounds: int, seconds: float, concurrency: int) -> dict:
    host, port = http_url.removeprefix("http://").rsplit(":", 1)
    rows = {}
    for kind, tensors in payloads(*normalization(http_url)).items():
        grpc_requests = infer_requests("lenet5", tensors, "probabilities")
        posts = http_requests(f"{host}:{port}", "lenet5", tensors, "probabilities")
        await http_round(host, int(port), posts, concurrency, 1)  # warm both before the first round
        sides: dict[str, list[Round]] = {"gRPC": [], "HTTP": []}
        for _ in range(rounds):
            sides["gRPC"].append(await grpc_round(grpc_target, grpc_requests, concurrency, seconds))
            sides["HTTP"].append(await http_round(host, int(port), posts, concurrency, seconds))
        rows[kind] = {side: summary(rs) for side, rs in sides.items()}
        print(kind, json.dumps(rows[kind]), flush=True)
    return rows


async def versus_peer(convserve_url: str, convserve_target: str, peer_target: str, input_name: str,
                      rounds: int, seconds: float, concurrency: int = 16) -> dict:
    """convserve's gRPC front against a peer's (PyTriton's) on the FP32 digits of compare(), rounds
    alternating: the peer's model `lenet5` takes `input_name` ([1, 1, 28, 28] FP32, normalized as
    convserve's LeNet, whose config is read from `convserve_url`) and answers `probabilities`. With the
    same input name the two sides get byte-identical requests."""
    fp32 = payloads(*normalization(convserve_url))["FP32 [1,1,28,28]"]
    ours = infer_requests("lenet5", fp32, "probabilities")
    theirs = infer_requests("lenet5", [(input_name, datatype, x) for _, datatype, x in fp32], "probabilities")
    sides: dict[str, list[Round]] = {"convserve gRPC": [], "PyTriton gRPC": []}
    await grpc_round(peer_target, theirs, concurrency, 1, "PyTriton gRPC")  # warm both first
    await grpc_round(convserve_target, ours, concurrency, 1)
    for _ in range(rounds):
        sides["convserve gRPC"].append(await grpc_round(convserve_target, ours, concurrency, seconds))
        sides["PyTriton gRPC"].append(await grpc_round(peer_target, theirs, concurrency, seconds,
                                                       "PyTriton gRPC"))
    rows = {side: summary(rs) for side, rs in sides.items()}
    rows["identical_requests"] = ours == theirs
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--http", help="a running convserve's URL (else one is started from bentomodels/)")
    p.add_argument("--grpc", help="its gRPC target, host:port")
    p.add_argument("--out", type=Path, help="write the rows as JSON here too")
    args = p.parse_args(argv)
    if args.http:
        if not (args.grpc and loopback(args.http) and loopback(f"grpc://{args.grpc}")):
            raise SystemExit("--http and --grpc must both be given, on 127.0.0.1 or localhost")
        rows = asyncio.run(compare(args.http, args.grpc, args.rounds, args.seconds, args.concurrency))
    else:
        from bench.versus import shipped_store

        with tempfile.TemporaryDirectory() as tmp:
            home = shipped_store(Path(tmp) / "bentoml")
            with Server(home, Path(tmp) / "serve.log", models="lenet5") as server:
                global SERVER_PID
                SERVER_PID = server.process.pid
                rows = asyncio.run(compare(server.url, server.grpc_target, args.rounds, args.seconds,
                                           args.concurrency))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
