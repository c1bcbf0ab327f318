"""Static int8 quantization (QDQ format, per-channel weights, calibrated on real training images)
with onnxruntime's quantization tool, and how far the int8 model strays from fp32.

Static, not dynamic: measured here, dynamic int8 on convolutions is slower than fp32; static QDQ is
~3× faster for AlexNet on CPU, but only at graph optimization level EXTENDED or higher (the service
uses ENABLE_ALL).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.onnx_export import INPUT, OUTPUT, session


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        self._it = iter([{INPUT: images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict | None:
        return next(self._it, None)


def quantize(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """`calibration`: normalized float32 (N, C, window, window) real training images."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_path), _Batches(calibration.astype(np.float32)),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def compare(fp32_path: Path, int8_path: Path, images: np.ndarray, labels: np.ndarray | None) -> dict:
    """int8 vs fp32 on held-out window-size images: top-1 agreement, and accuracy when labels exist."""
    fp32, int8 = session(fp32_path), session(int8_path)
    a = np.concatenate([fp32.run([OUTPUT], {INPUT: images[i : i + 256]})[0]
                        for i in range(0, len(images), 256)]).reshape(len(images), -1).argmax(1)
    b = np.concatenate([int8.run([OUTPUT], {INPUT: images[i : i + 256]})[0]
                        for i in range(0, len(images), 256)]).reshape(len(images), -1).argmax(1)
    out = {"method": "static QDQ, per-channel int8 weights, uint8 activations, MinMax calibration",
           "images": int(len(images)), "top1_agreement": round(float((a == b).mean()), 5)}
    if labels is not None:
        out["fp32_accuracy"] = round(float((a == labels).mean()), 5)
        out["int8_accuracy"] = round(float((b == labels).mean()), 5)
    return out
