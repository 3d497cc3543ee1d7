# One way to do each thing. `make demo` runs the proxy offline; `make test` runs the whole test suite.
# Every install comes from the lock files (exact versions, checked by hash); `make lock` is the one way to change them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=
PORT ?= 8080
# pip-tools, itself pinned: only `make lock` uses it, in a venv of its own
PIP_TOOLS := pip-tools==7.7.0
LOCK_FLAGS := --generate-hashes --allow-unsafe --strip-extras --all-build-deps --no-emit-index-url --no-emit-find-links
# a requirements file has no build backend of its own (every package in that lock installs from a wheel)
INF_LOCK_FLAGS := $(filter-out --all-build-deps,$(LOCK_FLAGS))

.PHONY: install infinity demo test lint bench lock lock-upgrade

# The lock holds the build backend too (setuptools), so the editable install builds without fetching anything
# unpinned; --no-deps: every dependency already came from the lock.
$(BIN)/.installed: pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements-dev.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

# The real Infinity server (CPU) and its model, for tests/test_infinity_real.py: a venv of its own, since its
# dependencies (torch, transformers) have nothing to do with the proxy's. Its lock pins torch's local CPU build.
INF_VENV := .infvenv
$(INF_VENV)/.installed: tests/infinity/requirements.lock
	test -x $(INF_VENV)/bin/python || $(PYTHON) -m venv $(INF_VENV)
	$(INF_VENV)/bin/python -m pip install -q --require-hashes --no-deps -r tests/infinity/requirements.lock
	touch $@

infinity: $(INF_VENV)/.installed

demo: install
	$(BIN)/embedding-proxy serve --demo --port $(PORT)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy

# Starts its own redis-server, mock upstream, proxy and baselines on 127.0.0.1; see BENCHMARKS.md.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# Writes both lock files from pyproject.toml: requirements-dev.lock (CI, make: the app, [otel] and [dev]) and
# requirements.lock (the image: the app and [otel]), the second constrained by the first so the two never disagree;
# and the test Infinity server's, tests/infinity/requirements.lock from tests/infinity/requirements.in.
# `make lock` keeps every pin it can and resolves only what pyproject's changes need (a dependency added, removed or
# re-ranged); `make lock-upgrade` re-resolves everything to the newest versions pyproject allows. Review the diff and
# run CI before merging either.
LOCK_UPGRADE ?=
lock:
	test -x .lockvenv/bin/pip-compile || ($(PYTHON) -m venv .lockvenv && .lockvenv/bin/pip install -q '$(PIP_TOOLS)')
	.lockvenv/bin/pip-compile -q $(LOCK_FLAGS) $(LOCK_UPGRADE) --extra otel --extra dev -o requirements-dev.lock pyproject.toml
	.lockvenv/bin/pip-compile -q $(LOCK_FLAGS) $(LOCK_UPGRADE) --extra otel -c requirements-dev.lock -o requirements.lock pyproject.toml
	.lockvenv/bin/pip-compile -q $(INF_LOCK_FLAGS) $(LOCK_UPGRADE) -o tests/infinity/requirements.lock tests/infinity/requirements.in

lock-upgrade:
	$(MAKE) lock LOCK_UPGRADE=--upgrade
