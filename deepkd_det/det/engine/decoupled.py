"""The decoupled optimizer of ``deepkd_det.core`` over detectron2's parameter groups."""

from __future__ import annotations

import torch
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils import comm

from deepkd_det.core.settings import build_decoupled_optimizer

__all__ = ["broadcast_initial_parameters", "build_deepkd_optimizer"]


def build_deepkd_optimizer(cfg, model) -> torch.optim.Optimizer:
    """DeepKD (three buffers) or DOT (two buffers) optimizer from ``cfg.DEEPKD`` over detectron2's
    groups (norm / bias weight decay, bias lr factor; frozen parameters such as the teacher left out)."""
    s = cfg.SOLVER
    if s.CLIP_GRADIENTS.ENABLED:
        raise ValueError("SOLVER.CLIP_GRADIENTS is not supported with DEEPKD.ENABLED (three gradient components)")
    if s.NESTEROV:
        raise ValueError("SOLVER.NESTEROV is not supported with DEEPKD.ENABLED")
    params = get_default_optimizer_params(
        model,
        base_lr=s.BASE_LR,
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        bias_lr_factor=s.BIAS_LR_FACTOR,
        weight_decay_bias=s.WEIGHT_DECAY_BIAS,
    )
    return build_decoupled_optimizer(cfg.DEEPKD, params, lr=s.BASE_LR, momentum=s.MOMENTUM,
                                     weight_decay=s.WEIGHT_DECAY)


def broadcast_initial_parameters(model) -> None:
    """Rank 0's parameters and buffers to every process (the decoupled step has no DDP wrapper)."""
    if comm.get_world_size() > 1:
        from deepkd_det.core.step import broadcast_parameters

        broadcast_parameters(model)
