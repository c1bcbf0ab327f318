# convserve serving image: onnxruntime + BentoML, no torch.
#
#   make artifacts bentomodels                 # train/export, then write artifacts/*.bentomodel
#   docker build -t convserve .                # bakes artifacts/*.bentomodel in, if present
#   docker run -p 3000:3000 convserve
#
# Or mount a store at run time instead of baking (no artifacts needed at build time):
#   docker run -p 3000:3000 -v ~/bentoml/models:/home/convserve/bentoml/models:ro convserve
#
# GPU (onnxruntime-gpu in place of onnxruntime; needs the NVIDIA container toolkit):
#   docker build -t convserve:gpu --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg EXTRAS=gpu .
#   docker run --gpus all -p 3000:3000 convserve:gpu
#
# Batch scoring on Ray (deploy/ray/rayjob.yaml): docker build --build-arg EXTRAS=cpu,ray -t convserve:ray .
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG EXTRAS=cpu

ENV BENTOML_DO_NOT_TRACK=true \
    BENTOML_HOME=/home/convserve/bentoml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# make runs the same install as `make test`; the CUDA base has no Python of its own, slim has.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make curl \
    $(command -v python3 >/dev/null || echo python3 python3-venv) \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 convserve

WORKDIR /app
COPY pyproject.toml constraints.txt Makefile README.md ./
COPY models/ models/
COPY export/ export/
COPY service/ service/
COPY loadtest/ loadtest/
COPY batch/ batch/
RUN make install VENV=/opt/venv EXTRAS=${EXTRAS} \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

# Bake exported models in when artifacts/*.bentomodel exist (the Makefile is listed so the COPY
# never matches nothing).
COPY Makefile artifacts/*.bentomodel* /tmp/models/
RUN for f in /tmp/models/*.bentomodel; do [ -e "$f" ] && /opt/venv/bin/bentoml models import "$f"; done; \
    rm -rf /tmp/models; mkdir -p "$BENTOML_HOME" && chown -R convserve "$BENTOML_HOME"

USER convserve
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:3000/readyz || exit 1
CMD ["/opt/venv/bin/bentoml", "serve", "service.service:ConvServe", "--host", "0.0.0.0", "--port", "3000"]
