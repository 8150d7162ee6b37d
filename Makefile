# The two README commands: `make serve` and `make test`. Everything else is a helper.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# The CPU torch wheel lies on this machine's disk; pip finds it through find-links when the folder exists.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
EXTRAS ?= cpu,dev
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint eval bench fuzz clean models

$(BIN)/.installed: pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so nothing later resolves a multi-GB CUDA build.
	$(PIP) install -q $(WHEELS) torch==2.13.0
	$(PIP) install -q $(WHEELS) -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/nccr-guard serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/ruff check service tests bench models
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check service tests bench models

models: install
	$(BIN)/python models/mnist/train.py
	$(BIN)/nccr-guard calibrate --model models/mnist

eval: install
	$(BIN)/nccr-guard evaluate --model models/mnist --out reports/mnist --seed 0

bench: install
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
