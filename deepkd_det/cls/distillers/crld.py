"""CRLD (ACM MM 2024) on two views: within-view and cross-view KD gated by teacher confidence.

``split="kd"`` splits every KD pair exactly, so plain CRLD is the sum of the three losses;
``split="dkd"`` (the DeepKD release) weights them ``alpha * TCKD``, ``beta * NCKD``. DeepKD's
top-k mask acts on NCKD only; the warm-up scales TCKD and NCKD (core.crld).
"""

from __future__ import annotations

from deepkd_det.core.crld import CRLD_DEFAULTS, CRLD_TAU_STRONG, CRLD_TAU_WEAK, crld_components
from deepkd_det.core.losses import warmup_factor

from .base import TwoViewDistiller


class CRLD(TwoViewDistiller):
    def __init__(self, student, teacher, temperature: float = CRLD_DEFAULTS["temperature"],
                 ce_weight: float = CRLD_DEFAULTS["ce_weight"], within_weight: float = CRLD_DEFAULTS["within_weight"],
                 cross_weight: float = CRLD_DEFAULTS["cross_weight"], tau_weak: float = CRLD_TAU_WEAK,
                 tau_strong: float = CRLD_TAU_STRONG, split: str = CRLD_DEFAULTS["split"],
                 alpha: float = CRLD_DEFAULTS["alpha"], beta: float = CRLD_DEFAULTS["beta"], warmup: float = 0.0, confidence_mask: str = "row",
                 logit_stand: bool = False, apply_topk: bool = True, topk_rank: str = "nontarget"):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.within_weight = within_weight
        self.cross_weight = cross_weight
        self.tau_weak = tau_weak
        self.tau_strong = tau_strong
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
        return crld_components(
            zs_weak, zt_weak, zs_strong, zt_strong, target, temperature=self.temperature,
            ce_weight=self.ce_weight, within_weight=self.within_weight, cross_weight=self.cross_weight,
            tau_weak=self.tau_weak, tau_strong=self.tau_strong, split=self.split, alpha=self.alpha,
            beta=self.beta, warmup=warmup_factor(ctx.epoch, self.warmup), topk=ctx.topk if self.apply_topk else None,
            confidence_mask=self.confidence_mask, logit_stand=self.logit_stand, topk_rank=self.topk_rank,
        )
