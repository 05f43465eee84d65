"""ReviewKD (Chen et al., CVPR 2021) for classification: ABF review path + HCL over the stages.

The student's levels (stage outputs, finest first, then the pooled feature as a 1 x 1 map;
``models.stage_features``) go through the review path of attention-based fusion modules
(``core.reviewkd.ReviewKDHead``, the module detection uses too), each output resized to the
teacher's level size; HCL (``core.reviewkd.hcl_loss``) compares them with the teacher's levels,
taken before their last ReLU (``preact``), as both releases do. Loss (mdistiller's recipe):

    CE_WEIGHT * CE + WEIGHT * min(epoch / WARMUP, 1) * HCL

CIFAR-100 (mdistiller ``configs/cifar100/reviewkd``): weight 1.0, 20-epoch warm-up, the student's
levels after their ReLU, ``mid_channels = min(512, last student channels)``. ImageNet (the ReviewKD
and GPD releases, ``train_reviewkd.py``): weight 1.0, no warm-up, the student's levels before
their ReLU, mid 512 for ResNet-18 and 256 for MobileNet.

Loss names: ``tog`` (the cross-entropy) and ``reviewkd`` (the weighted HCL); DeepKD puts both in
its TOG buffer (``buffer_losses``): ReviewKD has no target / non-target logit split.

With GPD (``GPD.ENABLED``, the release's ``train_reviewkd.py``): the student is the shared model;
the dynamic teacher gets a second head of its own (``reviewkd_dynamic_teacher``, inputs ``ratio``
times wider, as the release's ``abfs_dual``) and both widths learn CE + ReviewKD from the static
teacher (``widths_losses``); the GPD wrapper adds the soft-target term.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.gpd import DYNAMIC_TEACHER, STUDENT, at_width, gpd_ratio
from deepkd_det.core.losses import warmup_factor
from deepkd_det.core.reviewkd import ReviewKDHead, hcl_loss

from ..models import stage_features
from .base import Distiller

__all__ = ["REVIEWKD_MAX_MID_CHANNELS", "ReviewKD", "probe_levels"]

REVIEWKD_MAX_MID_CHANNELS = 512  # mdistiller: mid = min(512, last student channels)


@torch.no_grad()
def probe_levels(model: nn.Module, size: int, preact: bool) -> List[Tuple[int, int, int]]:
    """(channels, H, W) of every ReviewKD level of ``model`` on a zero image of ``size`` (eval mode;
    nothing of the model changes and no random number is drawn)."""
    size = getattr(model, "img_size", None) or size  # fixed-size models (the vision transformers)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        levels, _ = stage_features(model, torch.zeros(1, 3, size, size, device=next(model.parameters()).device),
                                   preact)
    finally:
        for module, mode in was:
            module.training = mode
    return [(f.shape[1], f.shape[2], f.shape[3]) for f in levels]


class ReviewKD(Distiller):
    """ReviewKD from a frozen teacher; ``self.reviewkd`` (and, for a GPD shared student,
    ``self.reviewkd_dynamic_teacher``) hold the training-only ABF heads."""

    def __init__(self, student, teacher, probe_size: int, ce_weight: float = 1.0, weight: float = 1.0,
                 warmup: float = 20.0, student_preact: bool = False, mid_channels: int = 0):
        super().__init__(student, teacher)
        self.ce_weight, self.weight, self.warmup = ce_weight, weight, warmup
        self.student_preact = student_preact
        teacher_levels = probe_levels(teacher, probe_size, preact=True)
        out_channels = [c for c, _, _ in teacher_levels]

        def head(width: str) -> ReviewKDHead:
            with at_width(student, width):
                levels = probe_levels(student, probe_size, student_preact)
            if len(levels) != len(teacher_levels):
                raise ValueError(f"ReviewKD: the student has {len(levels)} levels, the teacher "
                                 f"{len(teacher_levels)}; they must pair up stage by stage")
            in_channels = [c for c, _, _ in levels]
            mid = mid_channels or min(REVIEWKD_MAX_MID_CHANNELS, in_channels[-1])
            return ReviewKDHead(in_channels, out_channels, mid_channels=mid)

        self.reviewkd = head(STUDENT)
        if gpd_ratio(student) > 1:
            self.reviewkd_dynamic_teacher = head(DYNAMIC_TEACHER)

    def teacher_levels(self, image: torch.Tensor):
        with torch.no_grad():
            return stage_features(self.teacher, image, preact=True)

    def losses_at(self, image, target, teacher_levels, ctx, head: ReviewKDHead):
        """``(logits, {"tog": CE, "reviewkd": weighted HCL})`` of the student model at its current width."""
        levels, logits = stage_features(self.student, image, self.student_preact)
        outputs = head(levels, out_sizes=[t.shape[-2:] for t in teacher_levels])
        w = warmup_factor(ctx.epoch, self.warmup)
        return logits, {"tog": self.ce_weight * F.cross_entropy(logits, target),
                        "reviewkd": w * self.weight * hcl_loss(outputs, teacher_levels)}

    def forward_train(self, image, target, ctx):
        teacher_levels, _ = self.teacher_levels(image)
        return self.losses_at(image, target, teacher_levels, ctx, self.reviewkd)

    def widths_losses(self, image, target, ctx) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor],
                                                         Dict[str, torch.Tensor]]:
        """GPD: ``(student logits, dynamic-teacher logits, student losses, dynamic-teacher losses)``."""
        teacher_levels, _ = self.teacher_levels(image)
        with at_width(self.student, DYNAMIC_TEACHER):
            logits_dt, dt = self.losses_at(image, target, teacher_levels, ctx, self.reviewkd_dynamic_teacher)
        with at_width(self.student, STUDENT):
            logits_s, student = self.losses_at(image, target, teacher_levels, ctx, self.reviewkd)
        return logits_s, logits_dt, student, dt

    def buffer_losses(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """DeepKD: the feature loss rides with the task loss in TOG."""
        return {"tog": sum(losses.values())}

    def component_losses(self, logits_student, logits_teacher, target, ctx) -> Optional[Dict[str, torch.Tensor]]:
        raise TypeError("ReviewKD works on features: use forward_train / widths_losses")
