# Two commands on a fresh machine: `make serve` and `make test`. Each creates .venv itself.
# Every pip install goes through constraints.txt, which pins torch to its CPU wheel.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet -c constraints.txt
PORT   ?= 3000
EXTRAS ?= cpu,train,dev,ray
BENTOML := $(VENV)/bin/bentoml
export BENTOML_DO_NOT_TRACK := true
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install test lint artifacts serve loadtest soak bench bentomodels clean

# The Dockerfile runs this same target (VENV=/opt/venv EXTRAS=cpu), so CI exercises its install path.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

# The default models: the digit classifier and the digit detector (with a `background` class).
artifacts: install
	$(PY) -m models.train --name lenet5
	$(PY) -m models.train --background --name digit-detector
	$(PY) -m export --arch lenet5-relu --weights artifacts/lenet5.pt --int8
	$(PY) -m export --arch lenet5-relu --weights artifacts/digit-detector.pt

# Train and export the default models only when the store lacks them; then serve.
serve: install
	@$(BENTOML) models get lenet5:latest >/dev/null 2>&1 && \
	 $(BENTOML) models get digit-detector:latest >/dev/null 2>&1 || $(MAKE) artifacts
	$(BENTOML) serve service.service:ConvServe --port $(PORT)

# Against a running server on 127.0.0.1:$(PORT): bounded, headless; CSV + HTML under results/.
LOADTEST_ARGS ?= --scenario mixed --users 32 --run-time 30
loadtest: install
	$(PY) -m loadtest.run --host http://127.0.0.1:$(PORT) $(LOADTEST_ARGS) --out results/loadtest

# 10 minutes of mixed load on a fresh loopback server; RSS, threads and open files before and after:
# results/soak/soak.md and soak.json. Not part of `make test`. Stop other load on the machine first.
SOAK_ARGS ?= --minutes 10
soak: install
	@$(BENTOML) models get lenet5:latest >/dev/null 2>&1 && \
	 $(BENTOML) models get digit-detector:latest >/dev/null 2>&1 || $(MAKE) artifacts
	$(PY) -m loadtest.soak --out results/soak $(SOAK_ARGS)

# The speed benchmarks of BENCHMARKS.md, side by side in one run (~8 min; AlexNet is exported on first
# use; served load from Debian's wrk): results/bench/report.md and results.json. Stop other load on the
# machine first.
bench: install
	@$(BENTOML) models get lenet5:latest >/dev/null 2>&1 && \
	 $(BENTOML) models get lenet5-int8:latest >/dev/null 2>&1 && \
	 $(BENTOML) models get digit-detector:latest >/dev/null 2>&1 || $(MAKE) artifacts
	$(PY) -m bench --out results/bench $(BENCH_ARGS)

# The stored models as files, for baking into the Docker image (see the Dockerfile).
bentomodels: install
	$(BENTOML) models export lenet5:latest artifacts/lenet5.bentomodel
	$(BENTOML) models export digit-detector:latest artifacts/digit-detector.bentomodel

clean:
	rm -rf $(VENV) artifacts results .pytest_cache
