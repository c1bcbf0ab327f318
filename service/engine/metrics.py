"""Per-model Prometheus series: images per call, the time the oldest request waited, the model's time.

prometheus_client is imported when the first batch is observed, not at import: BentoML sets
PROMETHEUS_MULTIPROC_DIR in a worker only after importing the service module, and a prometheus_client
imported before that would keep its values where /metrics never looks.
"""

from __future__ import annotations

import threading
from typing import NamedTuple


class Batch(NamedTuple):
    model: str
    kind: str  # "window": images at the classifier's window size; "dense": a whole image or tile
    images: int  # real images in the call
    padded: int  # the batch size the model ran at (≥ images: padded up to a bucket)
    queue_s: float  # how long the oldest request waited for this call to start
    compute_s: float  # onnxruntime's call, seen from the inference thread (GIL re-take included)


_series: dict | None = None
_making = threading.Lock()  # one inference thread per model: two may observe their first batch at once


def _make_series() -> dict:
    from prometheus_client import Counter, Histogram

    labels = ["model", "kind"]
    seconds = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1, 2.5, 10)
    return {
        "images": Histogram("convserve_batch_size", "images per onnxruntime call", labels,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
        "padding": Counter("convserve_padding_images", "zero images added to fill a batch bucket", labels),
        "queue": Histogram("convserve_queue_seconds", "time a request waited for its batch to start",
                           labels, buckets=seconds),
        "compute": Histogram("convserve_compute_seconds", "onnxruntime time per call", labels,
                             buckets=seconds),
    }


def observe(batch: Batch) -> None:
    global _series
    with _making:
        if _series is None:
            _series = _make_series()
    labels = {"model": batch.model, "kind": batch.kind}
    _series["images"].labels(**labels).observe(batch.images)
    _series["queue"].labels(**labels).observe(batch.queue_s)
    _series["compute"].labels(**labels).observe(batch.compute_s)
    if batch.padded > batch.images:
        _series["padding"].labels(**labels).inc(batch.padded - batch.images)
