# make demo   the main job: Speedrun.ipynb headless on real CIFAR-10 at a budget of about five minutes on a 2-core CPU
# make test   unit tests + every notebook in quick mode (offline, generated data)
# make lab    JupyterLab in the repository (notebooks/, and build/ for the demo's executed copy)
# Each target creates .venv and installs requirements-dev.txt first when needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(CURDIR)/data
MODEL_DIR ?= $(CURDIR)/model
RUNS_DIR ?= $(CURDIR)/runs
# the notebook runs in notebooks/: a relative path given here must still mean the same folder
override DATA_DIR := $(abspath $(DATA_DIR))
override MODEL_DIR := $(abspath $(MODEL_DIR))
override RUNS_DIR := $(abspath $(RUNS_DIR))
# demo settings: the notebook, its epochs (Speedrun: the five-minute budget; empty: the notebook's
# own recipe), and images per split (0 = all)
DEMO_NOTEBOOK ?= Speedrun
DEMO_EPOCHS ?= $(if $(filter Speedrun,$(DEMO_NOTEBOOK)),3,)
DEMO_SUBSET ?= 0

.PHONY: demo test lab

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(BIN)/.installed
	mkdir -p build
	SUBSET=$(DEMO_SUBSET) DATA_DIR=$(DATA_DIR) MODEL_DIR=$(MODEL_DIR) RUNS_DIR=$(RUNS_DIR) \
	  $(BIN)/papermill notebooks/$(DEMO_NOTEBOOK).ipynb build/$(DEMO_NOTEBOOK).ipynb --cwd notebooks \
	  $(if $(DEMO_EPOCHS),-p EPOCHS $(DEMO_EPOCHS))
	@echo
	@$(BIN)/python -c "import sys, utils; h = utils.History.from_json(sys.argv[1]); \
	  print(f'test accuracy:            {h.test_acc:.2%} (the epoch validation chose: {h.best_epoch} of {len(h)}, val {h.best_val_acc:.2%}),', \
	        f'{h.info[\"train_images\"]:,} training images, {sum(h.seconds) / len(h):.0f} s per epoch')" \
	  $(MODEL_DIR)/$(DEMO_NOTEBOOK)_history.json
	@echo "executed notebook:        build/$(DEMO_NOTEBOOK).ipynb   (open it with: make lab)"
	@echo "checkpoints and history:  $$(ls $(MODEL_DIR)/$(DEMO_NOTEBOOK)*.pth $(MODEL_DIR)/$(DEMO_NOTEBOOK)*.json | tr '\n' ' ')"
	@echo "plots:                    $$(ls $(MODEL_DIR)/$(DEMO_NOTEBOOK)*.png | tr '\n' ' ')"
	@echo "TensorBoard logs:         $(RUNS_DIR)/   ($(BIN)/tensorboard --logdir $(RUNS_DIR))"

test: $(BIN)/.installed
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env

lab: $(BIN)/.installed
	$(BIN)/jupyter lab
