# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.selfsup-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
TIMESTAMP := $(shell date +%Y%m%d-%H%M%S)
RUN_DIR ?= runs/demo-$(TIMESTAMP)
# DEMO_PRESET unset: simclr-fmnist with a GPU, else simclr-fmnist-cpu (2 cores, <= 15 minutes).
DEMO_PRESET ?=

.PHONY: demo test install data clean gpu-bundle

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST: Debian's package where we can install it; otherwise selfsup searches data.root,
# $$SELFSUP_DATA and tries torchvision's download (data.download=true), naming every path it tried.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -n "$$SELFSUP_DATA" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) || \
	  echo "could not apt-get dataset-fashion-mnist; the run will try torchvision's download"; \
	else echo "Fashion-MNIST not in $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist' or set SELFSUP_DATA=DIR"; fi

demo: $(STAMP) data
	@preset="$(DEMO_PRESET)"; \
	[ -n "$$preset" ] || preset=$$($(PY) -c "import torch; print('simclr-fmnist' if torch.cuda.is_available() else 'simclr-fmnist-cpu')"); \
	echo "selfsup train $$preset run_dir=$(RUN_DIR)"; \
	$(VENV)/bin/selfsup train $$preset run_dir=$(RUN_DIR) $(if $(SELFSUP_DATA),,$(if $(wildcard $(FMNIST_DIR)/*),,data.download=true))
	$(VENV)/bin/selfsup eval knn --run $(RUN_DIR) --baselines
	$(VENV)/bin/selfsup visualize --run $(RUN_DIR) --method tsne --max-points 2000
	$(VENV)/bin/selfsup report --run $(RUN_DIR)
	@echo "run directory: $(RUN_DIR)"
	@echo "report: $(RUN_DIR)/report.html (and report.md)"

# The layer contract (pyproject.toml, import-linter), then the suite. The suite is hermetic: it never
# reads the machine's datasets or the network (tests/conftest.py hides both).
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

# For an offline GPU machine that has its own torch (benchmarks/gpu.sh runs there without a venv): on a
# networked machine, gather the pure-Python wheels it lacks and Fashion-MNIST's four .gz files into
# $(BUNDLE) (ignored, about 31 MiB); carry that folder to the GPU machine and run `bash benchmarks/gpu.sh`.
BUNDLE ?= bundle/gpu
BUNDLE_WHEELS ?= omegaconf tqdm
gpu-bundle: data
	@src=$(FMNIST_DIR); [ -f $$src/train-images-idx3-ubyte.gz ] || src="$$SELFSUP_DATA"; \
	[ -n "$$src" ] && [ -f "$$src/train-images-idx3-ubyte.gz" ] || \
	  { echo "gpu-bundle: no Fashion-MNIST .gz files in $(FMNIST_DIR) or \$$SELFSUP_DATA"; exit 2; }; \
	rm -rf $(BUNDLE) && mkdir -p $(BUNDLE)/wheels $(BUNDLE)/fashion-mnist && \
	cp "$$src"/*-ubyte.gz $(BUNDLE)/fashion-mnist/ && \
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --dest $(BUNDLE)/wheels $(BUNDLE_WHEELS) && \
	du -sh $(BUNDLE) && ls $(BUNDLE)/wheels

clean:
	rm -rf $(VENV) runs build *.egg-info
