"""IO binding for window-size batches: per input shape (one per batch bucket), the inputs live in buffers
allocated once on the model's device and are refreshed in place, and the outputs asked for are copied
into host buffers allocated once; outputs not asked for (the raw scores, when only the in-graph top-k is
wanted) never leave the device.

Why only where it pays: on CUDA the host→device copy of the input was the limit (field notes, H100,
AlexNet b64: 11.1k img/s from numpy vs 37.2k with the input already on the device), and it is pageable
memory here: `OrtValue.ortvalue_from_numpy(x, "cuda_pinned")` is unsupported in onnxruntime-gpu 1.31,
so pinned host buffers would need another allocator (cupy, cuda-python), which this image does not
carry. On a CPU, binding gains nothing (measured: LeNet b1 71 vs 72 µs, b32 593 vs 595 µs, BENCHMARKS.md),
so CONVSERVE_IO_BINDING=auto binds on CUDA only; `on` runs the same code on a CPU (the tests do).
CUDA graphs per bucket are not built: they need all nodes on CUDA and could not be measured here.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class Binder:
    """One model's bindings, used by its inference thread only (an IOBinding is not thread-safe)."""

    def __init__(self, session: ort.InferenceSession, device: str, device_id: int = 0) -> None:
        self.session, self.device, self.device_id = session, device, device_id
        self._inputs: dict[tuple, dict[str, ort.OrtValue]] = {}  # per (name, shape, dtype) of the feeds
        self._outputs: dict[tuple, np.ndarray] = {}  # host buffers per (name, shape)
        self._binding = session.io_binding()
        self._shapes = {o.name: o for o in session.get_outputs()}

    def _device_value(self, name: str, x: np.ndarray) -> ort.OrtValue:
        key = (name, x.shape, x.dtype.str)
        value = self._inputs.get(key)
        if value is None:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), x.dtype, self.device,
                                                              self.device_id)
            self._inputs[key] = value
        if x.size:
            value.update_inplace(np.ascontiguousarray(x))  # host → device, into the same buffer
        return value

    def run(self, feeds: dict[str, np.ndarray], names: list[str],
            shapes: dict[str, tuple[int, ...]]) -> list[np.ndarray]:
        """session.run(names, feeds), with `shapes` the shapes of the outputs `names` (known for window
        batches). Returns copies: the host buffers are reused by the next call."""
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, x in feeds.items():
            binding.bind_ortvalue_input(name, self._device_value(name, x))
        out = []
        for name in names:
            key = (name, shapes[name])
            buffer = self._outputs.get(key)
            if buffer is None:
                dtype = np.int64 if self._shapes[name].type == "tensor(int64)" else np.float32
                buffer = self._outputs[key] = np.empty(shapes[name], dtype)
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buffer))
            out.append(buffer)
        self.session.run_with_iobinding(binding)
        return [buffer.copy() for buffer in out]
