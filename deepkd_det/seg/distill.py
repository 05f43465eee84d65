"""The segmentation distiller: a student, a frozen teacher and DeepKD's three component losses.

``forward_train`` returns the student's full-size logits and ``{"tog", "tcg", "ncg"}``:

- ``tog``: the task side, cross-entropy over the valid pixels (ignore 255) times ``CE_WEIGHT``;
  with DiffKD also the diffusion loss of the map denoiser.
- ``tcg`` / ``ncg``: the per-pixel TCKD and NCKD terms (``seg.losses``: rows = valid pixels,
  formulas from ``core.losses``). KD: ``w TCKD`` and ``w (1 - p_t[y]) NCKD`` (exact split, their sum
  is per-pixel KD); DKD: ``w alpha TCKD`` and ``w beta NCKD``; DiffKD: the KD split between the
  teacher's logits and the *denoised* student map (DiffKD on the C-channel predicted maps at 1/8,
  ``core.diffkd.DiffKD(kind="feature")``, no autoencoder; denoised map upsampled like the logits).

Plain training sums the three; DeepKD (``DEEPKD.ENABLED``) gives each its own momentum buffer and
masks NCKD to the teacher's top-K non-target classes per pixel.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from deepkd_det.core.diffkd import DiffKD
from deepkd_det.core.losses import warmup_factor

from .losses import pixel_cross_entropy, pixel_dkd_components, pixel_kd_components
from .models import SegModel, upsample

__all__ = ["SegDistiller"]


class SegDistiller(nn.Module):
    """``method``: NONE, KD, DKD or DIFFKD; ``params``: that method's config node (``cfg.KD`` ...)."""

    def __init__(self, student: SegModel, teacher: Optional[nn.Module], method: str, params=None,
                 topk_rank: str = "nontarget"):
        super().__init__()
        self.student, self.method, self.p, self.topk_rank = student, method, params, topk_rank
        self.__dict__["teacher"] = teacher  # not registered: its weights stay out of state_dict()
        if method != "NONE" and teacher is None:
            raise ValueError(f"DISTILLER.TYPE {method} needs a teacher")
        self.ce_weight = 1.0 if params is None else float(params.CE_WEIGHT)
        if method == "DIFFKD":
            c = student.num_classes
            self.diffkd = DiffKD(c, c, kind="feature", inference_steps=params.INFERENCE_STEPS)

    def extra_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def extra_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("student.")]

    def forward_train(self, image: torch.Tensor, label: torch.Tensor, topk=None,
                      iteration: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        maps_s = self.student.forward_maps(image)
        logits_s = upsample(maps_s, image.shape[-2:])
        tog = self.ce_weight * pixel_cross_entropy(logits_s, label)
        if self.method == "NONE":
            return logits_s, {"tog": tog}
        with torch.no_grad():
            maps_t = self.teacher.forward_maps(image)
        logits_t = upsample(maps_t, image.shape[-2:])
        p = self.p
        w = warmup_factor(iteration, p.WARMUP_ITERS)
        if self.method == "KD":
            tcg, ncg = pixel_kd_components(logits_s, logits_t, label, p.TEMPERATURE, w * p.KD_WEIGHT, topk,
                                           topk_rank=self.topk_rank)
        elif self.method == "DKD":
            tcg, ncg = pixel_dkd_components(logits_s, logits_t, label, p.ALPHA, p.BETA, p.T, w, topk,
                                            topk_rank=self.topk_rank)
        elif self.method == "DIFFKD":
            out = self.diffkd(maps_s, maps_t)
            tog = tog + p.DIFF_WEIGHT * out.losses["diff"]
            denoised = upsample(out.denoised, image.shape[-2:])
            tcg, ncg = pixel_kd_components(denoised, logits_t, label, 1.0, w * p.KD_WEIGHT, topk,
                                           topk_rank=self.topk_rank)
        else:
            raise ValueError(f"unknown DISTILLER.TYPE {self.method!r}")
        return logits_s, {"tog": tog, "tcg": tcg, "ncg": ncg}
