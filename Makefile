# DeepKD-Det: two commands on a fresh machine: `make demo` and `make test`
# (each runs `make setup` first when needed).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build to install. Override for another platform or CUDA version, e.g.
#   make setup TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.deepkd-setup.stamp
PYTEST_ARGS ?=

.PHONY: setup test lint demo demo-quick demo-cls demo-cls-quick demo-seg demo-seg-quick bench bench-quick gpu-check gpu-check-offline gpu-kit gpu-setup env clean-venv help

help:
	@echo "make setup        create $(VENV): torch, detectron2 (see docs/install.md), deepkd_det"
	@echo "make test         run the test suite"
	@echo "make demo         detection demo on the embedded shapes: 10 labelled images, teacher saw 300 (vanilla, KD, DKD, DeepKD; 3 seeds)"
	@echo "make demo-cls     classification demo on the digits: 5 labels per class, teacher saw all (vanilla, KD, DKD, DeepKD, DOT; 3 seeds)"
	@echo "make demo-seg     segmentation demo on generated scenes: students see 6, teacher saw 300 (vanilla, KD, DKD, DiffKD, each +DeepKD; 3 seeds)"
	@echo "make bench        benchmarks (one JSON object per line)"
	@echo "make gpu-check    on a machine with one CUDA GPU: CUDA tests, CUDA training, GPU benchmarks"
	@echo "make gpu-kit      build .gpukit/ (offline wheels + detectron2) for a bare, offline GPU machine"
	@echo "make gpu-setup    on that machine: install from .gpukit/ without the network"
	@echo "make gpu-check-offline  the GPU check after gpu-setup (no make setup)"
	@echo "make lint         ruff"
	@echo "make env          print versions and the detectron2 install route"

setup: $(STAMP)

# Re-run only when the project's dependency list or the installer changes: a second
# `make setup` is a no-op.
$(STAMP): pyproject.toml tools/install_detectron2.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[dev]"
	$(PY) tools/install_detectron2.py
	$(PY) -m deepkd_det.env
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

demo: setup
	$(PY) tools/det_demo.py

demo-quick: setup
	$(PY) tools/det_demo.py --quick

demo-cls: setup
	$(PY) tools/cls_demo.py

demo-cls-quick: setup
	$(PY) tools/cls_demo.py --quick

demo-seg: setup
	$(PY) tools/seg_demo.py

demo-seg-quick: setup
	$(PY) tools/seg_demo.py --quick

bench: setup
	@for f in bench/bench_*.py; do $(PY) $$f || exit 1; done

bench-quick: setup
	@for f in bench/bench_*.py; do $(PY) $$f --quick || exit 1; done

gpu-check: setup
	PY=$(PY) tools/gpu_check.sh

gpu-check-offline:
	PY=$(PY) tools/gpu_check.sh $(GPU_CHECK_ARGS)

gpu-kit:
	PY=$$(test -x $(PY) && echo $(PY) || echo $(PYTHON)) tools/gpu_kit.sh

gpu-setup:
	PY=$(PYTHON) tools/gpu_setup.sh

env: setup
	$(PY) -m deepkd_det.env

clean-venv:
	rm -rf $(VENV)
