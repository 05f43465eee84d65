"""The classification trainer's bridge to the shared core: its optimizer and the plain-training
pieces the decoupled step does not cover (GSNR of plain training, DDP-style gradient average)."""

from __future__ import annotations

from typing import Dict, List

import torch

from deepkd_det.core.gsnr import GSNRMeter
from deepkd_det.core.settings import build_decoupled_optimizer
from deepkd_det.core.step import allreduce_gradients, broadcast_parameters
from deepkd_det.core.teacher import prepare_teacher

__all__ = ["average_gradients", "broadcast_parameters", "build_optimizer", "observe_plain_components",
           "prepare_teacher"]


def observe_plain_components(meter: GSNRMeter, losses: Dict[str, torch.Tensor], params: List[torch.Tensor]) -> None:
    """Plain training has no per-component gradients: compute them for the GSNR meter only.

    Only in the meter's active iterations (extra backward passes); these are this worker's
    gradients (not averaged over workers).
    """
    params = [p for p in params if p.requires_grad]
    for name, loss in losses.items():
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            meter.observe_gradients(name, grads, params)


def build_optimizer(cfg, params, decoupled: bool) -> torch.optim.Optimizer:
    """torch SGD for plain training; for DeepKD, the core's decoupled optimizer of ``cfg.DEEPKD``
    (DeepKDOptimizer with three momentum buffers or, with ``DEEPKD.OPTIMIZER dot``, DOTOptimizer)."""
    s = cfg.SOLVER
    if not decoupled and s.OPTIMIZER == "adamw":
        return torch.optim.AdamW(params, lr=s.LR, weight_decay=s.WEIGHT_DECAY, betas=(0.9, 0.999), eps=1e-8)
    if not decoupled:
        return torch.optim.SGD(params, lr=s.LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY)
    return build_decoupled_optimizer(cfg.DEEPKD, params, lr=s.LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY)


def average_gradients(params: List[torch.Tensor]) -> None:
    """Plain training under torch.distributed: average ``.grad`` over the workers (as DDP does)."""
    params = [p for p in params if p.requires_grad]
    reduced = allreduce_gradients([p.grad for p in params], params)
    for p, g in zip(params, reduced):
        p.grad = g
