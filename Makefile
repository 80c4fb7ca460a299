# The README's two set-up commands: `make demo` and `make test`.
# Both create or refresh .venv from the committed uv.lock first.
SHELL := /bin/bash
PYTHON ?= python3
# uv is installed here (with pip) when it is not on PATH.
UV_BOOTSTRAP := $(CURDIR)/.cache/uv-bootstrap
VENV := .venv
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES ?= -1
export RAY_AUTH_MODE ?= disabled
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test bench protos lint clean

venv:
	@if command -v uv >/dev/null 2>&1; then UV=uv; else \
	  UV=$(UV_BOOTSTRAP)/bin/uv; \
	  [ -x $$UV ] || $(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(UV_BOOTSTRAP) uv; \
	fi; \
	$$UV sync --frozen --extra dev --quiet

demo: venv
	$(VENV)/bin/python -m service.demo

test: venv
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup tests

bench: venv
	$(VENV)/bin/python benchmarks/step_cost.py

protos: venv
	$(VENV)/bin/python scripts/gen_protos.py

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache
