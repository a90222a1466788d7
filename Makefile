# xdtrain: `make demo` and `make test` are the two set-up commands; both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the package metadata changes.
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean-demo

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check xdtrain tests tools
	$(BIN)/ruff format --check xdtrain tests tools

test: lint
	$(BIN)/python -m pytest -q

# The end-to-end flow on generated data; it grows as the pipeline does.
DEMO_DIR := datasets
demo: $(STAMP)
	$(BIN)/xd-synth all --out $(DEMO_DIR) --size small --seed 0
	@echo "demo: raw data sets in the real layouts are in $(DEMO_DIR)/"

clean-demo:
	rm -rf $(DEMO_DIR)
