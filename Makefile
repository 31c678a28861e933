# make demo   run CustomCNN.ipynb headless on real CIFAR-10 with quick settings
# make test   unit tests + every notebook in quick mode (offline, generated data)
# make lab    JupyterLab on the notebooks
# Each target creates .venv and installs requirements-dev.txt first when needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(CURDIR)/data
MODEL_DIR ?= $(CURDIR)/model
# demo settings: passes over the data, and images per split
DEMO_EPOCHS ?= 1
DEMO_SUBSET ?= 2000

.PHONY: demo test lab

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(BIN)/.installed
	mkdir -p build
	EPOCHS=$(DEMO_EPOCHS) SUBSET=$(DEMO_SUBSET) DATA_DIR=$(DATA_DIR) MODEL_DIR=$(MODEL_DIR) \
	  $(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	  --output-dir build notebooks/CustomCNN.ipynb
	@echo
	@$(BIN)/python -c "import json, sys; h = json.load(open(sys.argv[1])); print('test accuracy:            ' + format(h['test_acc'][-1], '.2%'), 'after', len(h['epoch']), 'epoch(s) on', h['info']['train_images'], 'training images,', round(h['seconds'][-1]), 's per epoch')" $(MODEL_DIR)/CustomCNN_best_history.json
	@echo "executed notebook:        build/CustomCNN.ipynb   (open it with: make lab)"
	@echo "checkpoints and history:  $$(ls $(MODEL_DIR)/CustomCNN*.pth $(MODEL_DIR)/CustomCNN*.json | tr '\n' ' ')"
	@echo "plots:                    $$(ls $(MODEL_DIR)/CustomCNN*.png | tr '\n' ' ')"
	@echo "TensorBoard logs:         runs/   (tensorboard --logdir runs)"

test: $(BIN)/.installed
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env

lab: $(BIN)/.installed
	$(BIN)/jupyter lab notebooks
