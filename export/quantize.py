"""Static int8 quantization (QDQ format, per-channel weights, calibrated on real training images)
with onnxruntime's quantization tool, and how far the int8 model strays from fp32.

Static, not dynamic: measured here, dynamic int8 on convolutions is slower than fp32; static QDQ is
~3× faster for AlexNet on CPU, but only at graph optimization level EXTENDED or higher (the service
uses ENABLE_ALL).

Weights are 7-bit (`reduce_range=True`), so that one exported file holds on every x86-64 CPU (issue 20).
onnxruntime runs uint8-activation × int8-weight convolutions (QLinearConv after QDQ fusion) with
MLAS's U8S8 kernels. Without VNNI (AVX2, and AVX-512 without VNNI) they multiply with VPMADDUBSW,
which adds two u8×s8 products into a *saturating* int16: up to 2·255·128 = 65,280, over 32,767.
7-bit weights ([-64, 64]) bound a pair to 2·255·64 = 32,640, so nothing saturates; VNNI (VPDPBUSD)
accumulates in int32 and never saturated. onnxruntime's docs ("When and why do I need to try U8U8?",
quantization page) and `quantize_static`'s docstring recommend exactly this (U8S8 + reduce_range on
CPUs without VNNI), U8U8 being the other way out.
Measured on the shipped LeNet (1,000 held-out digits, median relative score error vs fp32, 1 thread;
AVX2 = qemu-x86_64 -cpu Haswell, no AVX-512; VNNI = this machine, AVX-512 VNNI):
    U8S8 (before)          AVX2 0.196, agreement 0.994 | VNNI 0.0090   (field notes, real AVX2: 0.205)
    U8S8 + reduce_range    AVX2 0.0118, agreement 1.0  | VNNI 0.0118
    U8U8                   AVX2 0.0088                 | VNNI 0.0088
    S8S8                   AVX2 0.196                  | VNNI 0.0090   (same kernels as U8S8)
Why not U8U8, a little more accurate: it is slower. QLinearConv takes MLAS's symmetric indirect-conv
path (MlasConvSym: AVX2 / AVX-VNNI / AVX-512 / AVX-512 VNNI kernels) only for signed weights with zero
point 0; uint8 weights fall back to im2col + the U8U8 GEMM, which has no VNNI kernel (except
AVX-VNNI-INT8 parts); on AVX2 that GEMM multiplies 16-bit pairs (VPMADDWD), half the work per
instruction of the U8S8 kernels. Measured on the VNNI machine (AVX2 speed under QEMU means nothing), CPU
time per image with 1 thread (best of 8 interleaved rounds; the 2-core machine was shared):
    AlexNet (random weights, batch 16): fp32 12.3 ms | U8S8 3.49 ms (3.5×) | U8S8 + reduce_range 3.50 ms
        (3.5×) | U8U8 7.06 ms (1.7×)
    LeNet (batch 32): fp32 17.9 µs | U8S8 27.4 µs | U8S8 + reduce_range 27.8 µs | U8U8 33.6 µs
reduce_range keeps the U8S8 kernels on every ISA, so the old speed (measured here on VNNI; on other
ISAs it runs the same kernels as before), at the cost of 1 bit of weight precision.
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

METHOD = "static QDQ, per-channel int8 weights (7-bit: reduce_range), uint8 activations, MinMax calibration"
SATURATION = ("7-bit weights: no int16 saturation in VPMADDUBSW on x86-64 without VNNI (AVX2, AVX-512); "
              "U8U8 avoids it too but is slower")


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
                        # reduce_range: 7-bit weights, no VPMADDUBSW saturation without VNNI (the
                        # numbers above: median error 0.196 → 0.0118 on AVX2, same speed)
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def compare(fp32_path: Path, int8_path: Path, images: np.ndarray, labels: np.ndarray | None) -> dict:
    """int8 vs fp32 on held-out window-size images: top-1 agreement, and accuracy when labels exist."""
    fp32, int8 = session(fp32_path), session(int8_path)
    a = np.concatenate([fp32.run([OUTPUT], {INPUT: images[i : i + 256]})[0]
                        for i in range(0, len(images), 256)]).reshape(len(images), -1).argmax(1)
    b = np.concatenate([int8.run([OUTPUT], {INPUT: images[i : i + 256]})[0]
                        for i in range(0, len(images), 256)]).reshape(len(images), -1).argmax(1)
    out = {"method": METHOD, "saturation": SATURATION,
           "images": int(len(images)), "top1_agreement": round(float((a == b).mean()), 5)}
    if labels is not None:
        out["fp32_accuracy"] = round(float((a == labels).mean()), 5)
        out["int8_accuracy"] = round(float((b == labels).mean()), 5)
    return out
