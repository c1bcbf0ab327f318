"""Service settings, read once from CONVSERVE_* environment variables (pydantic-settings).

    CONVSERVE_MODELS=lenet5,digit-detector CONVSERVE_MAX_BATCH_SIZE=64 bentoml serve service.service:ConvServe
"""

from __future__ import annotations

import os

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVSERVE_")

    models: str = Field("lenet5,digit-detector",
                        description="store tags to serve, comma-separated (name or name:version); "
                                    "the first is /classify's default")
    workers: int = Field(1, ge=1, description="server processes (each loads every model)")
    engine: str = Field("local", pattern="^(local|process)$",
                        description="local: each HTTP worker runs its own engine (sessions, batcher); "
                                    "process: one engine process per device, fed by every worker "
                                    "through shared memory (service/engine/remote.py)")
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per worker; 0 = cores / workers")
    providers: str = Field("auto", pattern="^(auto|cpu|cuda)$",
                           description="auto: CUDA when onnxruntime-gpu sees a GPU, else CPU")
    cuda_device: int = Field(0, ge=0)
    cuda_mem_limit_gb: float = Field(8.0, gt=0, description="CUDA arena limit per model")
    cuda_tf32: bool = Field(True, description="let CUDA run fp32 convolutions and GEMMs in TF32 "
                            "(onnxruntime's default; faster, ~1e-3 relative): false for true fp32")
    io_binding: str = Field("auto", pattern="^(auto|on|off)$",
                            description="window batches through preallocated IO-bound buffers: auto = on "
                                        "CUDA only (on a CPU it gains nothing: service/engine/binding.py)")
    max_batch_size: int = Field(64, ge=1, description="images per onnxruntime call in /classify")
    batch_wait_ms: float = Field(0.0, ge=0,
                                 description="extra wait for a batch to fill; 0 = run as soon as the "
                                             "model is free (batches still grow under load)")
    batch_buckets: str = Field("auto", description="batch sizes a model runs at (smaller batches are "
                                "padded up): auto (pow2 on CUDA, none on CPU), none, pow2, or a list "
                                "like 1,8,32,64; see service/engine/buckets.py")
    switch_interval_ms: float | None = Field(
        None, ge=0, description="Python's GIL switch interval in ms; unset: 0.2 (a model call on its "
        "inference thread then never waits ~5 ms for a busy event loop to let go of the GIL: AlexNet "
        "served +15 % on a 2-core CPU); 0: Python's 5 ms")
    inline_max_ms: float = Field(
        1.0, ge=0, description="a CPU model whose batch-1 call takes at most this long at warm-up runs on "
        "the event loop, batched by loop turn, instead of on its inference thread (engine/inline.py); "
        "0: always on the thread")
    max_images: int = Field(64, ge=1, description="images in one /classify request")
    max_top_k: int = Field(20, ge=1)
    max_request_bytes: int = Field(32 * 2**20, ge=1024, description="HTTP body limit (413 above)")
    max_image_pixels: int = Field(64 * 2**20, ge=1, description="decoded pixels per image (413 above)")
    tile_pixels: int = Field(4 * 2**20, ge=2**16,
                             description="/score_map scores larger images in tiles of about this many "
                                         "pixels (bounded memory; the map is the same)")
    fixed_tiles: str = Field("auto", pattern="^(auto|on|off)$",
                             description="dense tiles of one shape, warmed at start (the last tile of a "
                                         "row moved back rather than cut short): auto = on CUDA only, "
                                         "which sets up each new input shape (~30 ms); on a CPU the "
                                         "extra overlap only costs")
    memory_limit_mb: int = Field(0, ge=0, description="the memory this server may use; 0: the "
                                 "container's cgroup limit, else the machine's (pipeline/cost.py)")
    worker_memory_mb: int = Field(0, ge=0, description="bytes of dense work and request bodies a worker "
                                  "admits at once (503 with Retry-After beyond); 0: derived from the "
                                  "memory limit")
    request_memory_mb: int = Field(0, ge=0, description="estimated peak memory of one request (413 "
                                   "beyond, saying what to change); 0: half the worker's")
    max_scored_pixels: int = Field(64 * 2**20, ge=2**16, description="input pixels one request may "
                                   "have the model score, over every scale (1/σ² each) and shift (k² "
                                   "for stride_factor k): 413 beyond; 64 Mi ≈ a 4096² page at stride "
                                   "factor 2, ~30 s on 2 cores")
    min_classify_side: int = Field(8, ge=1, description="smallest image side /classify accepts")
    warmup_rounds: int = Field(3, ge=1, description="warm-up passes per model and shape before ready")
    timeout_s: int = Field(60, ge=1, description="per-request timeout (504 above)")
    max_concurrency: int = Field(64, ge=1, description="requests in flight per worker, counted once "
                                 "their body has arrived (429 with Retry-After above)")
    max_queue_ms: float = Field(1000, gt=0, description="a model's queue bound, as estimated waiting "
                                "time: requests beyond it get 503 with Retry-After at once, and a "
                                "request that waits longer anyway gets 503 instead of running")
    max_dense_queue: int = Field(2, ge=0, description="/score_map requests that may wait while one "
                                 "runs (503 with Retry-After beyond)")
    body_timeout_s: float = Field(10, gt=0, description="a client that sends no body bytes for this "
                                  "long gets 408 (stalled uploads hold no inference slot meanwhile)")
    api_keys: str | None = Field(None, description="comma-separated keys; when set, every route except "
                                 "health, metrics and docs needs `Authorization: Bearer <key>` (401 "
                                 "otherwise). Set but holding no key (blank, only commas): the server "
                                 "refuses to start")
    admin_keys: str | None = Field(None, description="comma-separated keys for POST /admin/models (model "
                                   "rollout; 401 without one of them, 403 when unset); API keys do not "
                                   "roll out. Set but holding no key: the server refuses to start")
    access_log: bool = Field(True, description="one log line per request, with its X-Request-ID")
    grpc_port: int = Field(8001, ge=0, le=65535, description="the Open Inference Protocol over gRPC "
                           "(fronts/grpc_server.py) on this port, in every worker; 8001 is Triton's gRPC "
                           "port, so Triton clients' defaults find it; 0 turns it off")
    grpc_host: str = Field("0.0.0.0", description="the address gRPC listens on (BentoML's HTTP default)")

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _some_key_when_set(cls, value: str | None, info) -> str | None:
        """Keys fail closed: a variable that is set (an empty Secret, a typo like `,`) but yields no key
        stops the server at start, rather than serving with no key required."""
        if value is not None and not keys(value):
            raise ValueError(f"CONVSERVE_{info.field_name.upper()} is set but holds no key ({value!r}); "
                             f"give comma-separated keys, or unset it")
        return value

    @property
    def model_tags(self) -> list[str]:
        return [tag.strip() for tag in self.models.split(",") if tag.strip()]

    @property
    def intra_op_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)


def keys(text: str | None) -> list[str]:
    """The keys in a comma-separated setting (blank entries dropped)."""
    return [k.strip() for k in (text or "").split(",") if k.strip()]
