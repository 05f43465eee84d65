"""DistillDetector: a student detector, a frozen teacher and the distillation parts.

The student is any detectron2 meta-architecture (KD.STUDENT_ARCHITECTURE: GeneralizedRCNN with
standard, cascade or mask ROI heads, RetinaNet, ...); its children are this module's children,
so the state-dict keys are the plain detector's, the teacher's are under ``teacher.`` (the layout
of the ReviewKD / mdistiller combined release files) and each part's trainable modules under the
names the part gives them (``reviewkd_head.*``, ``diffkd.<level>.*``): what a part owns is
training-only by construction (``training_only_prefixes``).

Training: the student runs its own forward and returns its own losses; taps record what the parts
need from it (backbone features and the padded size; the R-CNN box head's sampled boxes, logits,
deltas and labels; a dense head's outputs); the teacher runs at most once per iteration (features,
then its heads on what the parts ask) and each part adds its losses. Inference: the student alone.
Registered in detectron2's META_ARCH_REGISTRY as "DistillDetector" and, for the configs written
before it existed, "DeepKDRCNN" (the same class).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from torch import nn

from deepkd_det.det.config import WRAPPER_ARCHITECTURES, validate_deepkd_config
from deepkd_det.det.modeling.teacher import Teacher, build_teacher

from .parts.base import DISTILL_PART_REGISTRY, NEEDS, DistillPart, part_order

__all__ = ["DistillDetector", "DeepKDRCNN", "DistillContext", "build_student", "build_parts", "parts_enabled"]

TEACHER_PREFIX = "teacher."


class _Taps:
    """Forward hooks on the student that record, while active, what the parts need."""

    def __init__(self, student: nn.Module, needs):
        self.needs = set(needs)
        self.active = False
        self.reset()
        if "features" in self.needs:
            student.backbone.register_forward_hook(self._backbone)
        if "box_head" in self.needs:
            rh = student.roi_heads
            rh.box_pooler.register_forward_pre_hook(self._pooler)
            rh.box_predictor.register_forward_hook(self._predictor)
            rh.register_forward_hook(self._roi_heads)
        if "dense_head" in self.needs:
            student.head.register_forward_hook(self._dense)

    def reset(self):
        self.calls = {"backbone": 0, "predictor": 0, "dense": 0}
        self.image_size = self.features = None
        self.box = SimpleNamespace(boxes=None, scores=None, deltas=None, labels=None)
        self.dense = None

    def _backbone(self, module, args, output):
        if self.active:
            self.calls["backbone"] += 1
            self.image_size = tuple(args[0].shape[-2:])
            self.features = output

    def _pooler(self, module, args):
        if self.active:
            self.box.boxes = [b.clone() for b in args[1]]

    def _predictor(self, module, args, output):
        if self.active:
            self.calls["predictor"] += 1
            self.box.scores, self.box.deltas = output[0], output[1]

    def _roi_heads(self, module, args, output):
        # In training ROI heads return (sampled proposals, losses); the pooler saw these
        # proposals in this order, so their gt_classes line up with the logits row by row.
        if self.active:
            self.box.labels = torch.cat([p.gt_classes for p in output[0]])

    def _dense(self, module, args, output):
        if self.active:
            self.calls["dense"] += 1
            self.dense = output

    def check(self):
        if "box_head" in self.needs and (self.calls["predictor"] != 1 or self.box.boxes is None or self.box.labels is None):
            raise RuntimeError(
                f"the student's box head ran {self.calls['predictor']} times in one forward; the box-head parts need "
                "a single-stage box head (StandardROIHeads)"
            )
        if "features" in self.needs and self.calls["backbone"] != 1:
            raise RuntimeError(f"the student's backbone ran {self.calls['backbone']} times in one forward, expected once")
        if "dense_head" in self.needs and self.calls["dense"] != 1:
            raise RuntimeError(f"the student's dense head ran {self.calls['dense']} times in one forward, expected once")


class DistillContext:
    """One training iteration as the parts see it: the student's recorded outputs and the
    teacher's, each computed at most once (lazily, on first use)."""

    def __init__(self, wrapper: DistillDetector, batched_inputs, taps: _Taps):
        self.batched_inputs = batched_inputs
        self.student = wrapper.student
        self.teacher: Teacher = wrapper.teacher
        self.student_features = taps.features
        self.image_size = taps.image_size
        self.box = taps.box
        self.dense = taps.dense
        self.iter = get_event_storage().iter
        self.progress = self.iter / wrapper.max_iter
        # With a feature part the teacher's batch is padded to the student's padded size, so that
        # the maps of both have the same shapes level by level.
        self._pad_to = taps.image_size if "features" in taps.needs else None
        self._cache: Dict[str, object] = {}

    def _once(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def teacher_features(self) -> Dict[str, torch.Tensor]:
        def compute():
            images = [x["image"].to(self.student.device) for x in self.batched_inputs]
            return self.teacher.features(images, self.student.input_format, self._pad_to)

        return self._once("features", compute)

    def teacher_box(self):
        """(logits, deltas) of the teacher's box head on the student's sampled boxes."""
        return self._once("box", lambda: self.teacher.box_logits(
            None, self.student.input_format, self.box.boxes, features=self.teacher_features(), with_deltas=True))

    def teacher_dense(self):
        return self._once("dense", lambda: self.teacher.dense_outputs(self.teacher_features()))


def build_student(cfg) -> nn.Module:
    """The student detector of KD.STUDENT_ARCHITECTURE, built from cfg's MODEL."""
    arch = cfg.KD.STUDENT_ARCHITECTURE
    if arch in WRAPPER_ARCHITECTURES:
        raise ValueError(f"KD.STUDENT_ARCHITECTURE {arch!r} is the distillation wrapper itself; name a detector "
                         "(GeneralizedRCNN, RetinaNet, ...)")
    if arch not in META_ARCH_REGISTRY:
        raise ValueError(f"KD.STUDENT_ARCHITECTURE {arch!r} is not a registered detectron2 meta-architecture")
    return META_ARCH_REGISTRY.get(arch)(cfg)


def parts_enabled(cfg) -> List[str]:
    """Names of the parts the config turns on, in part_order()."""
    return [n for n in part_order() if DISTILL_PART_REGISTRY.get(n).enabled(cfg)]


def build_parts(cfg, student, teacher) -> List[DistillPart]:
    """Every enabled part, built in part_order() (which fixes the random initialisation order)."""
    parts = []
    for name in part_order():
        part = DISTILL_PART_REGISTRY.get(name).from_config(cfg, student, teacher)
        if part is not None:
            parts.append(part)
    return parts


@META_ARCH_REGISTRY.register()
class DistillDetector(nn.Module):
    """A student detector distilled from a frozen teacher by a list of parts (module docstring)."""

    @configurable
    def __init__(self, *, student: nn.Module, teacher: Optional[Teacher], parts: Sequence[DistillPart], max_iter: int):
        super().__init__()
        parts = list(parts)
        if parts and teacher is None:
            raise ValueError(f"the distillation parts {[p.name for p in parts]} need a teacher")
        if max_iter is None or int(max_iter) < 1:
            raise ValueError(f"max_iter must be the run's number of iterations (>= 1), got {max_iter!r}")
        if any(True for _ in student.parameters(recurse=False)):
            raise ValueError(f"a student {type(student).__name__} with parameters of its own is not supported")
        for name, child in student.named_children():
            self._modules[name] = child  # the student's keys, unprefixed
        object.__setattr__(self, "student", student)  # not a submodule: its children are
        self.teacher = teacher
        self.parts = parts
        self.max_iter = int(max_iter)
        components: Dict[str, str] = {}
        for part in parts:
            for name, module in part.modules().items():
                if name not in part.module_names:
                    raise ValueError(f"part {part.name!r}: module {name!r} is not in its module_names")
                if name in self._modules:
                    raise ValueError(f"part {part.name!r}: module name {name!r} is taken")
                self.add_module(name, module)
            for loss, comp in part.components().items():
                if comp not in ("tcg", "ncg") or loss in components:
                    raise ValueError(f"part {part.name!r}: loss {loss!r} -> {comp!r} is not a free TCG/NCG loss")
                components[loss] = comp
        self.loss_components = components
        needs = set().union(*(p.needs for p in parts)) if parts else set()
        unknown = needs - set(NEEDS)
        if unknown:
            raise ValueError(f"unknown part needs {sorted(unknown)}")
        # What the parts read from the teacher: a file may leave out the teacher heads no part
        # runs (deepkd_det/det/weights: absent_teacher_modules).
        self.teacher_needs = frozenset(needs)
        self._taps = _Taps(student, needs)

    @classmethod
    def from_config(cls, cfg):
        validate_deepkd_config(cfg)
        student = build_student(cfg)
        enabled = parts_enabled(cfg)
        needs = frozenset().union(*(DISTILL_PART_REGISTRY.get(n).needs for n in enabled)) if enabled else frozenset()
        teacher = build_teacher(cfg, needs) if enabled else None
        return {"student": student, "teacher": teacher, "parts": build_parts(cfg, student, teacher),
                "max_iter": cfg.SOLVER.MAX_ITER}

    # ------------------------------------------------------------------ module plumbing

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.student._apply(fn, recurse=False)  # the student's own (non-persistent) buffers
        return self

    def train(self, mode: bool = True) -> DistillDetector:
        super().train(mode)
        self.student.training = mode
        if self.teacher is not None:
            self.teacher.eval()  # Teacher.train() is a no-op already; stated for clarity
        return self

    @property
    def device(self):
        return self.student.device

    def __getattr__(self, name: str):
        # The student's own attributes (input_format, pixel_mean / pixel_std, num_classes, ...)
        # read through the wrapper, as they read on the plain detector.
        try:
            return super().__getattr__(name)
        except AttributeError:
            student = self.__dict__.get("student")
            if student is not None and not name.startswith("_") and hasattr(student, name):
                return getattr(student, name)
            raise

    def part(self, name: str) -> Optional[DistillPart]:
        """The part called ``name`` (``DistillPart.name``), or None."""
        return next((p for p in self.parts if p.name == name), None)

    @property
    def topk_schedule(self):
        """The DeepKD top-k schedule of the logit part (checkpointed by the trainer), or None."""
        return next((p.topk_schedule for p in self.parts if getattr(p, "topk_schedule", None) is not None), None)

    @property
    def training_only_prefixes(self) -> List[str]:
        """State-dict prefixes that are not the student: the teacher and every part's modules."""
        return [TEACHER_PREFIX] + [f"{name}." for p in self.parts for name in p.modules()]

    # ------------------------------------------------------------------ forward

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training or not self.parts:
            return self.student(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError("distillation training needs ground-truth 'instances' in the inputs")
        taps = self._taps
        taps.reset()
        taps.active = True
        try:
            losses = self.student(batched_inputs)
        finally:
            taps.active = False
        taps.check()
        ctx = DistillContext(self, batched_inputs, taps)
        for part in self.parts:
            new = part.losses(ctx)
            clash = set(new) & set(losses)
            if clash:
                raise RuntimeError(f"part {part.name!r} returned losses {sorted(clash)} that already exist")
            losses.update(new)
        taps.reset()  # drop the graph references
        return losses


@META_ARCH_REGISTRY.register()
class DeepKDRCNN(DistillDetector):
    """The name of DistillDetector in the configs written before it (same class, same keys)."""
