VENV := .venv
STAMP := $(VENV)/.fedkit-setup

.PHONY: setup demo test bench

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

# until `fedkit demo` lands, the main job is the centralized baseline
demo: setup
	$(VENV)/bin/fedkit train-central

test: setup
	$(VENV)/bin/python -m pytest

bench: setup
	for b in benchmarks/*.py; do $(VENV)/bin/python $$b || exit 1; done
