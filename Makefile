# xdtrain: `make demo` and `make test` are the two set-up commands; both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the package metadata changes.
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean-demo

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# no wheel cache: the environment is several GB already (torch's CUDA build)
	$(BIN)/python -m pip install --quiet --no-cache-dir -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check xdtrain tests tools
	$(BIN)/ruff format --check xdtrain tests tools

test: lint
	$(BIN)/python -m pytest -q

# The whole study in miniature on generated data: raw data sets in the real layouts, shards,
# SimCLR pretraining on ImageNet, each task finetuned from scratch and from that encoder,
# and the study's CT arm: a generated hospital export (DICOM) packed with pseudonyms,
# SimCLR pretraining on it, its classification task finetuned from scratch, from the
# ImageNet encoder (cross-domain) and from the CT encoder (intra-domain); then test-split
# evaluation, the feature-space analysis (CKA, probes, domain maps) and the pretraining x
# task report. Budgets are shortened with --set
# so that the whole flow fits in minutes on two CPU cores.
DEMO_DIR := datasets
SHARD_DIR := shards
RUNS := checkpoints/demo
REPORT := report/demo
DEMO_TASKS := imagenet chestxray8 brats lits
EPOCHS_imagenet := 3
EPOCHS_chestxray8 := 4
EPOCHS_lits := 10
# BraTS: smaller batches (more steps) let both runs leave the all-background start in time
ARGS_brats := --set data.batch_size=16
EPOCHS_brats := 9
EPOCHS_ct := 2
# The demo's pseudonym key: beside the raw data, never inside the export or the shards
KEY := $(DEMO_DIR)/pseudonym.key
demo: $(STAMP)
	$(BIN)/xd-synth imagenet --out $(DEMO_DIR) --count 150 --seed 0
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
	$(BIN)/xd-train configs/demo/pt_simclr_imagenet.yaml --resume --set train.epochs=3
	$(BIN)/xd-train configs/demo/pt_simclr_ct.yaml --resume --set train.epochs=3
	@for task in $(DEMO_TASKS); do \
	  case $$task in imagenet) e=$(EPOCHS_imagenet); x="";; \
	    chestxray8) e=$(EPOCHS_chestxray8); x="";; \
	    brats) e=$(EPOCHS_brats); x="$(ARGS_brats)";; lits) e=$(EPOCHS_lits); x="";; esac; \
	  set -e; \
	  echo "== $$task from scratch, then from the SimCLR encoder ($$e epochs)"; \
	  $(BIN)/xd-train configs/demo/ft_$$task.yaml --resume --set train.epochs=$$e $$x \
	    --set run.name=ft_$${task}_scratch; \
	  $(BIN)/xd-train configs/demo/ft_$$task.yaml --resume --set train.epochs=$$e $$x \
	    --set run.name=ft_$${task}_simclr-imagenet \
	    --set model.encoder_weights=$(RUNS)/pt_simclr_imagenet/encoder.pt; \
	  $(BIN)/xd-eval $(RUNS)/ft_$${task}_scratch --split test > /dev/null; \
	  $(BIN)/xd-eval $(RUNS)/ft_$${task}_simclr-imagenet --split test > /dev/null; \
	done
	@echo "== ct (the hospital's own task) from scratch, from the ImageNet and from the CT encoder"
	@set -e; for pre in scratch simclr-imagenet simclr-ct; do \
	  case $$pre in scratch) w="";; *) w="--set model.encoder_weights=$(RUNS)/pt_simclr_$${pre#simclr-}/encoder.pt";; esac; \
	  $(BIN)/xd-train configs/demo/ft_ct.yaml --resume --set train.epochs=$(EPOCHS_ct) \
	    --set run.name=ft_ct_$$pre $$w; \
	  $(BIN)/xd-eval $(RUNS)/ft_ct_$$pre --split test > /dev/null; \
	done
	$(BIN)/xd-analyze grid $(RUNS) --out $(REPORT)/analysis
	$(BIN)/xd-report $(RUNS) --out $(REPORT)
	@echo "demo: data in $(DEMO_DIR)/ and $(SHARD_DIR)/, runs in $(RUNS)/, report in $(REPORT)/ (results.md, heatmap.png, curves.png, analysis/)"

clean-demo:
	rm -rf $(DEMO_DIR) $(SHARD_DIR)/imagenet $(SHARD_DIR)/chestxray8 $(SHARD_DIR)/brats $(SHARD_DIR)/lits \
	  $(SHARD_DIR)/ct $(RUNS) $(REPORT)
