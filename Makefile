# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-slow lint bench zoo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from the local wheel first; an existing torch is left alone.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The dashboard's browser tests drive Debian's Chromium (never a downloaded browser).
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)
	# `docker compose config` checks docker-compose.yml; no Docker engine is needed for it.
	docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || \
		(apt-get update -q && apt-get install -y -q docker-compose) || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/evomerge demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.coordinator
	$(BIN)/python -m benchmarks.merge_build --small
	$(BIN)/python -m benchmarks.trial

zoo: $(STAMP)
	$(BIN)/evomerge zoo build

clean:
	rm -rf $(VENV) build *.egg-info
