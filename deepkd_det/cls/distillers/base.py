"""The distiller base class: a student, an optional frozen teacher, three component losses.

``forward_train`` returns the student logits and a dict of DeepKD's component losses:
``tog`` (the task loss, cross-entropy times its weight), and for distillation methods ``tcg``
and ``ncg`` (the target-class and non-target-class terms). Plain training sums them into one
backward pass; DeepKD gives each its own gradient and momentum buffer.

Two-view methods (MLKD, CRLD) subclass :class:`TwoViewDistiller`: ``needs_two_views = True``
tells the trainer to build the training set with a weak and a strong view of each image, and
``forward_train`` then receives ``image = (weak, strong)``; ``component_losses`` receives the
student and the teacher logits as ``(weak, strong)`` pairs. The returned logits are the
student's on the weak view (training accuracy).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["Distiller", "StepContext", "TwoViewDistiller"]


class StepContext:
    """What a loss may depend on besides the batch: the epoch (1-based) and the top-k K."""

    def __init__(self, epoch: int = 1, topk: Optional[int] = None):
        self.epoch = epoch
        self.topk = topk


class Distiller(nn.Module):
    """Student plus (frozen, eval-mode) teacher. Subclasses implement :meth:`component_losses`."""

    needs_teacher = True
    needs_two_views = False  # True: forward_train takes (weak, strong) views of each batch

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__()
        self.student = student
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher model")
        # Not a registered submodule: the teacher's weights stay out of state_dict/parameters.
        self.__dict__["teacher"] = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)  # the student and any training-only modules of the method (DiffKD's)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never leaves eval mode (batch-norm statistics frozen)
        return self

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        if self.teacher is not None:
            self.teacher.to(*args, **kwargs)
        return self

    def extra_state_dict(self) -> Dict[str, torch.Tensor]:
        """State of the method's own training-only modules (everything but the student; the
        teacher is not registered): saved in full checkpoints, never in student-only files."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def extra_parameters(self):
        """Trainable parameters of the method's own modules (trained with the student)."""
        return [p for n, p in self.named_parameters() if not n.startswith("student.") and p.requires_grad]

    def teacher_logits(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(image)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor,
                      ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        logits_student = self.student(image)
        logits_teacher = self.teacher_logits(image) if self.teacher is not None else None
        return logits_student, self.component_losses(logits_student, logits_teacher, target, ctx)

    def component_losses(self, logits_student, logits_teacher, target, ctx: StepContext) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def buffer_losses(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The losses grouped by DeepKD buffer (``tog`` / ``tcg`` / ``ncg``): here they already are."""
        return losses

    def forward_test(self, image: torch.Tensor) -> torch.Tensor:
        return self.student(image)

    def forward(self, image: torch.Tensor, target: Optional[torch.Tensor] = None,
                ctx: Optional[StepContext] = None):
        if self.training:
            if target is None:
                raise ValueError("training forward needs the targets")
            return self.forward_train(image, target, ctx or StepContext())
        return self.forward_test(image)


class TwoViewDistiller(Distiller):
    """A distiller trained on two views of each batch: ``forward_train((weak, strong), target, ctx)``."""

    needs_two_views = True

    def forward_train(self, image, target, ctx):
        if not (isinstance(image, (tuple, list)) and len(image) == 2):
            got = f"a tensor of shape {tuple(image.shape)}" if torch.is_tensor(image) else type(image).__name__
            raise ValueError(
                f"{type(self).__name__} needs two views of each batch, (weak, strong); got {got}. Build the "
                "training set with build_datasets(cfg, two_views=True) (the trainer does so when the "
                "distiller's needs_two_views is set)"
            )
        weak, strong = image
        if weak.shape != strong.shape:
            raise ValueError(f"weak and strong views differ in shape: {tuple(weak.shape)} vs {tuple(strong.shape)}")
        # One student pass per view, as the methods do: batch-norm statistics stay per view.
        student = (self.student(weak), self.student(strong))
        with torch.no_grad():  # eval-mode teacher: one batched pass gives the same logits
            teacher = tuple(self.teacher(torch.cat([weak, strong])).split(weak.shape[0]))
        return student[0], self.component_losses(student, teacher, target, ctx)
