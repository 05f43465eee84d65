"""GPD (Guo et al., ICLR 2025) in the classifier: the student trained with a width-shared dynamic teacher.

The trainer's student is the GPD shared model (``core.gpd.widen``): at ``STUDENT`` width it is the
student, at ``DYNAMIC_TEACHER`` width the student widened ``GPD.RATIO`` times. Each step, on the
same batch (the released step, docs/gpd.md §5):

1. dynamic teacher: ``CE + DKD(static teacher)`` (the inner DKD distiller's loss, no top-k mask:
   the mask is DeepKD's treatment of the student's NCKD); CE alone from scratch
   (``DISTILLER.TYPE NONE``) or with ``GPD.DYNAMIC_TEACHER_STATIC_KD False``;
2. student: the inner distiller's loss (``CE + DKD``, with DeepKD's top-k mask when on) plus
   ``GPD.KD_RATIO`` times the soft-target loss to the detached dynamic-teacher logits;
3. both gradients add in the shared weights (one backward of the sum, or one gradient per
   DeepKD buffer), clipped to ``GPD.CLIP_GRAD_NORM`` by the trainer.

Loss names: ``tog`` / ``tcg`` / ``ncg`` (the student's CE / TCKD / NCKD), ``dt_tog`` / ``dt_tcg`` /
``dt_ncg`` (the dynamic teacher's), ``gpd_kd`` (the weighted soft-target loss). ``buffer_losses``
maps them onto DeepKD's three buffers (``GPD.DEEPKD_BUFFERS``):

- ``"task"`` (default): TOG = student CE + the dynamic teacher's whole loss + soft-target loss;
  TCG = the student's TCKD; NCG = the student's (top-k masked) NCKD. DeepKD's decomposition is
  of the *student's* distillation gradient from the static teacher (its TCKD and NCKD, whose
  GSNR and momentum the paper tunes); the dynamic teacher's objective is a second network's
  training loss and the soft target a label-like target from a peer, so both ride with the task.
- ``"split"``: the dynamic teacher's TCKD / NCKD also go to TCG / NCG (its CE stays in TOG).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from deepkd_det.core.gpd import (
    DYNAMIC_TEACHER,
    STUDENT,
    at_width,
    export,
    gpd_soft_target_loss,
    widen,
)

from .base import Distiller, StepContext

__all__ = ["GPD", "plain_student", "widen_student"]

GPD_BUFFER_MAPS = {
    "task": {"tog": "tog", "tcg": "tcg", "ncg": "ncg", "dt_tog": "tog", "dt_tcg": "tog", "dt_ncg": "tog",
             "gpd_kd": "tog", "reviewkd": "tog", "dt_reviewkd": "tog"},
    "split": {"tog": "tog", "tcg": "tcg", "ncg": "ncg", "dt_tog": "tog", "dt_tcg": "tcg", "dt_ncg": "ncg",
              "gpd_kd": "tog", "reviewkd": "tog", "dt_reviewkd": "tog"},
}


def probe_size(cfg) -> int:
    """A small input resolution for the slicing check (global pooling makes any size work)."""
    if cfg.DATASET.TYPE == "digits":
        return cfg.DATASET.DIGITS.SIZE
    return 32 if cfg.DATASET.TYPE == "cifar100" else 64


def widen_student(cfg, student: nn.Module, check: bool = True) -> nn.Module:
    """The GPD shared model of ``student`` under ``cfg.GPD`` (RATIO, CBR, CBR_INIT).

    ``check``: both widths are compared on two random images (core.gpd.widen's ``example_input``),
    so a model that cannot be sliced (ShuffleNet's channel shuffle) is refused at start-up, naming
    ``DISTILLER.STUDENT``. The random images come from a private generator: the global RNG stream
    (initialisation, augmentation) is the same with or without the check.
    """
    g = cfg.GPD
    example = None
    if check:
        size = getattr(student, "img_size", None) or probe_size(cfg)  # fixed-size models: theirs
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(2, 3, size, size, generator=gen)
    try:
        return widen(student, g.RATIO, cbr=g.CBR, cbr_init=g.CBR_INIT, example_input=example)
    except ValueError as exc:
        raise ValueError(f"GPD.ENABLED: DISTILLER.STUDENT {cfg.DISTILLER.STUDENT!r} cannot be width-sliced: {exc}") \
            from None


def plain_student(model: nn.Module) -> nn.Module:
    """The ordinary student (core.gpd.export) of a shared model; a plain model is returned as is."""
    from deepkd_det.core.gpd import WidthSliced

    if any(isinstance(m, WidthSliced) for m in model.modules()):
        return export(model)
    return model


class GPD(Distiller):
    """Wraps the distiller of the student (Vanilla, DKD or ReviewKD) with the dynamic-teacher terms.

    A feature distiller (ReviewKD: ``widths_losses``) computes both widths' losses itself (each
    width with its own head, as the release's ``train_reviewkd.py``); its training-only modules
    are registered here too, so they are trained, checkpointed and resumed.
    """

    needs_teacher = False  # GPD from scratch has none; with DKD the inner distiller checked it

    def __init__(self, inner: Distiller, kd_ratio: float = 3.0, smoothing: float = 0.1,
                 dynamic_teacher_static_kd: bool = True, buffers: str = "task"):
        super().__init__(inner.student, inner.teacher)
        if inner.needs_two_views:
            raise ValueError(f"GPD wraps one-view distillers only, got {type(inner).__name__}")
        if buffers not in GPD_BUFFER_MAPS:
            raise ValueError(f"GPD buffers must be one of {tuple(GPD_BUFFER_MAPS)}, got {buffers!r}")
        self.__dict__["inner"] = inner  # not a submodule: the student is registered once, here
        for name, child in inner.named_children():  # the method's own modules (ReviewKD's heads)
            if name != "student":
                self.add_module(name, child)
        self.kd_ratio = kd_ratio
        self.smoothing = smoothing
        self.dynamic_teacher_static_kd = dynamic_teacher_static_kd
        self.buffer_map = GPD_BUFFER_MAPS[buffers]

    def _dynamic_teacher_losses(self, logits, logits_teacher, target, ctx) -> Dict[str, torch.Tensor]:
        if logits_teacher is None or not self.dynamic_teacher_static_kd:
            ce = self.inner.ce_weight * nn.functional.cross_entropy(logits, target)
            return {"dt_tog": ce}
        losses = self.inner.component_losses(logits, logits_teacher, target, StepContext(ctx.epoch, topk=None))
        return {"dt_" + name: value for name, value in losses.items()}

    def forward_train(self, image, target, ctx: StepContext):
        if hasattr(self.inner, "widths_losses"):
            logits_student, logits_dynamic, student, dynamic = self.inner.widths_losses(image, target, ctx)
            losses = {**student, **{"dt_" + name: value for name, value in dynamic.items()}}
            losses["gpd_kd"] = self.kd_ratio * gpd_soft_target_loss(logits_student, logits_dynamic, self.smoothing)
            return logits_student, losses
        logits_teacher = self.teacher_logits(image) if self.teacher is not None else None
        with at_width(self.student, DYNAMIC_TEACHER):
            logits_dynamic = self.student(image)
        losses = self._dynamic_teacher_losses(logits_dynamic, logits_teacher, target, ctx)
        with at_width(self.student, STUDENT):
            logits_student = self.student(image)
        student = self.inner.component_losses(logits_student, logits_teacher, target, ctx)
        losses = {**student, **losses}
        losses["gpd_kd"] = self.kd_ratio * gpd_soft_target_loss(logits_student, logits_dynamic, self.smoothing)
        return logits_student, losses

    def buffer_losses(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The losses summed per DeepKD buffer (``tog`` / ``tcg`` / ``ncg``), as ``GPD.DEEPKD_BUFFERS`` says."""
        out: Dict[str, torch.Tensor] = {}
        for name, value in losses.items():
            buffer = self.buffer_map[name]
            out[buffer] = value if buffer not in out else out[buffer] + value
        return out
