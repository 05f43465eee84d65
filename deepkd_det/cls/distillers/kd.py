"""KD (Hinton et al.), split into DeepKD's target-class and non-target-class components.

``tcg + ncg`` equals ``kd_weight * T^2 * KL(p_t || p_s)`` exactly when no top-k mask is used
(per-row coupling, core.losses.kd_components), so plain KD is the sum of the three losses.
"""

from __future__ import annotations

import torch.nn.functional as F

from deepkd_det.core.losses import kd_components, warmup_factor

from .base import Distiller


class KD(Distiller):
    def __init__(self, student, teacher, temperature: float = 4.0, ce_weight: float = 0.1,
                 kd_weight: float = 0.9, warmup: float = 0.0, coupling: str = "row",
                 apply_topk: bool = True, logit_stand: bool = False, topk_rank: str = "nontarget"):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.warmup = warmup
        self.coupling = coupling
        # The released reference code never masks its KD path; compat "official" turns this off.
        self.apply_topk = apply_topk
        self.topk_rank = topk_rank
        self.logit_stand = logit_stand

    def component_losses(self, logits_student, logits_teacher, target, ctx):
        w = warmup_factor(ctx.epoch, self.warmup)
        tcg, ncg = kd_components(
            logits_student, logits_teacher, target, temperature=self.temperature,
            weight=w * self.kd_weight, topk=ctx.topk if self.apply_topk else None,
            logit_stand=self.logit_stand, coupling=self.coupling, topk_rank=self.topk_rank,
        )
        return {"tog": self.ce_weight * F.cross_entropy(logits_student, target), "tcg": tcg, "ncg": ncg}
