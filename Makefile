# xdtrain: `make demo` and `make test` are the two set-up commands; both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the package metadata changes. The demo needs the package; the tests
# add their extra (pytest, ruff, MONAI and MLflow as references).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# No wheel cache: the environment is several GB already (torch's CUDA build). No byte-code
# compiled at install (on two cores the install took 83 s without it and 112 s with it, the
# latter beside an apt-get): Python writes it at the first import of each module, so the
# demo pays only for what it imports. Where PYTHONDONTWRITEBYTECODE is set, as in many
# containers and CI images, nothing would be written and every process would compile torch
# again (about 5 s each; the demo starts about 30 processes, the tests many more): make's
# commands run without it.
PIP := $(BIN)/python -m pip install --quiet --no-cache-dir --no-compile
unexport PYTHONDONTWRITEBYTECODE

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
#
# The demo is a jobs file run by xd-queue, as a study's grid is: each command starts once
# what it reads is written (xd-queue infers the order from the paths), DEMO_SLOTS at a time,
# each with its share of the CPU cores (two jobs of one PyTorch thread each finish the grid
# about a fifth sooner than one job of two threads on two cores: docs/benchmarks.md). The
# terminal shows each job as it starts and ends; every job's output, as a job log, is in
# $(DEMO_JOBS).logs/.
# The file, in the runs' folder, keeps each job's status: `make demo` again, after a stop
# or a failure, runs what is not done (an interrupted xd-train resumes); it is written anew
# when the commands change. After editing configs/demo/, make clean-demo first.
DEMO_DIR := datasets
SHARD_DIR := shards
RUNS := checkpoints/demo
REPORT := report/demo
DEMO_JOBS := $(RUNS)/jobs.csv
DEMO_SLOTS := 2
SEEDS := 0 1
FIRST_SEED := $(firstword $(SEEDS))
DEMO_TASKS := brats lits chestxray8 imagenet
# Epochs per task: at LiTS 8 and BraTS 4 one seed in four still ended at its trivial start
# (Dice 0 or below 0.5); at 12 and 6 every run of both seeds had left it
EPOCHS_imagenet := 2
EPOCHS_chestxray8 := 3
EPOCHS_lits := 12
# BraTS: smaller batches (more steps) let both runs leave the all-background start in time
ARGS_brats := --set data.batch_size=16
EPOCHS_brats := 6
EPOCHS_ct := 2
# The demo's pseudonym key: beside the raw data, never inside the export or the shards
KEY := $(DEMO_DIR)/pseudonym.key
space := $(subst ,, )
# finetune TASK PRETRAIN: one cell of the grid, every seed in one process
finetune = xd-train configs/demo/ft_$(1).yaml --resume --seeds $(SEEDS) \
  --set train.epochs=$(EPOCHS_$(1)) $(ARGS_$(1)) --set run.name=ft_$(1)_$(2)\
  $(if $(filter scratch,$(2)),, --set model.encoder_weights=$(RUNS)/pt_$(subst -,_,$(2))/encoder.pt)
FIRST_RUNS = $(foreach task,$(DEMO_TASKS),$(foreach pre,scratch simclr-imagenet,\
  $(RUNS)/ft_$(task)_$(pre)_s$(FIRST_SEED))) $(foreach pre,scratch simclr-imagenet simclr-ct,\
  $(RUNS)/ft_ct_$(pre)_s$(FIRST_SEED))
# the jobs, one per line, in the order they start when several are ready (longest first)
DEMO_COMMANDS = \
  xd-synth imagenet --out $(DEMO_DIR) --count 100 --seed 0 \
  @xd-synth dicom --out $(DEMO_DIR) --count 30 --seed 0 \
  @xd-synth chestxray8 --out $(DEMO_DIR) --count 800 --seed 0 \
  @xd-synth brats --out $(DEMO_DIR) --count 16 --seed 0 \
  @xd-synth lits-nifti --out $(DEMO_DIR) --count 16 --seed 0 \
  @xd-shard --dataset imagenet --src $(DEMO_DIR)/imagenet --out $(SHARD_DIR)/imagenet \
  @xd-shard --dataset dicom --src $(DEMO_DIR)/dicom --out $(SHARD_DIR)/ct --size 64 \
    --labels $(DEMO_DIR)/dicom/labels.csv --key-file $(KEY) \
  @xd-shard --dataset chestxray8 --src $(DEMO_DIR)/chestxray8 --out $(SHARD_DIR)/chestxray8 --size 128 \
  @xd-shard --dataset brats --src $(DEMO_DIR)/brats --out $(SHARD_DIR)/brats \
  @xd-shard --dataset lits --src $(DEMO_DIR)/lits-nifti --out $(SHARD_DIR)/lits \
  @xd-shard verify $(SHARD_DIR)/brats \
  @xd-train configs/demo/pt_simclr_imagenet.yaml --resume --set train.epochs=2 \
  @xd-train configs/demo/pt_simclr_ct.yaml --resume --set train.epochs=2 \
  $(foreach pre,scratch simclr-imagenet,$(foreach task,$(DEMO_TASKS) ct,@$(call finetune,$(task),$(pre)))) \
  @$(call finetune,ct,simclr-ct) \
  @xd-analyze grid $(RUNS) --out $(REPORT)/analysis --samples 256 --train-samples 256 \
  @xd-eval $(FIRST_RUNS) --split test \
  @xd-report $(RUNS) --out $(REPORT)

demo: $(STAMP)
	@mkdir -p $(dir $(DEMO_JOBS))
	@printf '%s\n' command,status '$(subst $(space)@,' ',$(strip $(DEMO_COMMANDS)))' > $(DEMO_JOBS).new
	@if [ -f $(DEMO_JOBS) ] && [ "$$(cut -d, -f1 $(DEMO_JOBS))" = "$$(cut -d, -f1 $(DEMO_JOBS).new)" ]; \
	then rm $(DEMO_JOBS).new; else mv $(DEMO_JOBS).new $(DEMO_JOBS) && rm -rf $(DEMO_JOBS).logs; fi
	$(BIN)/xd-queue $(DEMO_JOBS) --jobs $(DEMO_SLOTS)
	@test -f $(REPORT)/results.md || { echo "demo: $(DEMO_JOBS) says every job is done, but \
	$(REPORT)/results.md is missing (deleted by hand?): make clean-demo, then make demo" >&2; exit 1; }
	@echo "demo: data in $(DEMO_DIR)/ and $(SHARD_DIR)/, runs in $(RUNS)/, report in $(REPORT)/ (results.md, heatmap.png, curves.png, analysis/); job logs in $(DEMO_JOBS).logs/"

clean-demo:
	rm -rf $(DEMO_DIR) $(SHARD_DIR)/imagenet $(SHARD_DIR)/chestxray8 $(SHARD_DIR)/brats $(SHARD_DIR)/lits \
	  $(SHARD_DIR)/ct $(RUNS) $(REPORT)
