"""Distillers (one file per method): vanilla cross-entropy, KD, DKD, MLKD, CRLD; each plain or with DeepKD."""

from __future__ import annotations

from typing import Type

from .base import Distiller, StepContext, TwoViewDistiller
from .crld import CRLD
from .dkd import DKD
from .gpd import GPD
from .kd import KD
from .mlkd import MLKD
from .vanilla import Vanilla

__all__ = ["CRLD", "DISTILLERS", "DKD", "GPD", "KD", "MLKD", "Distiller", "StepContext", "TwoViewDistiller", "Vanilla",
           "build_distiller", "distiller_class"]

DISTILLERS = {"NONE": Vanilla, "KD": KD, "DKD": DKD, "MLKD": MLKD, "CRLD": CRLD}


def distiller_class(cfg) -> Type[Distiller]:
    """The class ``cfg.DISTILLER.TYPE`` names (e.g. to read ``needs_two_views`` before building data)."""
    kind = cfg.DISTILLER.TYPE
    if kind not in DISTILLERS:
        raise ValueError(f"unknown DISTILLER.TYPE {kind!r}; choose from {sorted(DISTILLERS)}")
    return DISTILLERS[kind]


def build_distiller(cfg, student, teacher=None) -> Distiller:
    """The distiller ``cfg.DISTILLER.TYPE`` names, with its loss settings from ``cfg``; with
    ``GPD.ENABLED`` wrapped in :class:`GPD` (``student`` is then the shared model, ``widen_student``)."""
    inner = _build_method(cfg, student, teacher)
    if not cfg.GPD.ENABLED:
        return inner
    g = cfg.GPD
    return GPD(inner, kd_ratio=g.KD_RATIO, smoothing=g.SMOOTHING,
               dynamic_teacher_static_kd=g.DYNAMIC_TEACHER_STATIC_KD, buffers=g.DEEPKD_BUFFERS)


def _build_method(cfg, student, teacher=None) -> Distiller:
    kind = cfg.DISTILLER.TYPE
    stand = cfg.DISTILLER.LOGIT_STAND
    # compat "official" reproduces the released reference code where it differs from the paper.
    official = cfg.DEEPKD.ENABLED and cfg.DEEPKD.COMPAT == "official"
    if kind == "NONE":
        return Vanilla(student)
    if kind == "KD":
        return KD(student, teacher, temperature=cfg.KD.TEMPERATURE, ce_weight=cfg.KD.CE_WEIGHT,
                  kd_weight=cfg.KD.KD_WEIGHT, warmup=cfg.KD.WARMUP,
                  coupling="batch" if official else "row", apply_topk=not official, logit_stand=stand)
    if kind == "DKD":
        d = cfg.DKD
        return DKD(student, teacher, ce_weight=d.CE_WEIGHT, alpha=d.ALPHA, beta=d.BETA, temperature=d.T,
                   warmup=d.WARMUP, logit_stand=stand)
    if kind == "MLKD":
        m = cfg.MLKD
        return MLKD(student, teacher, temperatures=m.TEMPERATURES, ce_weight=m.CE_WEIGHT, kd_weight=m.KD_WEIGHT,
                    split=m.SPLIT, alpha=m.ALPHA, beta=m.BETA, warmup=m.WARMUP,
                    confidence_mask=m.CONFIDENCE_MASK, logit_stand=stand)
    if kind == "CRLD":
        c = cfg.CRLD
        # The DeepKD release gates batch-mean CRLD terms, i.e. by the kept fraction ("release").
        return CRLD(student, teacher, temperature=c.T, ce_weight=c.CE_WEIGHT, within_weight=c.WITHIN_WEIGHT,
                    cross_weight=c.CROSS_WEIGHT, tau_weak=c.TAU_WEAK, tau_strong=c.TAU_STRONG, split=c.SPLIT,
                    alpha=c.ALPHA, beta=c.BETA, warmup=c.WARMUP,
                    confidence_mask="release" if official else c.CONFIDENCE_MASK, logit_stand=stand)
    raise ValueError(f"unknown DISTILLER.TYPE {kind!r}; choose from {sorted(DISTILLERS)}")
