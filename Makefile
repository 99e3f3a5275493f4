# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := 2.13.0
# Where the CPU wheel of torch lies on the machines that refresh the lock.
TORCH_WHEELS ?= /opt/wheels

.PHONY: demo test test-all test-slow lint bench zoo lock clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# Everything from the lock, hash-checked, nothing resolved here: a fresh machine gets the
	# versions the suite was green on. Torch is not in the lock: each machine keeps its own build
	# (an existing torch is left alone; otherwise the CPU wheel), and its dependencies come from
	# the lock, so installing it fetches nothing else.
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
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
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# CI's share of the slow tests: all but the demo zoo's build (see .ci/run).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not demo_zoo" --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.coordinator
	$(BIN)/python -m benchmarks.merge_build --small
	$(BIN)/python -m benchmarks.trial

zoo: $(STAMP)
	$(BIN)/evomerge zoo build

# Refresh the lock to the newest releases that pyproject.toml's ranges admit. A deliberate
# commit: run `make test-all` on the refreshed lock before committing it. Torch is resolved as
# the CPU wheel, so that its CPU dependencies are locked, and then left out of the file.
lock: $(STAMP)
	echo "torch==$(TORCH)+cpu" > $(VENV)/torch-cpu.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --upgrade \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--find-links $(TORCH_WHEELS) --override $(VENV)/torch-cpu.txt --no-emit-package torch \
		--custom-compile-command "make lock" -o requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info
