# Two commands on a fresh machine: `make serve` and `make test`. Each creates .venv itself.
# Every pip install goes through constraints.txt, which pins torch to its CPU wheel.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet -c constraints.txt
PORT   ?= 3000
EXTRAS ?= cpu,train,dev,ray
# What serving needs (onnxruntime; BentoML is a base dependency). `make serve` installs only this:
# the default models come from bentomodels/, so torch, Ray and the test tools wait for `make test`.
SERVE_EXTRAS ?= cpu
BENTOML := $(VENV)/bin/bentoml
comma := ,
export BENTOML_DO_NOT_TRACK := true
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install test lint artifacts store serve loadtest soak bench bench-triton-venv bench-datapath bentomodels image \
	clean proto

# One stamp per set of extras: .venv/.installed-cpu (`make serve`), .venv/.installed-cpu,train,dev,ray
# (`make install`, `make test`, `make artifacts`, ...). Whichever runs first creates the venv; a later,
# larger set only adds packages. Installing a set also stamps each extra in it alone (the full set
# includes serving's `cpu`, so `make serve` after `make test` installs nothing).
# The Dockerfile runs `make install` (VENV=/opt/venv EXTRAS=cpu), so CI exercises its install path.
$(VENV)/.installed-%: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[$*]'
	touch $(sort $@ $(foreach e,$(subst $(comma), ,$*),$(VENV)/.installed-$(e)))

install: $(VENV)/.installed-$(EXTRAS)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

# The shipped models: store exports (`bentoml models export`, xz tarballs of the ONNX file and its
# card, ~0.2-0.7 MB each), committed in bentomodels/. `make artifacts` rewrites them; commit them when
# you mean to ship the new models. lenet5-int8 is there for `make bench` (int8 vs fp32 of one LeNet).
# Absolute paths: BentoML 1.4's `models export`/`import` read a relative dir/file as /dir/file.
SHIPPED_DIR := bentomodels
SHIPPED := lenet5 lenet5-int8 digit-detector
shipped = $(abspath $(SHIPPED_DIR))
define write_exports
	@mkdir -p $(shipped)
	@for m in $(SHIPPED); do \
	  $(BENTOML) models export $$m:latest $(shipped)/$$m.tmp.bentomodel && \
	  mv $(shipped)/$$m.tmp.bentomodel $(shipped)/$$m.bentomodel || exit 1; done
endef

# `$(call need_models,NAMES)`: make sure the store (BENTOML_HOME) has these models. One already there
# is kept; a missing one is imported from its export in bentomodels/ (about a second); only when an
# export is missing too are the default models trained and exported anew (`make artifacts`, minutes).
need_models = @for m in $(1); do \
	  $(BENTOML) models get $$m:latest >/dev/null 2>&1 && continue; \
	  if [ -f $(shipped)/$$m.bentomodel ]; then \
	    $(BENTOML) models import $(shipped)/$$m.bentomodel || exit 1; \
	  else echo "no $(SHIPPED_DIR)/$$m.bentomodel: training the default models"; $(MAKE) artifacts; exit; fi; \
	done

# Retrain and re-export the default models: the digit classifier, its int8 twin and the digit detector
# (with a `background` class); then rewrite the shipped exports from the store.
artifacts: install
	$(PY) -m models.train --name lenet5
	$(PY) -m models.train --background --name digit-detector
	$(PY) -m export --arch lenet5-relu --weights artifacts/lenet5.pt --int8
	$(PY) -m export --arch lenet5-relu --weights artifacts/digit-detector.pt
	$(write_exports)

# The served default models in the store; a fresh store gets them from bentomodels/ (no training,
# no torch). Then serve.
store: $(VENV)/.installed-$(SERVE_EXTRAS)
	$(call need_models,lenet5 digit-detector)

# One worker per core unless told otherwise: the default models are LeNet-sized, which served 1.6× the
# req/s at 2 workers as at 1 on a 2-core CPU, at the same p99 (5,979 vs 3,736; BENCHMARKS.md, "The lean
# hot path"); a compute-bound model (AlexNet) served 1.7× at 1 worker: CONVSERVE_WORKERS=1 make serve.
CONVSERVE_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
serve: store
	CONVSERVE_WORKERS=$(CONVSERVE_WORKERS) $(BENTOML) serve service.service:ConvServe --port $(PORT)

# Against a running server on 127.0.0.1:$(PORT): bounded, headless; CSV + HTML under results/.
LOADTEST_ARGS ?= --scenario mixed --users 32 --run-time 30
loadtest: install
	$(PY) -m loadtest.run --host http://127.0.0.1:$(PORT) $(LOADTEST_ARGS) --out results/loadtest

# 10 minutes of mixed load on a fresh loopback server; RSS, threads and open files before and after:
# results/soak/soak.md and soak.json. Not part of `make test`. Stop other load on the machine first.
SOAK_ARGS ?= --minutes 10
soak: install store
	$(PY) -m loadtest.soak --out results/soak $(SOAK_ARGS)

# The speed benchmarks of BENCHMARKS.md, side by side in one run (~20 min; AlexNet is exported on first
# use; served load from Debian's wrk): results/bench/report.md and results.json. Stop other load on the
# machine first.
# BENCH_TRITON=1 first makes the PyTriton venv (below); the bench races PyTriton whenever it exists.
bench: install $(if $(BENCH_TRITON),bench-triton-venv)
	$(call need_models,$(SHIPPED))
	$(PY) -m bench --out results/bench $(BENCH_ARGS)

# The bench's Triton peer (loadtest/triton_peer.py): NVIDIA PyTriton (tritonserver's HTTP/gRPC fronts
# and dynamic batcher) in a venv of its own, ~450 MB, no bentoml, no torch. Its Python must have a
# shared libpython (lib/libpython3.X.so): tritonserver's Python backend stub loads it, and with the
# system's 3.11 the stub picked up Debian's libpython and failed. pyenv's 3.12.1 has one. onnxruntime
# is the version .venv runs, so both servers run the same kernels.
TRITON_PYTHON ?= $(HOME)/.pyenv/versions/3.12.1/bin/python3.12
TRITON_VENV := .venv-triton
bench-triton-venv: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed: constraints.txt | $(VENV)/.installed-$(SERVE_EXTRAS)
	@test -x $(TRITON_PYTHON) || { echo "no $(TRITON_PYTHON): give TRITON_PYTHON=<a Python 3.12 built \
	  with --enable-shared>"; exit 1; }
	@ls $(dir $(TRITON_PYTHON))../lib/libpython3*.so >/dev/null 2>&1 || { echo "$(TRITON_PYTHON) has no \
	  shared libpython in $(dir $(TRITON_PYTHON))../lib: tritonserver's Python stub needs one"; exit 1; }
	$(TRITON_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet -c constraints.txt nvidia-pytriton numpy pillow \
	  onnxruntime==$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)')
	touch $@

# The data path's levers (uint8 input head, top-k in the graph, IO binding, fp16) and /score_map end to
# end vs model time, in one run (~5 min on 2 cores): results/datapath/. On a GPU machine (the `gpu`
# extra): make bench-datapath BENCH_DATAPATH_ARGS="--provider cuda".
BENCH_DATAPATH_ARGS ?= --provider auto
bench-datapath: install
	$(call need_models,$(SHIPPED))
	$(PY) -m bench.datapath --out results/datapath $(BENCH_DATAPATH_ARGS)

# The store's latest default models as the shipped exports (what `make artifacts` ends with); the
# Docker image bakes them in (see the Dockerfile).
bentomodels: $(VENV)/.installed-$(SERVE_EXTRAS)
	$(write_exports)

# The serving image (CPU, no torch, the shipped models baked in) with podman or docker, whichever is
# here (podman first). BASE: the image to build on (default: the Dockerfile's, the official Python
# slim image); the tests build on a debootstrap Debian base (tests/containers.py). VARIANT is given
# explicitly: podman 4.3's buildah ignores a global ARG's default in `FROM base-${VARIANT}`. podman
# writes OCI images unless told `--format docker`, which keeps the HEALTHCHECK. The build's pip
# trusts what pip trusts here ($PIP_CERT, else the system's CA bundle, which holds a TLS-inspecting
# proxy's CA where there is one) through a build secret.
# --force-rm: a failed step leaves no build container behind. IMAGE_EXTRAS: what the image installs
# (cpu,ray for deploy/ray/rayjob.yaml; gpu-pip: onnxruntime-gpu with NVIDIA's libraries from PyPI).
ENGINE ?= $(firstword $(foreach e,podman docker,$(if $(shell command -v $(e)),$(e))))
IMAGE  ?= convserve:latest
IMAGE_EXTRAS ?= cpu
BUILD_CA ?= $(or $(PIP_CERT),$(wildcard /etc/ssl/certs/ca-certificates.crt))
image:
	@test -n "$(ENGINE)" || { echo "make image needs podman or docker"; exit 1; }
	$(ENGINE) build --network=host --force-rm --build-arg VARIANT=cpu --build-arg EXTRAS=$(IMAGE_EXTRAS) \
	  $(if $(BASE),--build-arg BASE=$(BASE)) \
	  $(if $(filter podman,$(ENGINE)),--format docker) \
	  $(if $(BUILD_CA),--secret id=pip-cert$(comma)src=$(BUILD_CA)) -t $(IMAGE) .
	$(ENGINE) images $(IMAGE)

clean:
	rm -rf $(VENV) $(TRITON_VENV) artifacts results .pytest_cache

# The gRPC front's generated code (service/fronts/triton_proto/, committed): Triton's protos, vendored
# as they are, compiled by grpcio-tools, their imports made package-absolute (protoc writes
# `import model_config_pb2`, which only works with that folder on sys.path).
PROTO_DIR := service/fronts/triton_proto
proto: install
	cd $(PROTO_DIR) && ../../../$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
	  grpc_service.proto model_config.proto && rm -f model_config_pb2_grpc.py
	sed -i 's/^import \(model_config_pb2\|grpc_service_pb2\) as/from service.fronts.triton_proto import \1 as/' \
	  $(PROTO_DIR)/grpc_service_pb2.py $(PROTO_DIR)/grpc_service_pb2_grpc.py
