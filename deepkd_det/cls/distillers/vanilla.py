"""Vanilla training: cross-entropy only (also how teachers are trained from scratch)."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Distiller


class Vanilla(Distiller):
    needs_teacher = False

    def __init__(self, student, teacher=None, ce_weight: float = 1.0):
        super().__init__(student, None)
        self.ce_weight = ce_weight

    def component_losses(self, logits_student, logits_teacher, target, ctx):
        return {"tog": self.ce_weight * F.cross_entropy(logits_student, target)}
