"""The classification trainer's bridge to the shared core (optimizer, decoupled step, GSNR, teacher).

Everything DeepKD-specific the trainer calls goes through here, so the engine stays the same
for plain and DeepKD training.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from deepkd_det.core.gsnr import GSNRMeter
from deepkd_det.core.step import DecoupledStep, allreduce_gradients, broadcast_parameters
from deepkd_det.core.teacher import prepare_teacher

__all__ = ["average_gradients", "broadcast_parameters", "build_decoupled_step", "build_gsnr_meter",
           "build_optimizer", "observe_plain_components", "prepare_teacher"]


def build_gsnr_meter(cfg, student: nn.Module, steps_per_epoch: int) -> GSNRMeter:
    """GSNR/BSNR meter: a window of GSNR.WINDOW iterations every GSNR.PERIOD (0: every epoch)."""
    window = cfg.GSNR.WINDOW
    period = cfg.GSNR.PERIOD or steps_per_epoch
    return GSNRMeter(student.named_parameters(), window=window, period=max(period, window))


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
    """torch SGD for plain training; for DeepKD, DeepKDOptimizer (three momentum buffers) or, with
    ``DEEPKD.OPTIMIZER dot``, DOTOptimizer (two: task and TCG + NCG summed by its component_losses)."""
    s = cfg.SOLVER
    if not decoupled:
        return torch.optim.SGD(params, lr=s.LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY)
    from deepkd_det.core.optim import DeepKDOptimizer, DOTOptimizer

    d = cfg.DEEPKD
    if d.OPTIMIZER == "dot":
        return DOTOptimizer(params, lr=s.LR, momentum=s.MOMENTUM, delta=d.DOT_DELTA, weight_decay=s.WEIGHT_DECAY,
                            dampening=d.DAMPENING)
    return DeepKDOptimizer(params, lr=s.LR, momentum=s.MOMENTUM, delta_tog=d.DELTA_TOG, delta_tcg=d.DELTA_TCG,
                           delta_ncg=d.DELTA_NCG, weight_decay=s.WEIGHT_DECAY, dampening=d.DAMPENING,
                           compat=d.COMPAT)


def build_decoupled_step(cfg, optimizer, grad_hook=None) -> DecoupledStep:
    return DecoupledStep(optimizer, cfg.DEEPKD.STEP_STRATEGY, grad_hook=grad_hook)


def average_gradients(params: List[torch.Tensor]) -> None:
    """Plain training under torch.distributed: average ``.grad`` over the workers (as DDP does)."""
    params = [p for p in params if p.requires_grad]
    reduced = allreduce_gradients([p.grad for p in params], params)
    for p, g in zip(params, reduced):
        p.grad = g
