"""Framework-agnostic DeepKD maths: losses, top-k schedule, optimizer, decoupled step, GSNR.

Pure torch: nothing here imports detectron2, so classification works without it.
"""

from .gsnr import GSNRMeter, gsnr_from_moments
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
from .optim import DEEPKD_COMPONENTS, DOT_COMPONENTS, DecoupledMomentumSGD, DeepKDOptimizer, DOTOptimizer
from .step import STRATEGIES, DecoupledStep, allreduce_gradients, broadcast_parameters
from .teacher import fold_batchnorm, prepare_teacher
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
    # optimizer, decoupled step, GSNR meter, teacher preparation
    "DEEPKD_COMPONENTS",
    "DOT_COMPONENTS",
    "DOTOptimizer",
    "DecoupledMomentumSGD",
    "DecoupledStep",
    "DeepKDOptimizer",
    "GSNRMeter",
    "STRATEGIES",
    "allreduce_gradients",
    "broadcast_parameters",
    "fold_batchnorm",
    "gsnr_from_moments",
    "prepare_teacher",
]

# Two-view logit methods (MLKD, CRLD) and ReviewKD features for detection.
from .crld import CRLD_TAU_STRONG, CRLD_TAU_WEAK, crld_components, crld_confidence_masks, crld_loss  # noqa: E402
from .mlkd import MLKD_TEMPERATURES, mlkd_components, mlkd_confidence_masks, mlkd_loss  # noqa: E402
from .reviewkd import ABF, REVIEWKD_DET_FEATURES, REVIEWKD_DET_LOSS_WEIGHTS, ReviewKDHead, hcl_loss  # noqa: E402

__all__ += [
    "ABF",
    "CRLD_TAU_STRONG",
    "CRLD_TAU_WEAK",
    "MLKD_TEMPERATURES",
    "REVIEWKD_DET_FEATURES",
    "REVIEWKD_DET_LOSS_WEIGHTS",
    "ReviewKDHead",
    "crld_components",
    "crld_confidence_masks",
    "crld_loss",
    "hcl_loss",
    "mlkd_components",
    "mlkd_confidence_masks",
    "mlkd_loss",
]

# DiffKD (knowledge diffusion); diffusers is imported only when a DiffKD is built.
from .diffkd import DIFFKD_LOSS_WEIGHTS, DIFFKD_PREFIX, DiffKD, DiffKDOutput, diffkd_total, drop_diffkd_keys  # noqa: E402

__all__ += [
    "DIFFKD_LOSS_WEIGHTS",
    "DIFFKD_PREFIX",
    "DiffKD",
    "DiffKDOutput",
    "diffkd_total",
    "drop_diffkd_keys",
]

# GPD: the width-shared dynamic teacher (slicing, IR, CBR, export) and its soft-target loss.
from .gpd import (  # noqa: E402
    DYNAMIC_TEACHER,
    STUDENT,
    at_width,
    export,
    gpd_ratio,
    gpd_soft_target_loss,
    ir_gap,
    set_width,
    widen,
)

__all__ += [
    "DYNAMIC_TEACHER",
    "STUDENT",
    "at_width",
    "export",
    "gpd_ratio",
    "gpd_soft_target_loss",
    "ir_gap",
    "set_width",
    "widen",
]
