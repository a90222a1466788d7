# xdtrain: `make demo` and `make test` are the two set-up commands; both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the package metadata changes. The demo needs the package; the tests
# add their extra (pytest, ruff, MONAI and MLflow as references).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# No wheel cache: the environment is several GB already (torch's CUDA build). Byte-code is
# compiled at install (about 45 s of CPU): where PYTHONDONTWRITEBYTECODE is set, as in many
# containers and CI images, Python would otherwise compile torch again in every process
# (about 6 s each; the demo starts about 30 processes, the tests many more).
PIP := $(BIN)/python -m pip install --quiet --no-cache-dir

.PHONY: install test lint demo clean-demo

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) -e '.[test]'
	@touch $(TEST_STAMP)

install: $(STAMP)

lint: $(TEST_STAMP)
	$(BIN)/ruff check xdtrain tests tools
	$(BIN)/ruff format --check xdtrain tests tools

test: lint
	$(BIN)/python -m pytest -q

# The whole study in miniature on generated data: raw data sets in the real layouts, shards,
# SimCLR pretraining on ImageNet, each task finetuned from scratch and from that encoder,
# and the study's CT arm: a generated hospital export (DICOM) packed with pseudonyms,
# SimCLR pretraining on it, its classification task finetuned from scratch, from the
# ImageNet encoder (cross-domain) and from the CT encoder (intra-domain); every finetuning
# with each seed of SEEDS, so that the report shows mean +- std over seeds and Welch's p.
# Then the first seed's runs scored by xd-eval (per-case tables and figures), the
# feature-space analysis (CKA, probes, domain maps) and the pretraining x task report.
# Budgets are shortened with --set so that the whole flow fits in minutes on two CPU
# cores (the feature-space analysis on 256 samples per data set, not 512 and 1,024);
# configs/demo/base.yaml keeps the checkpoints a finished demo run needs only.
DEMO_DIR := datasets
SHARD_DIR := shards
RUNS := checkpoints/demo
REPORT := report/demo
SEEDS := 0 1
FIRST_SEED := $(firstword $(SEEDS))
DEMO_TASKS := imagenet chestxray8 brats lits
EPOCHS_imagenet := 2
EPOCHS_chestxray8 := 3
EPOCHS_lits := 8
# BraTS: smaller batches (more steps) let both runs leave the all-background start in time
ARGS_brats := --set data.batch_size=16
EPOCHS_brats := 4
EPOCHS_ct := 2
# The demo's pseudonym key: beside the raw data, never inside the export or the shards
KEY := $(DEMO_DIR)/pseudonym.key
# xd-train TASK PRETRAIN EPOCHS ARGS: one cell of the grid, every seed in one process
define finetune
$(BIN)/xd-train configs/demo/ft_$(1).yaml --resume --seeds $(SEEDS) --set train.epochs=$(3) $(4) \
  --set run.name=ft_$(1)_$(2) \
  $(if $(filter scratch,$(2)),,--set model.encoder_weights=$(RUNS)/pt_$(subst -,_,$(2))/encoder.pt)

endef
demo: $(STAMP)
	$(BIN)/xd-synth imagenet --out $(DEMO_DIR) --count 100 --seed 0
	$(BIN)/xd-synth chestxray8 --out $(DEMO_DIR) --count 800 --seed 0
	$(BIN)/xd-synth brats --out $(DEMO_DIR) --count 16 --seed 0
	$(BIN)/xd-synth lits-nifti --out $(DEMO_DIR) --count 16 --seed 0
	$(BIN)/xd-synth dicom --out $(DEMO_DIR) --count 30 --seed 0
	$(BIN)/xd-shard --dataset imagenet --src $(DEMO_DIR)/imagenet --out $(SHARD_DIR)/imagenet
	$(BIN)/xd-shard --dataset chestxray8 --src $(DEMO_DIR)/chestxray8 --out $(SHARD_DIR)/chestxray8 --size 128
	$(BIN)/xd-shard --dataset brats --src $(DEMO_DIR)/brats --out $(SHARD_DIR)/brats
	$(BIN)/xd-shard --dataset lits --src $(DEMO_DIR)/lits-nifti --out $(SHARD_DIR)/lits
	$(BIN)/xd-shard --dataset dicom --src $(DEMO_DIR)/dicom --out $(SHARD_DIR)/ct --size 64 \
	  --labels $(DEMO_DIR)/dicom/labels.csv --key-file $(KEY)
	$(BIN)/xd-shard verify $(SHARD_DIR)/brats
	$(BIN)/xd-train configs/demo/pt_simclr_imagenet.yaml --resume --set train.epochs=2
	$(BIN)/xd-train configs/demo/pt_simclr_ct.yaml --resume --set train.epochs=2
	$(foreach task,$(DEMO_TASKS),$(foreach pre,scratch simclr-imagenet,\
	  $(call finetune,$(task),$(pre),$(EPOCHS_$(task)),$(ARGS_$(task)))))
	$(foreach pre,scratch simclr-imagenet simclr-ct,$(call finetune,ct,$(pre),$(EPOCHS_ct),))
	$(BIN)/xd-eval $(RUNS)/ft_*_s$(FIRST_SEED) --split test > /dev/null
	$(BIN)/xd-analyze grid $(RUNS) --out $(REPORT)/analysis --samples 256 --train-samples 256
	$(BIN)/xd-report $(RUNS) --out $(REPORT)
	@echo "demo: data in $(DEMO_DIR)/ and $(SHARD_DIR)/, runs in $(RUNS)/, report in $(REPORT)/ (results.md, heatmap.png, curves.png, analysis/)"

clean-demo:
	rm -rf $(DEMO_DIR) $(SHARD_DIR)/imagenet $(SHARD_DIR)/chestxray8 $(SHARD_DIR)/brats $(SHARD_DIR)/lits \
	  $(SHARD_DIR)/ct $(RUNS) $(REPORT)
