# convserve serving image: onnxruntime + BentoML, no torch.
#
#   docker build -t convserve .                # bakes the shipped bentomodels/*.bentomodel in
#   docker run -p 3000:3000 convserve
#   make image                                 # the same with podman or docker (BASE=... another base)
#
# `make artifacts` retrains the models and rewrites bentomodels/ (or `make bentomodels` writes the
# store's latest there); build again to bake those in.
#
# Or mount a store at run time instead of baking (no artifacts needed at build time):
#   docker run -p 3000:3000 -v ~/bentoml/models:/home/convserve/bentoml/models:ro convserve
#
# GPU: onnxruntime-gpu (pinned in pyproject's `gpu` extra) on NVIDIA's CUDA 13 + cuDNN 9 runtime image.
# PyPI's onnxruntime-gpu 1.31 is a CUDA 13 build (libcudart.so.13, cuDNN 9 for CUDA 13): on a CUDA 12
# base its CUDA provider cannot load. The host needs the NVIDIA container toolkit and a driver of the
# CUDA 13 generation, >= 580 (the base image's NVIDIA_REQUIRE_CUDA makes the toolkit refuse older ones).
# tests/test_docker_gpu.py checks that this base's CUDA major is the pinned wheel's.
#   docker build -t convserve:gpu --build-arg VARIANT=gpu .
#   docker run --gpus all -p 3000:3000 convserve:gpu
#
# Batch scoring on Ray (deploy/ray/rayjob.yaml): docker build --build-arg EXTRAS=cpu,ray -t convserve:ray .
# BASE: the CPU variant's base, any Debian-like image with apt (e.g. one made with debootstrap, as
# tests/containers.py does to build without a container registry): make image BASE=localhost/...
ARG VARIANT=cpu
ARG BASE=python:3.11-slim
FROM ${BASE} AS base-cpu
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS base-gpu
# A GPU image that came up on CPU is a fault, not a fallback: the server exits at start with
# onnxruntime's error (service/engine/provider.py). Override with -e CONVSERVE_PROVIDERS=auto.
ENV CONVSERVE_PROVIDERS=cuda
# Only the stage named here is built (and pulled).
FROM base-${VARIANT}
ARG VARIANT
ARG EXTRAS=${VARIANT}

ENV BENTOML_DO_NOT_TRACK=true \
    BENTOML_HOME=/home/convserve/bentoml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# make runs the same install as `make test`; the CUDA base has no Python of its own, slim has (with
# ensurepip, which `python3 -m venv` needs: Debian's python3 has it only with python3-venv).
RUN apt-get update \
 && apt-get install -y --no-install-recommends make curl \
    $(python3 -c 'import ensurepip' 2>/dev/null || echo python3 python3-venv) \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 convserve

WORKDIR /app
COPY pyproject.toml constraints.txt Makefile README.md ./
COPY modelcard/ modelcard/
COPY models/ models/
COPY export/ export/
COPY service/ service/
COPY loadtest/ loadtest/
COPY batch/ batch/
# Behind a TLS-inspecting proxy pip needs the host's CA bundle: `make image` passes it as the build
# secret `pip-cert` (mounted for this step only; the image keeps nothing of it).
RUN --mount=type=secret,id=pip-cert,required=false \
    if [ -f /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
 && make install VENV=/opt/venv EXTRAS=${EXTRAS} \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

# Bake the shipped models in (store exports; after the install, so new models keep its layer cached).
COPY bentomodels/ /tmp/models/
RUN for f in /tmp/models/*.bentomodel; do /opt/venv/bin/bentoml models import "$f" || exit 1; done; \
    rm -rf /tmp/models; mkdir -p "$BENTOML_HOME" && chown -R convserve "$BENTOML_HOME"

USER convserve
EXPOSE 3000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:3000/readyz || exit 1
CMD ["/opt/venv/bin/bentoml", "serve", "service.service:ConvServe", "--host", "0.0.0.0", "--port", "3000"]
