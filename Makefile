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
SHARD_DIR := shards
demo: $(STAMP)
	$(BIN)/xd-synth all --out $(DEMO_DIR) --size small --seed 0
	$(BIN)/xd-shard --dataset imagenet --src $(DEMO_DIR)/imagenet --out $(SHARD_DIR)/imagenet
	$(BIN)/xd-shard --dataset chestxray8 --src $(DEMO_DIR)/chestxray8 --out $(SHARD_DIR)/chestxray8 --size 128
	$(BIN)/xd-shard --dataset brats --src $(DEMO_DIR)/brats --out $(SHARD_DIR)/brats
	$(BIN)/xd-shard --dataset lits --src $(DEMO_DIR)/lits-nifti --out $(SHARD_DIR)/lits
	$(BIN)/xd-shard verify $(SHARD_DIR)/brats
	$(BIN)/python -m xdtrain.data configs/demo/pt_simclr_imagenet.yaml --set data.shards=$(SHARD_DIR)/imagenet
	@echo "demo: raw data sets in $(DEMO_DIR)/, shards in $(SHARD_DIR)/ (xd-shard info $(SHARD_DIR)/<name>)"

clean-demo:
	rm -rf $(DEMO_DIR) $(SHARD_DIR)/imagenet $(SHARD_DIR)/chestxray8 $(SHARD_DIR)/brats $(SHARD_DIR)/lits
