#!/usr/bin/env bash
# Installs this project on a bare, offline GPU machine from the kit that `make gpu-kit` built
# (.gpukit/, carried with the working tree), without the network (`pip --no-index`):
#   1. a venv (.venv) over the machine's Python, with its site packages (the CUDA torch,
#      torchvision, numpy, Pillow, matplotlib, opencv, onnx, timm it already has);
#   2. the kit's wheels (detectron2's and this project's dependencies, pytest);
#   3. detectron2: the pure-Python v0.6 (tools/install_detectron2.py --route pypi-fallback, sha256
#      checked; torchvision's CUDA ops serve ROIAlign and NMS, so the GPU check needs no build;
#      a few seconds), or with --build-detectron2 main at the pinned commit built with its CUDA
#      ops (nvcc; several minutes);
#   4. this project, editable, without dependencies or build isolation;
#   5. an import check of the suite (pytest --collect-only).
# Then `make gpu-check-offline` (no `make setup`, which needs the network). Under a minute
# without --build-detectron2. docs/distributed.md ("The GPU machine") has the device call.
#
#   tools/gpu_setup.sh [--build-detectron2]      (PY: the machine's Python, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
KIT="${KIT:-.gpukit}"
BASE="${PY:-python3}"
BUILD=0
[ "${1:-}" = "--build-detectron2" ] && BUILD=1
[ -d "$KIT/wheels" ] || { echo "no $KIT/wheels: build the kit with 'make gpu-kit' and carry $KIT" >&2; exit 1; }
start=$(date +%s)
[ -x .venv/bin/python ] || "$BASE" -m venv --system-site-packages .venv
PY=.venv/bin/python
PIP=("$PY" -m pip install --no-index --find-links "$KIT/wheels" --disable-pip-version-check -q)
"${PIP[@]}" -r "$KIT/requirements.txt"
if [ "$BUILD" = 1 ]; then
  src="$(ls "$KIT"/detectron2/detectron2-*.tar.gz | head -1)"
  tmp="$(mktemp -d)"
  tar -xzf "$src" -C "$tmp"
  "$PY" tools/install_detectron2.py --route git --force --git-url "$tmp/detectron2" \
    --git-commit "$(basename "$src" .tar.gz | sed 's/^detectron2-//')" \
    || "$PY" -m pip install --no-index --no-deps --no-build-isolation "$tmp/detectron2"
else
  "$PY" tools/install_detectron2.py --route pypi-fallback --archive "$KIT/detectron2/pb1-detectron2-0.6.tar.gz" --no-deps
fi
"${PIP[@]}" --no-deps --no-build-isolation -e .
touch .venv/.deepkd-setup.stamp  # `make` targets that depend on setup take this install as it is
"$PY" -m deepkd_det.env
"$PY" -m pytest -q --collect-only -p no:cacheprovider tests > /tmp/deepkd_collect.txt 2>&1 \
  || { tail -20 /tmp/deepkd_collect.txt; exit 1; }
echo "{\"case\": \"gpu_setup\", \"status\": \"passed\", \"seconds\": $(( $(date +%s) - start )), \"collected\": \"$(tail -1 /tmp/deepkd_collect.txt)\"}"
