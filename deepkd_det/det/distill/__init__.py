"""The detector side as distillation parts: the wrapper (``wrapper.DistillDetector``), the parts
(``parts/``: one file a method) and what they may pair (``heads``)."""

from . import parts  # noqa: F401  (registers the parts)
from .parts.base import DISTILL_PART_REGISTRY, DistillPart, part_order
from .wrapper import DeepKDRCNN, DistillContext, DistillDetector, build_parts, build_student, parts_enabled

__all__ = [
    "DISTILL_PART_REGISTRY",
    "part_order",
    "DistillPart",
    "DistillDetector",
    "DeepKDRCNN",
    "DistillContext",
    "build_parts",
    "build_student",
    "parts_enabled",
]
