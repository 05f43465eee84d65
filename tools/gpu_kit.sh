#!/usr/bin/env bash
# Builds the offline GPU kit (`make gpu-kit`) in .gpukit/ (git-ignored; under 64 MiB) on a machine
# with the package index, for a bare, offline GPU machine with Python 3.12 + a CUDA torch,
# torchvision, onnx/onnxruntime, timm, opencv and matplotlib (numpy and Pillow come with those):
#   .gpukit/wheels/        Python 3.12 manylinux / pure-Python wheels of every other dependency
#                          (detectron2 v0.6's runtime ones, this project's, pytest), transitive
#                          ones included; sdist-only ones (fvcore, antlr4) built with `pip wheel`
#   .gpukit/requirements.txt  the top-level names tools/gpu_setup.sh installs
#   .gpukit/detectron2/pb1-detectron2-0.6.tar.gz  the sha256-pinned pure-Python v0.6
#                          (tools/install_detectron2.py's pypi-fallback route, no build needed)
#   .gpukit/detectron2/detectron2-<commit>.tar.gz  detectron2 main at the installer's GIT_COMMIT,
#                          for a CUDA build there (tools/gpu_setup.sh --build-detectron2), from
#                          the git repository $D2_REPO (a local mirror or a URL; skipped if unset
#                          and no mirror is found)
#   .gpukit/MANIFEST.txt   every file with its size and sha256
# Then on the GPU machine: tools/gpu_setup.sh, then `make gpu-check-offline` (docs/distributed.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
KIT="${KIT:-.gpukit}"
PYVER="${KIT_PYTHON_VERSION:-3.12}"
COMMIT="$("$PY" -c "import sys; sys.path.insert(0, 'tools'); import install_detectron2 as d; print(d.GIT_COMMIT)")"
D2_REPO="${D2_REPO:-}"
for cand in /work/.mirror/facebookresearch+detectron2/repo; do
  [ -z "$D2_REPO" ] && [ -d "$cand" ] && D2_REPO="$cand"
done

rm -rf "$KIT"
mkdir -p "$KIT/wheels" "$KIT/detectron2" "$KIT/.sdist"
# Everything torch, torchvision, numpy, Pillow, matplotlib, opencv, onnx, timm bring is on the GPU machine.
TOP=(yacs "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "pycocotools>=2.0.2" tabulate termcolor portalocker
     cloudpickle "omegaconf>=2.1,<2.4" "hydra-core>=1.1" tqdm pyyaml tensorboard "diffusers>=0.30" future pydot pytest)
printf '%s\n' "${TOP[@]}" > "$KIT/requirements.txt"
PLAT=(--python-version "$PYVER" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux_2_28_x86_64 --only-binary=:all:)
# sdist-only: pure-Python wheels built here
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$KIT/.sdist" "fvcore>=0.1.5,<0.1.6" "antlr4-python3-runtime==4.9.3"
"$PY" -m pip wheel -q --no-deps -w "$KIT/wheels" "$KIT"/.sdist/*
rm -rf "$KIT/.sdist"
# the rest, with their dependencies, as Python $PYVER binaries
"$PY" -m pip download -q "${PLAT[@]}" --find-links "$KIT/wheels" -d "$KIT/wheels" -r "$KIT/requirements.txt"
rm -f "$KIT"/wheels/numpy-* "$KIT"/wheels/pillow-*  # there already (torch, torchvision); large
# detectron2: the pinned pure-Python v0.6 (sha256-checked by the installer) and main's source
"$PY" -c "import sys; from pathlib import Path; sys.path.insert(0, 'tools'); import install_detectron2 as d; \
a = d.download_fallback(Path('$KIT/detectron2')); d.verify_archive(a); print('detectron2 v0.6:', a)"
rm -f "$KIT/detectron2/requirements.txt"
if [ -n "$D2_REPO" ]; then
  git -C "$D2_REPO" archive --format=tar.gz --prefix=detectron2/ "$COMMIT" > "$KIT/detectron2/detectron2-$COMMIT.tar.gz" \
    || git archive --remote="$D2_REPO" --format=tar.gz --prefix=detectron2/ "$COMMIT" > "$KIT/detectron2/detectron2-$COMMIT.tar.gz"
else
  echo "no detectron2 repository (set D2_REPO): the kit has the pure-Python route only"
fi
(cd "$KIT" && find . -type f ! -name MANIFEST.txt -printf '%s %p\n' | sort -k2 | while read -r size path; do
   echo "$size $(sha256sum "$path" | cut -c1-64) $path"; done) > "$KIT/MANIFEST.txt"
BYTES="$(du -sb "$KIT" | cut -f1)"
echo "{\"case\": \"gpu_kit\", \"path\": \"$KIT\", \"files\": $(wc -l < "$KIT/MANIFEST.txt"), \"mib\": $((BYTES / 1048576)), \"limit_mib\": 64}"
[ "$BYTES" -le $((64 * 1048576)) ] || { echo "the kit is over 64 MiB: it cannot travel as a carried path" >&2; exit 1; }
