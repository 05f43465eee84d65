"""Framework-agnostic DeepKD maths: losses, top-k schedule, optimizer, decoupled step, GSNR.

Pure torch: nothing here imports detectron2, so classification works without it.
"""

from .losses import (
    KDParts,
    dkd_components,
    kd_components,
    kd_loss,
    kd_parts,
    standardize_logits,
    topk_nontarget_mask,
    warmup_factor,
)
from .topk import SCHEDULE_MODES, TopKSchedule

__all__ = [
    "KDParts",
    "SCHEDULE_MODES",
    "TopKSchedule",
    "dkd_components",
    "kd_components",
    "kd_loss",
    "kd_parts",
    "standardize_logits",
    "topk_nontarget_mask",
    "warmup_factor",
]
