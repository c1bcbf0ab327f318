"""Drive a convserve (or baseline) server on this machine with wrk, a cheap load generator, and return
throughput, latency and failures.

    python -m loadtest.wrk --host http://127.0.0.1:3000 --path /classify --seconds 10 --connections 32

Why: locust costs ~150 µs of CPU per request, on the same 2 cores as the server it measures; wrk (C,
epoll) costs ~10 µs. Each request is one of a few prepared bodies, cycled by loadtest/multipart.lua,
which also counts every answer that is not 2xx (wrk itself only counts >= 400): multipart/form-data
(field `image`, a PNG or JPEG file, plus any extra form fields), or with `--protocol v2` an Open
Inference Protocol infer request as tritonclient sends it (the file as a binary BYTES tensor). Bounded
in time; only loopback hosts are accepted, exactly as in loadtest.run. Needs Debian's `wrk`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest.run import MAX_SECONDS, loopback

SCRIPT = Path(__file__).with_name("multipart.lua")
MAX_CONNECTIONS = 1024
MARK = "convserve-wrk "  # the line multipart.lua's done() prints


def media(data: bytes) -> tuple[str, str]:
    """(filename, content type) for a file's bytes."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image.png", "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image.jpg", "image/jpeg"
    return "image.bin", "application/octet-stream"


def multipart(data: bytes, fields: dict[str, str], boundary: str) -> bytes:
    """One multipart/form-data body: the extra fields, then `data` as the file field `image`."""
    filename, content_type = media(data)
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"'
                 f"\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


Spec = tuple[str, str, list[int]]  # a tensor input: (name, datatype, shape)


def v2_bodies(files: list[bytes], tensor: Spec | None = None) -> tuple[list[bytes], str]:
    """Open Inference Protocol infer bodies with binary outputs (tritonclient's default), and their
    shared Inference-Header-Content-Length: the JSON headers are padded with spaces (valid JSON) to one
    length, since wrk sends one set of headers. Each of `files` is one binary BYTES tensor `image` [1, 1]
    (a PNG or JPEG file); with `tensor` = (name, datatype, shape) each is that tensor's raw little-endian
    bytes instead (e.g. ("input", "FP32", [1, 1, 28, 28]): normalized pixels, as Triton takes them)."""
    def head(data: bytes) -> dict:
        if tensor is None:
            return {"name": "image", "shape": [1, 1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(data)}}
        name, datatype, shape = tensor
        return {"name": name, "shape": shape, "datatype": datatype,
                "parameters": {"binary_data_size": len(data)}}

    heads = [json.dumps({"inputs": [head(data)], "parameters": {"binary_data_output": True}}).encode()
             for data in files]
    length = max(map(len, heads))
    prefix = (lambda data: len(data).to_bytes(4, "little")) if tensor is None else (lambda data: b"")
    bodies = [h.ljust(length) + prefix(data) + data for h, data in zip(heads, files, strict=True)]
    return bodies, f"Inference-Header-Content-Length: {length}"


def run(url: str, path: str, bodies: list[bytes], seconds: int, connections: int, threads: int = 1,
        fields: dict[str, str] | None = None, out: Path | None = None, protocol: str = "multipart",
        headers: dict[str, str] | None = None, tensor: Spec | None = None,
        boundary: str | None = None) -> dict:
    """POST `bodies` (the raw files, cycled) to url+path for `seconds` over `connections` keep-alive
    connections, as multipart forms or (protocol="v2") Open Inference Protocol infer requests (`tensor`:
    see v2_bodies). Latencies in ms; socket_errors counts connect/read/write errors and timeouts;
    bodies_sha256: one digest of every body sent and the headers (equal digests: identical requests)."""
    if not loopback(url):
        raise SystemExit(f"error: {url} is not a loopback address; load tests only target this machine")
    if not 1 <= seconds <= MAX_SECONDS:
        raise SystemExit(f"error: --seconds must be 1..{MAX_SECONDS}")
    if not 1 <= threads <= connections <= MAX_CONNECTIONS:
        raise SystemExit(f"error: need 1 <= threads <= connections <= {MAX_CONNECTIONS}")
    if not bodies:
        raise SystemExit("error: no request bodies")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: apt-get install wrk (Debian/Ubuntu)")
    boundary = boundary or "convserve" + secrets.token_hex(12)  # a fixed one: identical bodies each run
    while any(boundary.encode() in b for b in bodies):
        boundary = "convserve" + secrets.token_hex(12)
    extra = [f"{k}: {v}" for k, v in (headers or {}).items()]  # e.g. Authorization
    if protocol == "v2":
        prepared, length = v2_bodies(bodies, tensor)
        headers = ["application/octet-stream", length, *extra]
    else:
        prepared = [multipart(data, fields or {}, boundary) for data in bodies]
        headers = [f"multipart/form-data; boundary={boundary}", *extra]
    with tempfile.TemporaryDirectory(prefix="wrk-") as scratch:
        folder = out or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for i, body in enumerate(prepared, 1):
            (folder / f"body-{i}.bin").write_bytes(body)
        command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
                   "-s", str(SCRIPT), url.rstrip("/") + path, "--", str(folder), *headers]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
        if out is not None:
            (out / "wrk.log").write_text(done.stdout + done.stderr)
    line = next((s for s in done.stdout.splitlines() if s.startswith(MARK)), None)
    if done.returncode or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {' '.join(command)}\n"
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    r = json.loads(line[len(MARK):])
    return {"rps": round(r["requests"] / (r["duration_us"] / 1e6), 1), "requests": r["requests"],
            **{f"{k}_ms": round(r[f"{k}_us"] / 1000, 2) for k in ("p50", "p90", "p99", "max")},
            "non_2xx": r["non_2xx"],
            "socket_errors": {k: r[k] for k in ("connect", "read", "write", "timeout")},
            "connections": connections, "seconds": seconds, "bodies_sha256": digest(prepared, headers)}


def digest(bodies: list[bytes], headers: list[str]) -> str:
    h = hashlib.sha256()
    for part in [*bodies, *(s.encode() for s in headers)]:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.wrk", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="http://127.0.0.1:3000")
    p.add_argument("--path", default="/classify")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bodies", choices=["digits", "photos"], default="digits",
                   help="50 held-out digit PNGs, or 32 224×224 photo JPEGs")
    p.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                   help="extra form field, e.g. model=alexnet (repeatable)")
    p.add_argument("--protocol", choices=["multipart", "v2"], default="multipart",
                   help="v2: Open Inference Protocol bodies; give --path /v2/models/<model>/infer")
    p.add_argument("--out", type=Path, help="keep the bodies and wrk's own report here")
    args = p.parse_args(argv)
    from loadtest import samples

    bodies = [b for b, _ in samples.digits(50)] if args.bodies == "digits" else samples.photos(32)
    fields = dict(f.split("=", 1) for f in args.field)
    r = run(args.host, args.path, bodies, args.seconds, args.connections, args.threads, fields, args.out,
            args.protocol)
    print(json.dumps(r))
    sys.exit(1 if r["non_2xx"] or any(r["socket_errors"].values()) else 0)


if __name__ == "__main__":
    main()
