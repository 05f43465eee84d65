"""Building the DeepKD optimizer and decoupled step of ``deepkd_det.core`` from a detectron2 cfg."""

from __future__ import annotations

import torch
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils import comm

__all__ = ["DeepKDUpdate", "broadcast_initial_parameters", "build_decoupled_step", "build_deepkd_optimizer"]


def _param_groups(cfg, model):
    # detectron2's groups: norm / bias weight decay, bias lr factor; frozen parameters (the
    # teacher, frozen backbone stages) are left out.
    return get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )


def build_deepkd_optimizer(cfg, model) -> torch.optim.Optimizer:
    """DeepKD (three buffers) or DOT (two buffers) optimizer over detectron2's param groups."""
    from deepkd_det.core.optim import DeepKDOptimizer, DOTOptimizer

    s, dk = cfg.SOLVER, cfg.SOLVER.DEEPKD
    if s.CLIP_GRADIENTS.ENABLED:
        raise ValueError("SOLVER.CLIP_GRADIENTS is not supported with SOLVER.DEEPKD.ENABLED (three gradient components)")
    if s.NESTEROV:
        raise ValueError("SOLVER.NESTEROV is not supported with SOLVER.DEEPKD.ENABLED")
    params = _param_groups(cfg, model)
    if dk.OPTIMIZER == "dot":
        if dk.COMPAT != "paper":
            raise ValueError("SOLVER.DEEPKD.COMPAT 'official' exists for OPTIMIZER 'deepkd' only")
        return DOTOptimizer(params, lr=s.BASE_LR, momentum=s.MOMENTUM, delta=dk.DOT_DELTA, weight_decay=s.WEIGHT_DECAY)
    if dk.OPTIMIZER != "deepkd":
        raise ValueError(f"SOLVER.DEEPKD.OPTIMIZER must be 'deepkd' or 'dot', got {dk.OPTIMIZER!r}")
    return DeepKDOptimizer(
        params,
        lr=s.BASE_LR,
        momentum=s.MOMENTUM,
        delta_tog=dk.DELTA_TOG,
        delta_tcg=dk.DELTA_TCG,
        delta_ncg=dk.DELTA_NCG,
        weight_decay=s.WEIGHT_DECAY,
        compat=dk.COMPAT,
    )


class DeepKDUpdate:
    """One DeepKD update from the component losses of one forward pass: per-component gradients
    (averaged over processes), folded into their buffers, then the parameter step.

    ``grad_hook`` (``hook(component, params, grads)``) sees each averaged component gradient;
    the GSNR hook sets it while it samples.
    """

    def __init__(self, optimizer, strategy: str = "sequential"):
        from deepkd_det.core.step import DecoupledStep

        self.optimizer = optimizer
        self.step = DecoupledStep(optimizer, strategy)

    @property
    def grad_hook(self):
        return self.step.grad_hook

    @grad_hook.setter
    def grad_hook(self, hook):
        self.step.grad_hook = hook

    def __call__(self, components):
        """``components``: ``{"tog": task loss, "tcg": loss_tckd, "ncg": loss_nckd}``."""
        self.step(self.optimizer.component_losses(**components))
        self.optimizer.step()


def build_decoupled_step(cfg, model, optimizer) -> DeepKDUpdate:
    return DeepKDUpdate(optimizer, cfg.SOLVER.DEEPKD.GRAD_STRATEGY)


def broadcast_initial_parameters(model) -> None:
    """Rank 0's parameters and buffers to every process (the decoupled step has no DDP wrapper)."""
    if comm.get_world_size() > 1:
        from deepkd_det.core.step import broadcast_parameters

        broadcast_parameters(model)
