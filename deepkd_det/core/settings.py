"""The DeepKD settings node, shared by detection and classification: keys, defaults, validation,
and the factories that turn it into the core objects.

Both tasks mount the same node at ``cfg.DEEPKD`` (detection in its detectron2 config, the
classifier in its yacs tree) with the same keys, defaults and meanings; the base momentum is
``SOLVER.MOMENTUM`` in both. ``docs/maths.md`` has the update each setting controls.

    DEEPKD.ENABLED        DeepKD on: the top-k mask (TOPK) and, with DECOUPLE, the decoupled update
    DEEPKD.DECOUPLE       True: one momentum buffer per gradient component (OPTIMIZER);
                          False: the task's ordinary SGD step on the summed losses, mask only
    DEEPKD.OPTIMIZER      "deepkd" (TOG / TCG / NCG buffers) or "dot" (task / distillation buffers)
    DEEPKD.COMPAT         "paper" (the paper's update) or "official" (the released code's update)
    DEEPKD.DELTA_TOG/TCG/NCG   momentum of each buffer = SOLVER.MOMENTUM + delta, in [0, 1)
    DEEPKD.DOT_DELTA      DOT: task momentum SOLVER.MOMENTUM - d, distillation SOLVER.MOMENTUM + d
    DEEPKD.DAMPENING      torch SGD's dampening, on every buffer
    DEEPKD.MERGE_EQUAL_MOMENTA  paper mode: components of equal momentum (DeepKD on KD: TOG and NCG)
                          share one buffer and one backward pass (the same update; off with GSNR)
    DEEPKD.GRAD_STRATEGY  how the per-component gradients are computed (core.step.STRATEGIES)
    DEEPKD.DIST_MODE      several workers: "update" (each folds its own gradients, one all-reduce of
                          the update sum_c m_c per step, as DDP) or "components" (one all-reduce per
                          component's gradient); equal updates, see core.step.DecoupledStep
    DEEPKD.TOPK.*         the dynamic top-k schedule (core.topk.TopKSchedule), used when ENABLED
    DEEPKD.TOPK.RANK      how the mask ranks classes (core.losses.topk_nontarget_mask): "nontarget"
                          (the paper), "all" (the released code: target included), "auto" (the
                          default: "all" under COMPAT official, else "nontarget"); see topk_rank
    DEEPKD.GSNR.*         gradient signal-to-noise measurement (core.gsnr.GSNRMeter)
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

from .losses import TOPK_RANKS
from .optim import COMPAT_MODES  # stated once, by the optimizers that implement them
from .step import DIST_MODES, STRATEGIES
from .topk import SCHEDULE_MODES, TopKSchedule

__all__ = [
    "COMPAT_MODES",
    "DEEPKD_DEFAULTS",
    "OPTIMIZERS",
    "build_decoupled_optimizer",
    "build_decoupled_step",
    "build_gsnr_meter",
    "build_topk_schedule",
    "decoupled",
    "TOPK_RANK_CHOICES",
    "topk_rank",
    "deepkd_node",
    "deepkd_settings_dict",
    "deepkd_settings_from_mapping",
    "validate_deepkd_settings",
]

OPTIMIZERS = ("deepkd", "dot")
TOPK_RANK_CHOICES = ("auto",) + TOPK_RANKS

# One definition of every key; each task wraps it in its own CfgNode class (deepkd_node).
DEEPKD_DEFAULTS: Dict[str, Any] = {
    "ENABLED": False,
    "DECOUPLE": True,
    "OPTIMIZER": "deepkd",
    "COMPAT": "paper",
    # Paper / release defaults around a base momentum of 0.9: TOG 0.975, TCG 0.825, NCG 0.95.
    # DeepKD on KD uses +0.075 for NCG as well.
    "DELTA_TOG": 0.075,
    "DELTA_TCG": -0.075,
    "DELTA_NCG": 0.05,
    "DOT_DELTA": 0.075,
    "DAMPENING": 0.0,
    "MERGE_EQUAL_MOMENTA": True,
    "GRAD_STRATEGY": "sequential",
    "DIST_MODE": "update",
    "TOPK": {
        # "off" (all non-target classes), "constant" (K_START), "linear" (K_START until START,
        # linear to K_END at END), "step" (PHASES: [[progress, K], ...]).
        "MODE": "linear",
        "K_START": 0,  # 0: ceil(10% of the non-target classes), at least 2 (K = 1 makes NCKD zero)
        "K_END": 0,  # 0: all non-target classes
        "START": 0.0,  # training progress in [0, 1]
        "END": 0.6,
        "PHASES": [],
        # "auto": "all" (the released code's ranking) under COMPAT official, else "nontarget".
        "RANK": "auto",
    },
    "GSNR": {
        "ENABLED": False,
        "PERIOD": 0,  # iterations between measurements; 0: once per epoch
        "WINDOW": 8,  # mini-batches per measurement (a variance needs at least 2)
    },
}


def deepkd_node(node_class):
    """A fresh ``DEEPKD`` node of ``node_class`` (detectron2's or yacs' CfgNode)."""
    return node_class(copy.deepcopy(DEEPKD_DEFAULTS))


def deepkd_settings_dict() -> Dict[str, Any]:
    """The defaults as a plain nested dict: the ``deepkd`` node of a LazyConfig (``deepkd =
    deepkd_settings_dict()`` in a ``.py`` config; detectron2 turns it into an omegaconf node).
    Same keys and defaults as the yacs node (one definition, ``DEEPKD_DEFAULTS``)."""
    return copy.deepcopy(DEEPKD_DEFAULTS)


def deepkd_settings_from_mapping(data, where: str, prefix: str = "deepkd"):
    """The yacs DEEPKD node (the object every factory below reads) holding the nested mapping
    ``data`` over the defaults, e.g. a LazyConfig's ``deepkd`` node as plain containers.

    Keys are checked as a yacs file's are (``core.cfgfile.merge_dict``): an unknown key (with a
    "did you mean") or a value of the wrong type is one ConfigError naming ``where`` and
    ``<prefix>.KEY``. Values are validated separately (``validate_deepkd_settings``).
    """
    from yacs.config import CfgNode

    from .cfgfile import ConfigError, merge_dict

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix} must be a mapping of the DEEPKD settings, got {data!r}")
    node = deepkd_node(CfgNode)
    merge_dict(node, data, where, prefix=f"{prefix}." if prefix else "")
    return node


def decoupled(node) -> bool:
    """Whether the decoupled (per-component momentum) update is on."""
    return bool(node.ENABLED and node.DECOUPLE)


def topk_rank(node) -> str:
    """The ``topk_rank`` of the losses: ``TOPK.RANK``, where "auto" follows ``COMPAT``
    ("official" -> "all", the released code's ranking; "paper" -> "nontarget")."""
    rank = node.TOPK.RANK
    if rank == "auto":
        return "all" if node.COMPAT == "official" else "nontarget"
    return rank


def validate_deepkd_settings(node, momentum: float, num_nontarget: Optional[int], prefix: str = "DEEPKD",
                             momentum_key: str = "SOLVER.MOMENTUM") -> List[str]:
    """Every problem of the node as one message naming the key (empty list: valid).

    ``num_nontarget`` (C - 1) bounds the top-k schedule; None skips that check. ``prefix`` and
    ``momentum_key`` are the names of the node and of the base momentum in the messages (a
    LazyConfig: ``deepkd``, ``optimizer.momentum``).
    """
    errors: List[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    def choice(key: str, value, choices) -> None:
        need(value in choices, f"{prefix}.{key} must be one of {tuple(choices)}, got {value!r}")

    choice("OPTIMIZER", node.OPTIMIZER, OPTIMIZERS)
    choice("COMPAT", node.COMPAT, COMPAT_MODES)
    choice("GRAD_STRATEGY", node.GRAD_STRATEGY, STRATEGIES)
    choice("DIST_MODE", node.DIST_MODE, DIST_MODES)
    need(0.0 <= node.DAMPENING < 1.0, f"{prefix}.DAMPENING must lie in [0, 1), got {node.DAMPENING}")
    if node.OPTIMIZER == "dot":
        need(bool(node.ENABLED), f"{prefix}.OPTIMIZER dot needs {prefix}.ENABLED True")
        need(bool(node.DECOUPLE), f"{prefix}.OPTIMIZER dot keeps two momentum buffers: it contradicts "
                                  f"{prefix}.DECOUPLE False")
    if decoupled(node):
        if node.OPTIMIZER == "dot":
            for name, m in (("task", momentum - node.DOT_DELTA), ("distillation", momentum + node.DOT_DELTA)):
                need(0.0 <= m < 1.0, f"DOT {name} momentum {momentum_key} -/+ {prefix}.DOT_DELTA = "
                                     f"{momentum} -/+ {node.DOT_DELTA} = {m:g} is outside [0, 1)")
        else:
            for comp in ("TOG", "TCG", "NCG"):
                delta = node[f"DELTA_{comp}"]
                m = momentum + delta
                need(0.0 <= m < 1.0, f"{comp} momentum {momentum_key} + {prefix}.DELTA_{comp} = "
                                     f"{momentum} + {delta} = {m:g} is outside [0, 1)")

    t = node.TOPK
    choice("TOPK.MODE", t.MODE, SCHEDULE_MODES)
    choice("TOPK.RANK", t.RANK, TOPK_RANK_CHOICES)
    if t.K_START < 0 or t.K_END < 0:
        errors.append(f"{prefix}.TOPK.K_START and K_END must be >= 1 (or 0 for the default)")
    elif any(not (isinstance(p, (list, tuple)) and len(p) == 2) for p in t.PHASES):
        errors.append(f"{prefix}.TOPK.PHASES must be a list of [progress, K] pairs, got {list(t.PHASES)}")
    elif num_nontarget is not None and t.MODE in SCHEDULE_MODES:
        for key in ("K_START", "K_END"):
            k = t[key]
            need(k == 0 or 1 <= k <= num_nontarget,
                 f"{prefix}.TOPK.{key}={k} is out of range: K must lie in [1, C-1] = [1, {num_nontarget}] "
                 "(the non-target classes), or 0 for the default")
        if num_nontarget >= 2 and t.MODE in ("constant", "linear", "step"):
            ones = [key for key in ("K_START", "K_END") if t[key] == 1]
            ones += [f"PHASES K of {list(p)}" for p in t.PHASES if len(p) == 2 and p[1] == 1]
            if t.MODE == "constant":
                ones = [k for k in ones if k == "K_START"]
            need(not ones, f"{prefix}.TOPK {', '.join(ones)} = 1: NCKD over one non-target class is always zero "
                           "(nothing would be distilled); use K >= 2, or 0 for the default")
        try:
            TopKSchedule.from_cfg(t, num_nontarget)
        except ValueError as exc:
            errors.append(f"{prefix}.TOPK ({num_nontarget} non-target classes): {exc}")

    g = node.GSNR
    need(g.PERIOD >= 0, f"{prefix}.GSNR.PERIOD must be >= 0 (0: once per epoch), got {g.PERIOD}")
    need(g.WINDOW >= 2, f"{prefix}.GSNR.WINDOW must be >= 2 (a variance needs two mini-batches), got {g.WINDOW}")
    need(g.PERIOD == 0 or g.PERIOD >= g.WINDOW,
         f"{prefix}.GSNR.PERIOD ({g.PERIOD}) must be 0 or >= {prefix}.GSNR.WINDOW ({g.WINDOW})")
    return errors


def build_topk_schedule(node, num_nontarget: int) -> Optional[TopKSchedule]:
    """The dynamic top-k schedule over ``num_nontarget`` classes, or None when DeepKD or the mask is off."""
    if not node.ENABLED or node.TOPK.MODE == "off":
        return None
    return TopKSchedule.from_cfg(node.TOPK, num_nontarget)


def build_decoupled_optimizer(node, params, *, lr: float, momentum: float, weight_decay: float):
    """``DeepKDOptimizer`` (three buffers) or ``DOTOptimizer`` (two) over ``params`` (param groups work).

    ``COMPAT official`` selects each one's reference update: the released DeepKD optimizer, or
    mdistiller's DOT."""
    from .optim import DeepKDOptimizer, DOTOptimizer

    # The GSNR meter reads one gradient and one buffer per component: it keeps them apart.
    merge = bool(node.MERGE_EQUAL_MOMENTA) and not node.GSNR.ENABLED
    if node.OPTIMIZER == "dot":
        return DOTOptimizer(params, lr=lr, momentum=momentum, delta=node.DOT_DELTA, weight_decay=weight_decay,
                            dampening=node.DAMPENING, compat=node.COMPAT, merge_equal_momenta=merge)
    return DeepKDOptimizer(params, lr=lr, momentum=momentum, delta_tog=node.DELTA_TOG, delta_tcg=node.DELTA_TCG,
                           delta_ncg=node.DELTA_NCG, weight_decay=weight_decay, dampening=node.DAMPENING,
                           compat=node.COMPAT, merge_equal_momenta=merge)


def build_decoupled_step(node, optimizer, grad_hook=None, check_finite: bool = True, scaler=None,
                         clip_norm: float = 0.0):
    """The ``DecoupledStep`` of ``GRAD_STRATEGY`` over ``optimizer`` (``scaler``: fp16, core.amp;
    ``clip_norm``: norm clip of the summed gradient, see core.step)."""
    from .step import DecoupledStep

    return DecoupledStep(optimizer, node.GRAD_STRATEGY, grad_hook=grad_hook, check_finite=check_finite,
                         scaler=scaler, clip_norm=clip_norm, dist_mode=node.DIST_MODE)


def build_gsnr_meter(node, named_parameters, steps_per_epoch: int):
    """GSNR/BSNR meter: a window of ``GSNR.WINDOW`` iterations every ``GSNR.PERIOD`` (0: every epoch)."""
    from .gsnr import GSNRMeter

    window = node.GSNR.WINDOW
    period = node.GSNR.PERIOD or steps_per_epoch
    return GSNRMeter(named_parameters, window=window, period=max(period, window))
