"""The same LeNet ONNX file served by NVIDIA's PyTriton (Triton Inference Server's HTTP/gRPC fronts and
dynamic batcher, the model in a Python callable), for `make bench` to race convserve's /v2 against.

    .venv-triton/bin/python loadtest/triton_peer.py --onnx STORE/models/lenet5/<v>/model.onnx \
        --card '{"mode": "L", "width": 28, ...}' --http-port 8000 --grpc-port 8001 --metrics-port 8002

Runs under its own Python 3.12 venv (`make bench-triton-venv`): PyTriton 0.7.0 starts tritonserver,
whose Python backend stub loads libpython3.12.so, so that Python must be built with a shared libpython
and LD_LIBRARY_PATH must point at its lib/ (loadtest/servers.py's TritonServer sets it). This file
imports neither bentoml nor convserve: the caller reads the store and passes the file and the card.

One model, `lenet5`, with two optional inputs, exactly as convserve's /v2 takes them:
- the ONNX input's name (`input`, FP32 [N, C, H, W]): already normalized;
- `image` (BYTES [N, 1]): encoded images, decoded with PIL here and normalized as convserve does
  (card mode, black under transparency, bilinear resize to the window, (pixel·scale − mean) / std).
Output: `probabilities` (FP32 [N, K], softmax). A batch from Triton's dynamic batcher is grouped by
which input its requests sent (pytriton's group_by_keys), then run as one onnxruntime call per group.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from io import BytesIO

import numpy as np
import onnxruntime as ort
from PIL import Image
from pytriton.decorators import batch, group_by_keys
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """service/pipeline/images.to_mode: transparent pixels become black, then the card's mode."""
    if image.mode in ("LA", "PA", "RGBA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image if image.mode == mode else image.convert(mode)


class Model:
    """onnxruntime with the FastAPI baseline's options (all graph optimizations, intra-op threads 1:
    a LeNet batch of 64 is ~0.5 ms, too small to split across threads) and the card's preprocessing."""

    def __init__(self, onnx_path: str, card: dict, threads: int) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.card = card
        self.mean = np.asarray(card["mean"], np.float32)[:, None, None]
        self.std = np.asarray(card["std"], np.float32)[:, None, None]

    def pixels(self, data: bytes) -> np.ndarray:
        c = self.card
        image = to_mode(Image.open(BytesIO(data)), c["mode"])
        if image.size != (c["width"], c["height"]):
            image = image.resize((c["width"], c["height"]), Image.BILINEAR)
        x = np.asarray(image)
        return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        x = np.multiply(pixels, np.float32(self.card["scale"]), dtype=np.float32)
        return (x - self.mean) / self.std

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        scores = self.session.run(None, {self.input: np.ascontiguousarray(x, np.float32)})[0]
        logits = scores.reshape(len(x), -1)  # (N, K, 1, 1) at the window → (N, K)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def infer_function(self):
        @group_by_keys
        @batch
        def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
            if "image" in inputs:  # (N, 1) of bytes
                x = self.normalize(np.stack([self.pixels(bytes(v)) for v in inputs["image"].reshape(-1)]))
            else:
                x = inputs[self.input]
            return {"probabilities": self.probabilities(x)}

        return infer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--onnx", required=True, help="the store's model.onnx")
    p.add_argument("--card", required=True,
                   help="JSON: mode, width, height, channels, mean, std, scale, labels")
    p.add_argument("--name", default="lenet5")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--workspace", help="PyTriton's sockets and tritonserver's model store (default: a new "
                   "folder under ~/.cache/pytriton, left behind if this process is killed)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--max-batch-size", type=int, default=64, help="convserve's CONVSERVE_MAX_BATCH_SIZE")
    p.add_argument("--max-queue-delay-us", type=int, default=100,
                   help="dynamic batcher's wait for a batch to fill (see loadtest/servers.TritonServer)")
    args = p.parse_args(argv)
    card = json.loads(args.card)
    model = Model(args.onnx, card, args.threads)
    logging.basicConfig(level=logging.WARNING)
    shape = (card["channels"], card["height"], card["width"])
    local = "127.0.0.1"  # loopback only, all three fronts
    config = TritonConfig(http_address=local, http_port=args.http_port, grpc_address=local,
                          grpc_port=args.grpc_port, metrics_address=local, metrics_port=args.metrics_port,
                          allow_gpu_metrics=False, exit_on_error=True)
    # SIGTERM (loadtest/servers.TritonServer stops the process group with it) leaves through `with`, so
    # that PyTriton stops tritonserver and its proxies and removes its workspace
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(model_name=args.name, infer_func=model.infer_function(),
                    inputs=[Tensor(name=model.input, dtype=np.float32, shape=shape, optional=True),
                            Tensor(name="image", dtype=np.object_, shape=(1,), optional=True)],
                    outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(len(card["labels"]),))],
                    config=ModelConfig(max_batch_size=args.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
                    strict=False)
        triton.serve()


if __name__ == "__main__":
    main()
