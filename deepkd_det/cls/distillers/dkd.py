"""DKD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD`` with a linear warm-up.

TCKD and NCKD are DeepKD's TCG and NCG components; DeepKD's top-k mask acts on NCKD only.
"""

from __future__ import annotations

import torch.nn.functional as F

from deepkd_det.core.losses import dkd_components, warmup_factor

from .base import Distiller


class DKD(Distiller):
    def __init__(self, student, teacher, ce_weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0, warmup: float = 20.0, logit_stand: bool = False,
                 apply_topk: bool = True, topk_rank: str = "nontarget"):
        super().__init__(student, teacher)
        self.ce_weight = ce_weight
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup = warmup
        self.logit_stand = logit_stand
        self.apply_topk = apply_topk  # False: ctx.topk is ignored (no mask)
        self.topk_rank = topk_rank

    def component_losses(self, logits_student, logits_teacher, target, ctx):
        # DKD's warm-up counts 1-based epochs: min(epoch / warmup, 1).
        w = warmup_factor(ctx.epoch, self.warmup)
        tcg, ncg = dkd_components(
            logits_student, logits_teacher, target, alpha=self.alpha, beta=self.beta,
            temperature=self.temperature, warmup=w, topk=ctx.topk if self.apply_topk else None,
            logit_stand=self.logit_stand, topk_rank=self.topk_rank,
        )
        return {"tog": self.ce_weight * F.cross_entropy(logits_student, target), "tcg": tcg, "ncg": ncg}
