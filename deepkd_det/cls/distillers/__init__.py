"""Distillers (one file per method): vanilla cross-entropy, KD, DKD, MLKD, CRLD, DiffKD; each plain or with DeepKD."""

from __future__ import annotations

from typing import Type

from deepkd_det.core.settings import topk_rank

from .base import Distiller, StepContext, TwoViewDistiller
from .crld import CRLD
from .diffkd import DiffKD
from .dkd import DKD
from .gpd import GPD
from .kd import KD
from .mlkd import MLKD
from .reviewkd import ReviewKD
from .vanilla import Vanilla

__all__ = ["CRLD", "DISTILLERS", "DKD", "DiffKD", "GPD", "KD", "MLKD", "ReviewKD", "Distiller", "StepContext", "TwoViewDistiller", "Vanilla",
           "build_distiller", "distiller_class"]

DISTILLERS = {"NONE": Vanilla, "KD": KD, "DKD": DKD, "MLKD": MLKD, "CRLD": CRLD, "DIFFKD": DiffKD,
              "REVIEWKD": ReviewKD}


def distiller_class(cfg) -> Type[Distiller]:
    """The class ``cfg.DISTILLER.TYPE`` names (e.g. to read ``needs_two_views`` before building data)."""
    kind = cfg.DISTILLER.TYPE
    if kind not in DISTILLERS:
        raise ValueError(f"unknown DISTILLER.TYPE {kind!r}; choose from {sorted(DISTILLERS)}")
    return DISTILLERS[kind]


def build_distiller(cfg, student, teacher=None, num_classes=None) -> Distiller:
    """The distiller ``cfg.DISTILLER.TYPE`` names, with its loss settings from ``cfg``
    (``num_classes``: the data's class count; default: the dataset type's); with
    ``GPD.ENABLED`` wrapped in :class:`GPD` (``student`` is then the shared model, ``widen_student``)."""
    inner = _build_method(cfg, student, teacher, num_classes)
    if not cfg.GPD.ENABLED:
        return inner
    g = cfg.GPD
    return GPD(inner, kd_ratio=g.KD_RATIO, smoothing=g.SMOOTHING,
               dynamic_teacher_static_kd=g.DYNAMIC_TEACHER_STATIC_KD, buffers=g.DEEPKD_BUFFERS)


def _build_method(cfg, student, teacher=None, num_classes=None) -> Distiller:
    kind = cfg.DISTILLER.TYPE
    stand = cfg.DISTILLER.LOGIT_STAND
    # compat "official" reproduces the released code's losses where they differ from the paper:
    # with OPTIMIZER deepkd those of its DeepKD trainer; with OPTIMIZER dot those of mdistiller's
    # DOT trainer, i.e. the plain losses, never masked. Its DeepKD trainer masks DKD and CRLD
    # (ranked as DEEPKD.TOPK.RANK says, "auto" = its ranking), never KD (a keyword typo) nor
    # MLKD (no top-k argument), and its KD there ignores KD.KD_WEIGHT.
    deep = cfg.DEEPKD
    official = deep.ENABLED and deep.COMPAT == "official"
    release_deepkd = official and deep.OPTIMIZER == "deepkd"
    release_dot = official and deep.OPTIMIZER == "dot"
    rank = topk_rank(deep)
    if kind == "NONE":
        return Vanilla(student)
    if kind == "KD":
        return KD(student, teacher, temperature=cfg.KD.TEMPERATURE, ce_weight=cfg.KD.CE_WEIGHT,
                  kd_weight=1.0 if release_deepkd else cfg.KD.KD_WEIGHT, warmup=cfg.KD.WARMUP,
                  coupling="batch" if release_deepkd else "row", apply_topk=not official, logit_stand=stand,
                  topk_rank=rank)
    if kind == "DKD":
        d = cfg.DKD
        return DKD(student, teacher, ce_weight=d.CE_WEIGHT, alpha=d.ALPHA, beta=d.BETA, temperature=d.T,
                   warmup=d.WARMUP, logit_stand=stand, apply_topk=not release_dot, topk_rank=rank)
    if kind == "MLKD":
        m = cfg.MLKD
        return MLKD(student, teacher, temperatures=m.TEMPERATURES, ce_weight=m.CE_WEIGHT, kd_weight=m.KD_WEIGHT,
                    split=m.SPLIT, alpha=m.ALPHA, beta=m.BETA, warmup=m.WARMUP,
                    confidence_mask=m.CONFIDENCE_MASK, logit_stand=stand, apply_topk=not official,
                    topk_rank=rank)
    if kind == "CRLD":
        c = cfg.CRLD
        # The DeepKD release gates batch-mean CRLD terms, i.e. by the kept fraction ("release").
        return CRLD(student, teacher, temperature=c.T, ce_weight=c.CE_WEIGHT, within_weight=c.WITHIN_WEIGHT,
                    cross_weight=c.CROSS_WEIGHT, tau_weak=c.TAU_WEAK, tau_strong=c.TAU_STRONG, split=c.SPLIT,
                    alpha=c.ALPHA, beta=c.BETA, warmup=c.WARMUP,
                    confidence_mask="release" if release_deepkd else c.CONFIDENCE_MASK, logit_stand=stand,
                    apply_topk=not release_dot, topk_rank=rank)
    if kind == "DIFFKD":
        from ..config import NUM_CLASSES

        d = cfg.DIFFKD
        return DiffKD(student, teacher, num_classes=int(num_classes or NUM_CLASSES[cfg.DATASET.TYPE]),
                      student_channels=student.feature_dim, teacher_channels=teacher.feature_dim,
                      ce_weight=d.CE_WEIGHT, feature_weight=d.FEATURE_WEIGHT, logit_weight=d.LOGIT_WEIGHT,
                      diff_weight=d.DIFF_WEIGHT, ae_weight=d.AE_WEIGHT, ae_channels=d.AE_CHANNELS,
                      inference_steps=d.INFERENCE_STEPS, warmup=d.WARMUP)
    if kind == "REVIEWKD":
        from .gpd import probe_size

        r = cfg.REVIEWKD
        return ReviewKD(student, teacher, probe_size(cfg), ce_weight=r.CE_WEIGHT, weight=r.WEIGHT, warmup=r.WARMUP,
                        student_preact=r.STUDENT_PREACT, mid_channels=r.MID_CHANNELS)
    raise ValueError(f"unknown DISTILLER.TYPE {kind!r}; choose from {sorted(DISTILLERS)}")
