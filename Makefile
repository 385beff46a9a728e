VENV := .venv
STAMP := $(VENV)/.fedkit-setup

.PHONY: setup demo test lint bench

$(STAMP): pyproject.toml setup.py device_runtime/_kernels.c scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/fedkit demo

test: setup
	$(VENV)/bin/python -m pytest

# The settings are in pyproject.toml: [tool.ruff] and [tool.mypy].
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	for b in benchmarks/*.py; do $(VENV)/bin/python $$b || exit 1; done
