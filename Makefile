# One way to do each thing. `make demo` runs the proxy offline; `make test` runs the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install demo test lint bench

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/embedding-proxy serve --demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy

# Starts its own redis-server, mock upstream, proxy and baselines on 127.0.0.1; see BENCHMARKS.md.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)
