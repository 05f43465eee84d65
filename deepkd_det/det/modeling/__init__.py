"""detectron2 parts of DeepKD: importing this package registers the distillation wrapper
(``DistillDetector``, alias ``DeepKDRCNN``: deepkd_det/det/distill/), its parts and the backbones
``build_mobilenetv2_backbone`` / ``build_mobilenetv2_fpn_backbone``."""

from deepkd_det.det.weights.teacher import TeacherWeightsError, load_teacher_weights

from . import mobilenetv2_fpn, teacher  # noqa: F401  (registration)
from .mobilenetv2_fpn import MobileNetV2Backbone, build_mobilenetv2_backbone, build_mobilenetv2_fpn_backbone
from .teacher import Teacher, build_teacher

__all__ = [
    "MobileNetV2Backbone",
    "Teacher",
    "TeacherWeightsError",
    "build_mobilenetv2_backbone",
    "build_mobilenetv2_fpn_backbone",
    "build_teacher",
    "load_teacher_weights",
]

# Registers DistillDetector / DeepKDRCNN and the parts. Last: the wrapper imports this package's
# teacher module, so an import that starts from deepkd_det.det.distill finds this package whole.
import deepkd_det.det.distill  # noqa: E402,F401,I001
