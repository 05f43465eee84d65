"""MLKD (Jin et al., CVPR 2023) on two views: instance, batch and class alignment (core.mlkd).

``split="kd"`` splits the instance KD terms exactly, so plain MLKD is the sum of the three
losses; ``split="dkd"`` (the DeepKD release) weights them ``alpha * TCKD``, ``beta * NCKD``.
The batch/class correlation terms ride with the task loss (TOG). DeepKD's top-k mask acts on
NCKD only; the warm-up scales TCKD and NCKD.
"""

from __future__ import annotations

from deepkd_det.core.losses import warmup_factor
from deepkd_det.core.mlkd import MLKD_DEFAULTS, MLKD_TEMPERATURES, mlkd_components

from .base import TwoViewDistiller


class MLKD(TwoViewDistiller):
    def __init__(self, student, teacher, temperatures=MLKD_TEMPERATURES,
                 ce_weight: float = MLKD_DEFAULTS["ce_weight"], kd_weight: float = MLKD_DEFAULTS["kd_weight"],
                 split: str = MLKD_DEFAULTS["split"], alpha: float = MLKD_DEFAULTS["alpha"],
                 beta: float = MLKD_DEFAULTS["beta"],
                 warmup: float = 0.0, confidence_mask: str = "release", logit_stand: bool = False,
                 apply_topk: bool = True, topk_rank: str = "nontarget"):
        super().__init__(student, teacher)
        self.temperatures = tuple(float(t) for t in temperatures)
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.split = split
        self.alpha = alpha
        self.beta = beta
        self.warmup = warmup
        self.confidence_mask = confidence_mask
        self.logit_stand = logit_stand
        self.apply_topk = apply_topk  # False: ctx.topk is ignored (no mask)
        self.topk_rank = topk_rank

    def component_losses(self, logits_student, logits_teacher, target, ctx):
        (zs_weak, zs_strong), (zt_weak, zt_strong) = logits_student, logits_teacher
        return mlkd_components(
            zs_weak, zt_weak, zs_strong, zt_strong, target, temperatures=self.temperatures,
            ce_weight=self.ce_weight, kd_weight=self.kd_weight, split=self.split, alpha=self.alpha,
            beta=self.beta, warmup=warmup_factor(ctx.epoch, self.warmup), topk=ctx.topk if self.apply_topk else None,
            confidence_mask=self.confidence_mask, logit_stand=self.logit_stand, topk_rank=self.topk_rank,
        )
