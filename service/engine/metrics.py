"""Per-model Prometheus series: images per call, the time the oldest request waited, the model's time.

Plain prometheus_client: in a BentoML worker PROMETHEUS_MULTIPROC_DIR is already in the environment when
this module is imported (BentoML sets it when it spawns the worker), so the values land where /metrics
reads them.
"""

from __future__ import annotations

from typing import NamedTuple

from prometheus_client import Counter, Histogram


class Batch(NamedTuple):
    model: str
    kind: str  # "window": images at the classifier's window size; "dense": a whole image or tile
    images: int  # real images in the call
    padded: int  # the batch size the model ran at (≥ images: padded up to a bucket)
    queue_s: float  # how long the oldest request waited for this call to start
    compute_s: float  # onnxruntime's call, seen from the inference thread (GIL re-take included)


LABELS = ["model", "kind"]
SECONDS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1, 2.5, 10)
IMAGES = Histogram("convserve_batch_size", "images per onnxruntime call", LABELS,
                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
PADDING = Counter("convserve_padding_images", "zero images added to fill a batch bucket", LABELS)
QUEUE = Histogram("convserve_queue_seconds", "time a request waited for its batch to start", LABELS,
                  buckets=SECONDS)
COMPUTE = Histogram("convserve_compute_seconds", "onnxruntime time per call", LABELS, buckets=SECONDS)


def observe(batch: Batch) -> None:
    labels = {"model": batch.model, "kind": batch.kind}
    IMAGES.labels(**labels).observe(batch.images)
    QUEUE.labels(**labels).observe(batch.queue_s)
    COMPUTE.labels(**labels).observe(batch.compute_s)
    if batch.padded > batch.images:
        PADDING.labels(**labels).inc(batch.padded - batch.images)
