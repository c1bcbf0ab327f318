# Two commands on a fresh machine: `make serve` and `make test`. Each creates .venv itself.
# Every pip install goes through constraints.txt, which pins torch to its CPU wheel.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet -c constraints.txt
PORT   ?= 3000
export BENTOML_DO_NOT_TRACK := true
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install test lint artifacts clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[cpu,train,dev]'
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

clean:
	rm -rf $(VENV) artifacts results .pytest_cache
