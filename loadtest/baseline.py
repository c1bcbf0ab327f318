"""The baseline a user would write instead of convserve: FastAPI + uvicorn + onnxruntime, one image
per request, no batching. Given its best configuration for a tiny model, so that a ratio against it
means something: the same ONNX file and preprocessing (read from the same store), onnxruntime called
inline in an async handler (a thread-pool hop costs more than LeNet's 30 µs forward pass), intra-op
threads = 1, no access log, as many uvicorn workers as convserve has.

    BENTOML_HOME=~/bentoml python -m loadtest.baseline --port 3100 --model lenet5
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException, UploadFile
from PIL import Image


def create_app(model_tag: str, threads: int) -> FastAPI:
    import bentoml

    from modelcard import ModelCard

    stored = bentoml.models.get(model_tag)
    card = ModelCard.from_dict(dict(stored.info.metadata))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(stored.path_of("model.onnx"), options, providers=["CPUExecutionProvider"])
    spec = card.input
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    labels = card.labels
    app = FastAPI()

    @app.post("/classify")
    async def classify(image: UploadFile) -> dict:
        try:
            im = Image.open(io.BytesIO(await image.read())).convert(spec.mode)
        except Exception as e:  # noqa: BLE001
            raise HTTPException(422, f"not an image: {e}") from None
        im = im.resize((spec.width, spec.height), Image.BILINEAR) if im.size != (28, 28) else im
        x = np.asarray(im, np.float32)
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        x = (x * np.float32(spec.scale) - mean) / std
        logits = session.run(None, {"input": x[None]})[0][0, :, 0, 0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        k = int(p.argmax())
        return {"predictions": [{"filename": image.filename,
                                 "top_k": [{"label": labels[k], "probability": float(p[k])}]}]}

    return app


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.baseline", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=3100)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    os.environ["BASELINE_MODEL"], os.environ["BASELINE_THREADS"] = args.model, str(args.threads)
    uvicorn.run("loadtest.baseline:app_from_env", factory=True, host="127.0.0.1", port=args.port,
                workers=args.workers, access_log=False, log_level="warning")


def app_from_env() -> FastAPI:
    return create_app(os.environ["BASELINE_MODEL"], int(os.environ["BASELINE_THREADS"]))


if __name__ == "__main__":
    main()
