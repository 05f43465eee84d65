"""DiffKD (Huang et al., NeurIPS 2023) for classification: denoised feature map and denoised logits.

Two ``deepkd_det.core.diffkd.DiffKD`` modules (training-only, state-dict keys ``diffkd.*``):

- ``diffkd.feature``: on the last feature map before global pooling. The student's map is
  projected to the teacher's channels (or to the autoencoder's latent, ``ae_channels``), noise-
  matched, denoised and compared with the teacher's map by MSE. When the two maps differ in
  size (e.g. resnet32x4 8x8 -> ShuffleV1 4x4 on CIFAR) the larger is average-pooled to the
  smaller's size first.
- ``diffkd.logits``: on the logits (MLP denoiser, no autoencoder); the denoised student logits
  are compared with the teacher's by KL at temperature 1.

Components: ``tog`` = CE + feature KD (MSE) + both diffusion losses + AE loss (task-side terms:
they carry no target/non-target split); the logit KL is split exactly into ``tcg`` + ``ncg``
by ``core.losses.kd_components`` (the KD distiller's split, per-row coupling), so plain DiffKD
is the sum of the three and DeepKD's top-k mask acts on its NCKD part.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.diffkd import DiffKD as DiffKDModule
from deepkd_det.core.losses import kd_components, warmup_factor

from ..models import feature_map_and_logits
from .base import Distiller

__all__ = ["DiffKD", "match_spatial"]


def match_spatial(student, teacher):
    """Average-pool the larger of two (N, C, H, W) maps to the other's H x W (unchanged if equal)."""
    hs, ws = student.shape[-2:]
    ht, wt = teacher.shape[-2:]
    size = (min(hs, ht), min(ws, wt))
    if (hs, ws) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if (ht, wt) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


class DiffKD(Distiller):
    """DiffKD on the pre-pooling feature map and on the logits; ``self.diffkd`` holds the modules."""

    def __init__(self, student, teacher, num_classes: int, student_channels: int, teacher_channels: int,
                 ce_weight: float = 1.0, feature_weight: float = 1.0, logit_weight: float = 1.0,
                 diff_weight: float = 1.0, ae_weight: float = 1.0, ae_channels: int = 0,
                 inference_steps: int = 5, warmup: float = 0.0):
        super().__init__(student, teacher)
        self.ce_weight, self.feature_weight, self.logit_weight = ce_weight, feature_weight, logit_weight
        self.diff_weight, self.ae_weight, self.warmup = diff_weight, ae_weight, warmup
        modules = {}
        if feature_weight > 0:
            modules["feature"] = DiffKDModule(student_channels, teacher_channels, kind="feature",
                                              inference_steps=inference_steps, ae_channels=ae_channels or None)
        if logit_weight > 0:
            modules["logits"] = DiffKDModule(num_classes, num_classes, kind="logits", inference_steps=inference_steps)
        if not modules:
            raise ValueError("DIFFKD.FEATURE_WEIGHT and DIFFKD.LOGIT_WEIGHT are both 0: nothing to distil")
        # Attribute name = deepkd_det.core.diffkd.DIFFKD_PREFIX without the dot.
        self.diffkd = nn.ModuleDict(modules)

    def forward_train(self, image, target, ctx):
        fmap_s, logits_s = feature_map_and_logits(self.student, image)
        with torch.no_grad():
            fmap_t, logits_t = feature_map_and_logits(self.teacher, image)
        w = warmup_factor(ctx.epoch, self.warmup)
        tog = self.ce_weight * F.cross_entropy(logits_s, target)
        if "feature" in self.diffkd:
            s, t = match_spatial(fmap_s, fmap_t)
            out = self.diffkd["feature"](s, t)
            tog = tog + w * self.feature_weight * out.losses["kd"] + self.diff_weight * out.losses["diff"] \
                + self.ae_weight * out.losses["ae"]
        if "logits" in self.diffkd:
            out = self.diffkd["logits"](logits_s, logits_t)
            tog = tog + self.diff_weight * out.losses["diff"]
            tcg, ncg = kd_components(out.denoised, logits_t, target, temperature=1.0,
                                     weight=w * self.logit_weight, topk=ctx.topk, coupling="row")
        else:
            tcg = ncg = logits_s.sum() * 0.0
        return logits_s, {"tog": tog, "tcg": tcg, "ncg": ncg}
