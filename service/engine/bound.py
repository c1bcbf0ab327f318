"""One model's blocking calls, for dense pipelines in a thread (pipeline/dense.py Infer and InferPeaks):
what `engine.bind(model)` returns for both engines (Engine and RemoteEngine)."""

from __future__ import annotations

import numpy as np


class BoundModel:
    """Called, the scores; .peaks(x, threshold), a detector's peaks (the engine's infer_blocking)."""

    def __init__(self, engine, model: str) -> None:  # Engine or RemoteEngine: both have infer_blocking
        self.engine, self.model = engine, model

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.engine.infer_blocking(self.model, x)

    def peaks(self, x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        return self.engine.infer_blocking(self.model, x, "peaks", threshold)
