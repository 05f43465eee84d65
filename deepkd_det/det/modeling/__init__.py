"""detectron2 parts of DeepKD: importing this package registers the meta-architecture
``DeepKDRCNN`` and the backbones ``build_mobilenetv2_backbone`` / ``build_mobilenetv2_fpn_backbone``."""

from . import meta_arch, mobilenetv2_fpn, teacher, weights  # noqa: F401  (registration)
from .meta_arch import DISTILL_LOSS_KEYS, DeepKDRCNN
from .mobilenetv2_fpn import MobileNetV2Backbone, build_mobilenetv2_backbone, build_mobilenetv2_fpn_backbone
from .teacher import Teacher, TeacherWeightsError, build_teacher, load_teacher_weights

__all__ = [
    "DISTILL_LOSS_KEYS",
    "DeepKDRCNN",
    "MobileNetV2Backbone",
    "Teacher",
    "TeacherWeightsError",
    "build_mobilenetv2_backbone",
    "build_mobilenetv2_fpn_backbone",
    "build_teacher",
    "load_teacher_weights",
]
