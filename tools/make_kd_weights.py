#!/usr/bin/env python
"""Build the combined DeepKD detection checkpoint: teacher detector + ImageNet student backbone.

    python tools/make_kd_weights.py \\
        --teacher pretrained/faster_rcnn_R_101_FPN_3x.pkl \\
        --student pretrained/resnet18-f37072fd.pth --student-arch R-18 \\
        --output pretrained/r18-r101.pth

The teacher is a detectron2 detector checkpoint (model-zoo ``.pkl`` or ``.pth``; a combined
file's ``teacher.*`` part also works): Faster R-CNN, Mask R-CNN (``mask_rcnn_R_*_FPN_3x``),
Cascade (Mask) R-CNN, RetinaNet (``retinanet_R_*_FPN_3x``) or FCOS; its keys go under
``teacher.``, unchanged. The student is an ImageNet
backbone: a torchvision state dict (ResNet-18/50, MobileNetV2) or, for the R-50 pair as in the
ReviewKD release, detectron2's MSRA ``R-50.pkl`` (Caffe2), renamed to detectron2's layout under
``backbone.bottom_up.`` (fc / classifier dropped). The student config must match the kind of
weights (printed at the end; DeepKDCheckpointer refuses a mismatch). The output is a weights-only ``.pth``,
``{"model": state_dict, "__author__": ...}``, for MODEL.WEIGHTS of a DeepKD config.

``.pkl`` files are pickles: only convert trusted ones. The output loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional

import torch

from deepkd_det.core.io import atomic_save
from deepkd_det.det.modeling.weights import (
    DETECTOR_KINDS,
    IGNORED_CHECKPOINT_KEYS,
    IMAGENET_INPUT,
    TEACHER_PREFIX,
    detector_kind,
    imagenet_flavour,
    read_checkpoint,
    student_backbone_from_imagenet,
)

AUTHOR = "deepkd_det tools/make_kd_weights.py"
STUDENT_ARCHS = ("R-18", "R-50", "MV2")

# Architecture settings the student needs (printed as a reminder, with the input settings).
STUDENT_HINTS = {
    "R-18": "MODEL.RESNETS.DEPTH 18, MODEL.RESNETS.RES2_OUT_CHANNELS 64",
    "R-50": "MODEL.RESNETS.DEPTH 50",
    "MV2": "MODEL.BACKBONE.NAME build_mobilenetv2_fpn_backbone, MODEL.FPN.IN_FEATURES [m2, m3, m4, m5]",
}


def teacher_part(state: Dict[str, torch.Tensor], source: str) -> OrderedDict[str, torch.Tensor]:
    """The teacher detector's keys, prefixed with ``teacher.``. Any detectron2 detector
    ``detector_kind`` recognises: Faster / Mask / Cascade (Mask) R-CNN, RetinaNet, FCOS."""
    if any(k.startswith(TEACHER_PREFIX) for k in state):
        state = {k[len(TEACHER_PREFIX) :]: v for k, v in state.items() if k.startswith(TEACHER_PREFIX)}
    state = {k: v for k, v in state.items() if not IGNORED_CHECKPOINT_KEYS.search(k)}
    if detector_kind(state) is None:
        raise ValueError(
            f"{source} is not a detectron2 detector checkpoint (neither roi_heads.box_predictor.* nor "
            "head.cls_score.* / head.bbox_pred.* keys next to backbone.*); the teacher must be a trained "
            f"detector: {', '.join(DETECTOR_KINDS)}"
        )
    return OrderedDict((TEACHER_PREFIX + k, v) for k, v in state.items())


def make_kd_weights(teacher_path: str, student_path: str, student_arch: str) -> Dict[str, object]:
    """The combined checkpoint ``{"model": state_dict, "__author__": ...}``."""
    if student_arch not in STUDENT_ARCHS:
        raise ValueError(f"--student-arch must be one of {STUDENT_ARCHS}, got {student_arch!r}")
    tstate, extra = read_checkpoint(teacher_path)
    if extra.get("matching_heuristics"):
        raise ValueError(f"{teacher_path} is a Caffe2/ImageNet file, not a detectron2 detector checkpoint")
    teacher = teacher_part(tstate, teacher_path)
    sstate, _ = read_checkpoint(student_path)
    student = student_backbone_from_imagenet(sstate, student_arch)
    model = OrderedDict()
    model.update(teacher)
    model.update(student)
    model = OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.items())
    return {"model": model, "__author__": AUTHOR}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--teacher",
        required=True,
        help="detectron2 teacher checkpoint (.pkl model zoo, trusted only; or .pth)",
    )
    p.add_argument("--student", required=True, help="torchvision ImageNet state dict of the student (.pth)")
    p.add_argument("--student-arch", required=True, choices=STUDENT_ARCHS)
    p.add_argument("--output", required=True, help="combined checkpoint to write (.pth)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.output.endswith(".pth"):
        raise SystemExit("--output must end with .pth")
    for path in (args.teacher, args.student):
        if not os.path.isfile(path):
            raise SystemExit(f"file not found: {path}")
    try:
        combined = make_kd_weights(args.teacher, args.student, args.student_arch)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    atomic_save(combined, args.output)
    model = combined["model"]
    n_teacher = sum(k.startswith(TEACHER_PREFIX) for k in model)
    kind = detector_kind({k[len(TEACHER_PREFIX) :]: v for k, v in model.items() if k.startswith(TEACHER_PREFIX)})
    print(
        f"wrote {args.output}: {n_teacher} teacher tensors (teacher.*, a {kind}), "
        f"{len(model) - n_teacher} student backbone tensors"
    )
    flavour = imagenet_flavour(model) or "torchvision"
    settings = IMAGENET_INPUT[flavour]
    if args.student_arch != "R-50":
        settings = {k: v for k, v in settings.items() if k != "MODEL.RESNETS.STRIDE_IN_1X1"}
    inputs = ", ".join(f"{k} {v}" for k, v in settings.items())
    print(f"student config for these {flavour} weights: {STUDENT_HINTS[args.student_arch]}, {inputs}")
    print("use it as MODEL.WEIGHTS (TEACHER.MODEL.WEIGHTS may stay empty)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
