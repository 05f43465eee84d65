"""DeepKDRCNN: Faster R-CNN student + frozen teacher, logit distillation on the R-CNN box head.

Training: the student runs as GeneralizedRCNN; the exact boxes its box head pooled (the sampled
proposals) and its class logits are captured with hooks, the teacher's box head classifies the
same boxes on its own features (its own normalisation and channel order, no gradient), and the
TCKD / NCKD terms come from ``deepkd_det.core.losses`` with labels = gt_classes of the sampled
proposals (background = NUM_CLASSES, the last index). With KD.REVIEWKD the student's FPN maps go
through a trained review head and are compared with the teacher's FPN maps (HCL), as
``loss_reviewkd``. With KD.DIFFKD each listed FPN level of the student is denoised by a
per-level DiffKD module and compared with the teacher's (``loss_diffkd_kd``, ``loss_diffkd_diff``,
``loss_diffkd_ae``), and the student's box deltas are pulled to the teacher's on the same boxes
(``loss_regkd``). The teacher backbone runs once per iteration for all of them. Inference: the
student alone.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.utils.events import get_event_storage
from torch import nn

from deepkd_det.core.boxkd import box_regression_kd_loss
from deepkd_det.core.losses import dkd_components, kd_components, warmup_factor
from deepkd_det.core.reviewkd import HCL_LEVELS, hcl_loss
from deepkd_det.core.settings import topk_rank
from deepkd_det.core.topk import TopKSchedule
from deepkd_det.det.config import build_topk_schedule, validate_deepkd_config

from .diffkd import build_diffkd_modules, diffkd_level_losses
from .reviewkd import build_reviewkd_head
from .teacher import Teacher, build_teacher

__all__ = ["DeepKDRCNN", "DISTILL_LOSS_KEYS"]

# Loss-dict keys of the two distillation components (the engine's TCG and NCG).
DISTILL_LOSS_KEYS = ("loss_tckd", "loss_nckd")


class _BoxHeadTap:
    """Records what the student's box head saw in one training forward: the boxes its pooler
    pooled (per image, copied) and the predictor's class logits (with their graph)."""

    def __init__(self):
        self.active = False
        self.start()
        self.active = False

    def start(self):
        self.active, self.calls = True, 0
        self.boxes: list | None = None
        self.scores: torch.Tensor | None = None
        self.deltas: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def stop(self):
        self.active = False

    def pooler_pre_hook(self, module, args):
        if self.active:
            self.boxes = [b.clone() for b in args[1]]

    def predictor_hook(self, module, args, output):
        if self.active:
            self.calls += 1
            self.scores, self.deltas = output[0], output[1]

    def roi_heads_hook(self, module, args, output):
        # In training ROI heads return (sampled proposals, losses); the pooler saw these
        # proposals in this order, so their gt_classes line up with the logits row by row.
        if self.active:
            self.labels = torch.cat([p.gt_classes for p in output[0]])


class _BackboneTap:
    """Records the student backbone's input size (the padded batch) and its output feature maps
    (with their graph) in one training forward."""

    def __init__(self):
        self.active = False
        self.image_size = self.features = None

    def start(self):
        self.active, self.calls = True, 0
        self.image_size: tuple | None = None
        self.features: Dict[str, torch.Tensor] | None = None

    def stop(self):
        self.active = False

    def hook(self, module, args, output):
        if self.active:
            self.calls += 1
            self.image_size = tuple(args[0].shape[-2:])
            self.features = output


@META_ARCH_REGISTRY.register()
class DeepKDRCNN(GeneralizedRCNN):
    """GeneralizedRCNN student with a frozen teacher under ``self.teacher``.

    State-dict keys: the student's as in GeneralizedRCNN, the teacher's under ``teacher.`` (the
    layout of the ReviewKD/mdistiller combined release files). ``self.teacher`` is None and the
    model is a plain GeneralizedRCNN when KD.TYPE is "NONE" and KD.REVIEWKD, KD.DIFFKD are off. With
    KD.REVIEWKD the trained review head is ``self.reviewkd_head`` (keys ``reviewkd_head.*``, a
    student part, not the teacher's); KD.TYPE "NONE" + KD.REVIEWKD gives ReviewKD alone. With
    KD.DIFFKD the per-level DiffKD modules are ``self.diffkd`` (keys ``diffkd.<level>.*``,
    training-only); KD.TYPE "NONE" + KD.DIFFKD gives DiffKD alone.
    """

    @configurable
    def __init__(
        self,
        *,
        teacher: Teacher | None,
        kd_type: str,
        alpha: float = 1.0,
        beta: float = 0.25,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        warmup_iters: int = 0,
        logit_stand: bool = False,
        coupling: str = "row",
        topk_schedule: TopKSchedule | None = None,
        topk_rank: str = "nontarget",
        max_iter: int = 1,
        reviewkd_head: nn.Module | None = None,
        reviewkd_in_features: Sequence[str] = (),
        reviewkd_weight: float = 1.0,
        reviewkd_levels: Sequence[int] = HCL_LEVELS,
        diffkd: nn.ModuleDict | None = None,
        diffkd_weights: Dict[str, float] | None = None,
        regkd_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.teacher = teacher
        self.kd_type = kd_type
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.kd_weight, self.warmup_iters = kd_weight, warmup_iters
        self.logit_stand, self.coupling = logit_stand, coupling
        self.topk_schedule = topk_schedule
        self.topk_rank = topk_rank  # DEEPKD.TOPK.RANK as resolved by core.settings.topk_rank
        self.max_iter = max(int(max_iter), 1)
        if kd_type != "NONE" and teacher is None:
            raise ValueError(f"KD.TYPE {kd_type!r} needs a teacher")
        if reviewkd_head is not None and teacher is None:
            raise ValueError("KD.REVIEWKD needs a teacher")
        self.reviewkd_head = reviewkd_head
        self.reviewkd_in_features = list(reviewkd_in_features)
        self.reviewkd_weight = float(reviewkd_weight)
        self.reviewkd_levels = tuple(reviewkd_levels)
        if diffkd is not None and teacher is None:
            raise ValueError("KD.DIFFKD needs a teacher")
        if diffkd is not None and len(diffkd) == 0:
            raise ValueError("KD.DIFFKD needs at least one feature name (KD.DIFFKD.IN_FEATURES)")
        # Attribute name = deepkd_det.core.diffkd.DIFFKD_PREFIX without the dot.
        self.diffkd = diffkd
        self.diffkd_weights = dict(diffkd_weights or {"diff": 1.0, "ae": 1.0, "kd": 1.0})
        self.regkd_weight = float(regkd_weight) if diffkd is not None else 0.0
        self._backbone_tap = _BackboneTap()
        if reviewkd_head is not None:
            if not self.reviewkd_in_features:
                raise ValueError("KD.REVIEWKD needs at least one feature name (KD.REVIEWKD.IN_FEATURES)")
        if reviewkd_head is not None or diffkd is not None:
            self.backbone.register_forward_hook(self._backbone_tap.hook)
        self._tap = _BoxHeadTap()
        if kd_type != "NONE" or self.regkd_weight > 0:
            for attr in ("box_pooler", "box_predictor"):
                if not hasattr(self.roi_heads, attr):
                    raise ValueError(
                        f"the student's ROI heads ({type(self.roi_heads).__name__}) have no {attr}"
                    )
            s_classes, t_classes = self.roi_heads.num_classes, teacher.num_classes
            if s_classes != t_classes:
                raise ValueError(f"teacher has {t_classes} classes, student {s_classes}: they must agree")
            self.roi_heads.box_pooler.register_forward_pre_hook(self._tap.pooler_pre_hook)
            self.roi_heads.box_predictor.register_forward_hook(self._tap.predictor_hook)
            self.roi_heads.register_forward_hook(self._tap.roi_heads_hook)

    @classmethod
    def from_config(cls, cfg):
        validate_deepkd_config(cfg)
        ret = super().from_config(cfg)
        kd = cfg.KD
        distill = kd.TYPE != "NONE"
        reviewkd = bool(kd.REVIEWKD.ENABLED)
        diffkd = bool(kd.DIFFKD.ENABLED)
        teacher = build_teacher(cfg) if distill or reviewkd or diffkd else None
        ret.update(
            teacher=teacher,
            kd_type=kd.TYPE,
            alpha=kd.ALPHA,
            beta=kd.BETA,
            temperature=kd.TEMPERATURE,
            kd_weight=kd.KD_WEIGHT,
            warmup_iters=kd.WARMUP_ITERS,
            logit_stand=kd.LOGIT_STAND,
            coupling=kd.COUPLING,
            topk_schedule=build_topk_schedule(cfg) if distill else None,
            topk_rank=topk_rank(cfg.DEEPKD),
            max_iter=cfg.SOLVER.MAX_ITER,
            reviewkd_head=build_reviewkd_head(cfg, ret["backbone"], teacher.backbone) if reviewkd else None,
            reviewkd_in_features=list(kd.REVIEWKD.IN_FEATURES),
            reviewkd_weight=kd.REVIEWKD.LOSS_WEIGHT,
            reviewkd_levels=[int(v) for v in kd.REVIEWKD.HCL_LEVELS],
            diffkd=build_diffkd_modules(cfg, ret["backbone"], teacher.backbone) if diffkd else None,
            diffkd_weights={"diff": kd.DIFFKD.DIFF_WEIGHT, "ae": kd.DIFFKD.AE_WEIGHT, "kd": kd.DIFFKD.LOSS_WEIGHT},
            regkd_weight=kd.DIFFKD.REG_WEIGHT,
        )
        return ret

    def train(self, mode: bool = True) -> DeepKDRCNN:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Teacher.train() is a no-op already; stated for clarity
        return self

    # ------------------------------------------------------------------ training

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training or self.teacher is None:
            return super().forward(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError("DeepKDRCNN training needs ground-truth 'instances' in the inputs")
        distill_logits = self.kd_type != "NONE"
        regkd = self.regkd_weight > 0
        box_tap = distill_logits or regkd
        reviewkd = self.reviewkd_head is not None
        diffkd = self.diffkd is not None
        features_tap = reviewkd or diffkd
        tap, btap = self._tap, self._backbone_tap
        if box_tap:
            tap.start()
        if features_tap:
            btap.start()
        try:
            losses = super().forward(batched_inputs)
        finally:
            tap.stop()
            btap.stop()
        if box_tap and (tap.calls != 1 or tap.boxes is None or tap.labels is None):
            raise RuntimeError(
                f"the student's box head ran {tap.calls} times in one forward; DeepKDRCNN needs a "
                "single-stage box head (StandardROIHeads)"
            )
        if features_tap and btap.calls != 1:
            raise RuntimeError(f"the student's backbone ran {btap.calls} times in one forward, expected once")
        # One teacher backbone pass per iteration serves the box-head logits, ReviewKD and DiffKD.
        # With a feature loss the teacher's batch is padded to the student's padded size, so that
        # the FPN maps of both have the same shapes level by level.
        images = [x["image"].to(self.device) for x in batched_inputs]
        teacher_features = self.teacher.features(images, self.input_format, btap.image_size if features_tap else None)
        teacher_logits = teacher_deltas = None
        if box_tap:
            teacher_logits, teacher_deltas = self.teacher.box_logits(
                None, self.input_format, tap.boxes, features=teacher_features, with_deltas=True
            )
        if distill_logits:
            losses.update(
                self._distill_losses(
                    batched_inputs, tap.boxes, tap.scores, tap.labels, teacher_features, teacher_logits
                )
            )
        if diffkd:
            # Like loss_reviewkd, every DiffKD loss is a task-side (TOG) term under DeepKD.
            losses.update(self._diffkd_losses(btap.features, teacher_features))
        if regkd:
            losses["loss_regkd"] = self.regkd_weight * box_regression_kd_loss(
                tap.deltas, teacher_deltas, tap.labels, self.roi_heads.num_classes
            )
        if reviewkd:
            # The engine puts every loss except loss_tckd / loss_nckd into TOG: under DeepKD the
            # feature loss rides with the task gradient (it is neither a target- nor a
            # non-target-class logit term), which is the intended placement.
            losses["loss_reviewkd"] = self._reviewkd_loss(btap.features, teacher_features)
        tap.boxes = tap.scores = tap.deltas = tap.labels = None  # drop the graph references
        btap.features = None
        return losses

    def _reviewkd_loss(
        self, student_features: Dict[str, torch.Tensor], teacher_features: Dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """LOSS_WEIGHT * HCL(review head(student FPN levels), teacher FPN levels), finest first."""
        names = self.reviewkd_in_features
        reviewed = self.reviewkd_head([student_features[n] for n in names])
        return self.reviewkd_weight * hcl_loss(reviewed, [teacher_features[n] for n in names], self.reviewkd_levels)

    def _diffkd_losses(
        self, student_features: Dict[str, torch.Tensor], teacher_features: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Weighted DiffKD losses, each summed over the levels: KD (LOSS_WEIGHT), diffusion
        (DIFF_WEIGHT) and, with an autoencoder, reconstruction (AE_WEIGHT)."""
        raw = diffkd_level_losses(self.diffkd, student_features, teacher_features)
        w = self.diffkd_weights
        out = {"loss_diffkd_kd": w["kd"] * raw["kd"], "loss_diffkd_diff": w["diff"] * raw["diff"]}
        if any(m.autoencoder is not None for m in self.diffkd.values()):
            out["loss_diffkd_ae"] = w["ae"] * raw["ae"]
        return out

    def _distill_losses(
        self, batched_inputs, boxes, student_logits, labels, teacher_features=None, teacher_logits=None
    ) -> Dict[str, torch.Tensor]:
        """Weighted TCKD / NCKD of the student's box logits against the teacher's on the same boxes.

        ``teacher_features``: the teacher's FPN maps of this batch when already computed;
        ``teacher_logits``: the teacher's box logits on ``boxes`` when already computed."""
        if labels.numel() != student_logits.shape[0]:
            raise RuntimeError(f"{labels.numel()} sampled labels for {student_logits.shape[0]} logits")
        if teacher_logits is None:
            images = None if teacher_features is not None else [x["image"].to(self.device) for x in batched_inputs]
            teacher_logits = self.teacher.box_logits(images, self.input_format, boxes, features=teacher_features)
        if teacher_logits.shape != student_logits.shape:
            raise RuntimeError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                f"{tuple(student_logits.shape)} differ; teacher and student must have the same classes"
            )
        storage = get_event_storage()
        progress = storage.iter / self.max_iter
        num_nontarget = student_logits.shape[1] - 1
        # No schedule (DeepKD off or DEEPKD.TOPK.MODE off): every non-target class is kept.
        k = self.topk_schedule(progress) if self.topk_schedule is not None else num_nontarget
        topk = None if k >= num_nontarget else k
        storage.put_scalar("kd/topk_k", float(k), smoothing_hint=False)
        warm = warmup_factor(storage.iter, self.warmup_iters)
        if student_logits.shape[0] == 0:
            zero = student_logits.sum() * 0.0
            return {"loss_tckd": zero, "loss_nckd": zero}
        if self.kd_type == "DKD":
            tckd, nckd = dkd_components(
                student_logits,
                teacher_logits,
                labels,
                alpha=self.alpha,
                beta=self.beta,
                temperature=self.temperature,
                warmup=warm,
                topk=topk,
                logit_stand=self.logit_stand,
                topk_rank=self.topk_rank,
            )
        else:
            tckd, nckd = kd_components(
                student_logits,
                teacher_logits,
                labels,
                temperature=self.temperature,
                weight=self.kd_weight * warm,
                topk=topk,
                logit_stand=self.logit_stand,
                coupling=self.coupling,
                topk_rank=self.topk_rank,
            )
        return {"loss_tckd": tckd, "loss_nckd": nckd}
