"""The frozen teacher detector: built from cfg.TEACHER, loaded, checked, always in eval mode.

A randomly initialised teacher must never train silently: every teacher parameter and buffer
must come from the checkpoint (missing or unexpected keys stop the build with their names;
deepkd_det/det/weights/teacher.py), unless TEACHER.ALLOW_RANDOM_INIT is set for a smoke run.

Its forward runs at its cheapest exact form: a copy of the backbone and box head in which every
detectron2 ``Conv2d`` followed by its ``FrozenBatchNorm2d`` is one conv (TEACHER.FOLD_NORM; the
folding maths is ``deepkd_det.core.teacher``'s), optionally channels-last (TEACHER.CHANNELS_LAST)
and under autocast (TEACHER.AMP_DTYPE, logits and features returned in float32). The copy is
rebuilt whenever a teacher tensor changes (loading, ``.to(device)``), so the teacher's own
modules and state dict stay those of detectron2.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, ImageList
from torch import nn

from deepkd_det.core.amp import AMP_DTYPES, autocast
from deepkd_det.core.teacher import batchnorm_affine, copy_module_sharing_hooks, fold_affine_into_conv_
from deepkd_det.det.config import resolve_teacher_cfg
from deepkd_det.det.weights.teacher import TeacherWeightsError, load_teacher

__all__ = [
    "Teacher",
    "box_head_problem",
    "fold_frozen_batchnorm",
    "build_teacher",
    "TeacherWeightsError",
]

logger = logging.getLogger(__name__)


def _fixed_norm(norm) -> bool:
    """A norm layer that is an affine map per channel in the teacher's eval mode."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None


@torch.no_grad()
def fold_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` in which each detectron2 ``Conv2d`` absorbs its ``norm``.

    detectron2's ``Conv2d`` applies ``norm`` (FrozenBatchNorm2d, or a BatchNorm with running
    statistics: the teacher runs in eval mode) right after the convolution, so ``norm(conv(x))``
    is one conv with scaled weights and a bias (``core.teacher.fold_affine_into_conv_``). The
    copy's norms become None; ``module`` is not modified.
    """
    folded = copy_module_sharing_hooks(module).eval()
    for m in folded.modules():
        if isinstance(m, D2Conv2d) and _fixed_norm(m.norm):
            n = m.norm
            scale, shift = batchnorm_affine(n.running_mean, n.running_var, n.weight, n.bias, n.eps)
            fold_affine_into_conv_(m, scale, shift)
            m.norm = None
    return folded.requires_grad_(False)


class Teacher(nn.Module):
    """Any detectron2 detector as a frozen teacher: its children (``backbone`` and
    ``proposal_generator`` / ``roi_heads`` of a GeneralizedRCNN, ``head`` / ``anchor_generator``
    of a RetinaNet, ...) are this module's children, so its state-dict keys are the detector's
    own; ``model`` is the detector itself. Its own ``pixel_mean`` / ``pixel_std`` (non-persistent).

    Frozen (no gradients) and always in eval mode: ``train()`` is a no-op. ``fold_norm``,
    ``channels_last`` and ``amp_dtype`` choose the forward (module docstring). The distillation
    parts read it through ``features``, ``box_logits`` (an R-CNN box head on given boxes) and
    ``dense_outputs`` (a dense head's raw outputs).
    """

    def __init__(
        self, model: nn.Module, pixel_mean, pixel_std, input_format: str = "BGR",
        fold_norm: bool = True, channels_last: bool = False, amp_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.fold_norm = bool(fold_norm)
        self.channels_last = bool(channels_last)
        self.amp_dtype = amp_dtype
        # {name: (key, module)}: the folded copies; not submodules, not in the state dict
        self._fast: Dict[str, tuple] = {}
        object.__setattr__(self, "model", model)  # the detector; its children are registered below
        if any(True for _ in model.parameters(recurse=False)):
            raise ValueError(f"a teacher {type(model).__name__} with parameters of its own is not supported")
        for name, child in model.named_children():
            self.add_module(name, child)
        self.input_format = input_format
        # (config key, file) the weights came from at build time; None for a random teacher.
        # Once loaded, a teacher never changes (DeepKDCheckpointer refuses a different one).
        self.weights_source: Tuple[str, str] | None = None
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False
        )
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        model.train(False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.model._apply(fn, recurse=False)  # the detector's own (non-persistent) buffers
        return self

    def train(self, mode: bool = True) -> Teacher:
        # Frozen BN statistics and deterministic heads, whatever the student does.
        return super().train(False)

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def num_classes(self) -> int:
        rh = getattr(self.model, "roi_heads", None)
        return int(rh.num_classes) if rh is not None else int(self.model.num_classes)

    def has_box_head(self) -> bool:
        """A single R-CNN box head (pooler, head, predictor) that classifies given boxes."""
        return box_head_problem(self.model) is None

    def preprocess(
        self, images: List[torch.Tensor], input_format: str, pad_to: Tuple[int, int] | None = None
    ) -> ImageList:
        """Student-format images -> the teacher's channel order and normalisation, padded.

        ``pad_to`` (H, W): pad the batch to exactly this size (the student's padded size, so that
        the two FPNs' maps line up for feature distillation); it must be a multiple of the
        teacher's size divisibility and at least the teacher's own padded size.
        """
        if input_format != self.input_format:
            if {input_format, self.input_format} != {"BGR", "RGB"}:
                raise ValueError(f"cannot convert {input_format} images to the teacher's {self.input_format}")
            images = [x.flip(0) for x in images]
        images = [(x.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std for x in images]
        image_list = ImageList.from_tensors(images, self.backbone.size_divisibility)
        if pad_to is not None:
            h, w = image_list.tensor.shape[-2:]
            div = max(int(self.backbone.size_divisibility), 1)
            if pad_to[0] < h or pad_to[1] < w or pad_to[0] % div or pad_to[1] % div:
                raise ValueError(
                    f"cannot pad the teacher's {h}x{w} batch to {pad_to[0]}x{pad_to[1]} (teacher size "
                    f"divisibility {div}): the student's padding must be a multiple of the teacher's"
                )
            # Zero padding after normalisation, as ImageList.from_tensors pads.
            tensor = F.pad(image_list.tensor, (0, pad_to[1] - w, 0, pad_to[0] - h), value=0.0)
            image_list = ImageList(tensor, image_list.image_sizes)
        return image_list

    def _fast_module(self, name: str) -> nn.Module:
        """``backbone``, ``box_head`` (of the ROI heads) or ``head`` (a dense head) as the forward
        runs it: the folded / channels-last copy when asked, kept up to date."""
        module = self.roi_heads.box_head if name == "box_head" else getattr(self, name)
        if not (self.fold_norm or self.channels_last):
            return module
        tensors = [*module.parameters(), *module.buffers()]
        # Hooks too: the copy carries the hooks registered when it was made, so it is remade
        # when one is added or removed (a spy on teacher.backbone sees the forward).
        hooks = tuple((tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for m in module.modules())
        key = (self.fold_norm, self.channels_last, tuple((t.data_ptr(), t._version) for t in tensors), hooks)
        cached = self._fast.get(name)
        if cached is None or cached[0] != key:
            fold = fold_frozen_batchnorm if self.fold_norm else (lambda m: copy_module_sharing_hooks(m).requires_grad_(False))
            copy = fold(module)
            if self.channels_last and name == "backbone":
                copy.to(memory_format=torch.channels_last)
            self._fast[name] = cached = (key, copy)
        return cached[1]

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.amp_dtype is not None else x

    @torch.no_grad()
    def features(
        self, images: List[torch.Tensor], input_format: str, pad_to: Tuple[int, int] | None = None
    ) -> Dict[str, torch.Tensor]:
        """The teacher backbone's (FPN) feature maps of the student-format images, no gradient."""
        backbone = self._fast_module("backbone")
        x = self.preprocess(images, input_format, pad_to).tensor
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, self.amp_dtype):
            out = backbone(x)
        return {k: self._float(v) for k, v in out.items()}

    @torch.no_grad()
    def box_logits(
        self,
        images: List[torch.Tensor] | None,
        input_format: str,
        boxes: List[Boxes],
        features: Dict[str, torch.Tensor] | None = None,
        with_deltas: bool = False,
    ):
        """Classification logits of the teacher's box head on the given boxes (image coordinates);
        with ``with_deltas`` the pair ``(logits, box-regression deltas)`` of the same pass.

        ``features``: the teacher's feature maps when already computed (``Teacher.features``), so
        that the backbone runs once per iteration; otherwise they are computed from ``images``.
        """
        if features is None:
            features = self.features(images, input_format)
        rh = self.roi_heads
        box_head = self._fast_module("box_head")
        pooled = rh.box_pooler([features[f] for f in rh.box_in_features], boxes)
        with autocast(pooled.device, self.amp_dtype):
            scores, deltas = rh.box_predictor(box_head(pooled))
        # every KD loss in float32
        return (self._float(scores), self._float(deltas)) if with_deltas else self._float(scores)

    @torch.no_grad()
    def dense_outputs(self, features: Dict[str, torch.Tensor]):
        """The dense head's raw outputs on the teacher's ``features`` (``Teacher.features``), in
        the head's own layout (RetinaNet: per-level class logits and box deltas, N x (A*K) x H x W
        and N x (A*4) x H x W), float32."""
        head = self._fast_module("head")
        x = [features[f] for f in self.model.head_in_features]
        with autocast(x[0].device, self.amp_dtype):
            out = head(x)
        return tuple([self._float(t) for t in level] for level in out)

    def forward(self, *args, **kwargs):
        raise RuntimeError("the teacher is used through the distillation parts (Teacher.features / box_logits / "
                           "dense_outputs), not called directly")


def box_head_problem(model: nn.Module) -> str | None:
    """Why ``model`` has no single R-CNN box head that classifies given boxes (None: it has one).
    Cascade heads (one box head per stage) and dense detectors have none."""
    rh = getattr(model, "roi_heads", None)
    if rh is None:
        return f"{type(model).__name__} has no R-CNN box head"
    for attr in ("box_pooler", "box_head", "box_predictor", "box_in_features"):
        if not hasattr(rh, attr):
            return f"its ROI heads ({type(rh).__name__}) have no {attr}"
    if isinstance(rh.box_predictor, nn.ModuleList):
        return f"its ROI heads ({type(rh).__name__}) have one box head per cascade stage"
    return None


def build_teacher(cfg, needs=None) -> Teacher:
    """Build the teacher from cfg.TEACHER and load its weights (``deepkd_det.det.weights.teacher.load_teacher``;
    ``needs``: what the parts read of it, so a file may leave out the heads none of them runs).

    Weights come from TEACHER.MODEL.WEIGHTS, else from the ``teacher.*`` keys of MODEL.WEIGHTS
    (a combined release file). Without either, the build fails unless TEACHER.ALLOW_RANDOM_INIT.
    Both set and holding different teachers is an error (here for a ``.pth`` MODEL.WEIGHTS, in
    DeepKDCheckpointer for any file): the two keys must not compete.
    """
    tcfg = resolve_teacher_cfg(cfg)
    teacher = Teacher(
        META_ARCH_REGISTRY.get(tcfg.MODEL.META_ARCHITECTURE)(tcfg),
        pixel_mean=tcfg.MODEL.PIXEL_MEAN,
        pixel_std=tcfg.MODEL.PIXEL_STD,
        input_format=cfg.TEACHER.INPUT_FORMAT,
        fold_norm=cfg.TEACHER.FOLD_NORM,
        channels_last=cfg.TEACHER.CHANNELS_LAST,
        amp_dtype=AMP_DTYPES[cfg.TEACHER.AMP_DTYPE] if cfg.TEACHER.AMP_DTYPE else None,
    )
    load_teacher(teacher, cfg, needs)
    return teacher
