"""The distillation parts of the detector side (deepkd_det/det/distill/), each against a computation
written here from the teacher's and the student's own modules (tiny detectors, CPU).

Dense head (RetinaNet): the sigmoid logit part (KD.DENSE) and DiffKD on the head's outputs
(KD.DIFFKD.DENSE_OUTPUTS). Feature parts across families (levels paired by stride, channels
mapped), DiffKD's attention-weighted MSE, the refusals of logit parts whose heads cannot be paired,
the R-CNN parts with mask heads, one teacher pass per iteration, a part added from outside the
package, and the wrapper built without a config.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from detectron2.config import CfgNode as CN  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K  # noqa: E402
from detectron2.structures import Boxes, ImageList  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from torch import nn  # noqa: E402

import deepkd_det.det.modeling  # noqa: E402,F401  (registers the wrapper)
from deepkd_det.core.boxkd import box_regression_kd_loss  # noqa: E402
from deepkd_det.core.dense_kd import dense_kd_components  # noqa: E402
from deepkd_det.core.diffkd import attention_weighted_mse  # noqa: E402
from deepkd_det.core.losses import dkd_components, warmup_factor  # noqa: E402
from deepkd_det.det.config import student_only_cfg  # noqa: E402
from deepkd_det.det.distill import (  # noqa: E402
    DISTILL_PART_REGISTRY,
    DistillDetector,
    DistillPart,
    build_student,
    part_order,
)
from deepkd_det.det.distill.parts.base import training_only_modules  # noqa: E402
from deepkd_det.det.distill.parts.levels import pair_levels  # noqa: E402
from deepkd_det.det.engine.steps import split_components  # noqa: E402
from tests.det.tiny import get_tiny_cfg, get_tiny_mask_cfg, get_tiny_retinanet_cfg, make_batch  # noqa: E402

K = 3  # classes of the tiny detectors
LEVELS = ["p3", "p4", "p5", "p6"]


# ---------------------------------------------------------------- independent computations


def teacher_padded_input(teacher, batch, pad_to):
    """The teacher's input written from its definition: student BGR images in the teacher's
    normalisation, padded as detectron2 pads, then to the student's padded size."""
    assert teacher.input_format == "BGR"
    images = [(x["image"] - teacher.pixel_mean) / teacher.pixel_std for x in batch]
    x = ImageList.from_tensors(images, teacher.backbone.size_divisibility).tensor
    return F.pad(x, (0, pad_to[1] - x.shape[-1], 0, pad_to[0] - x.shape[-2]))


def flat(maps, channels):
    """Per-level N x (A*C) x H x W -> (anchors, C) with detectron2's own permute."""
    return torch.cat([permute_to_N_HWA_K(x, channels) for x in maps], dim=1).reshape(-1, channels)


class Rec:
    """Forward hooks on the student (and counters on the teacher) for one forward."""

    def __init__(self, model):
        self.r = {"teacher_backbone": 0, "teacher_head": 0}
        s, t = model.student, model.teacher
        self.h = [
            s.backbone.register_forward_pre_hook(lambda m, a: self.r.update(student_input=a[0].detach().clone())),
            s.backbone.register_forward_hook(lambda m, a, o: self.r.update(student_feats=o)),
            t.backbone.register_forward_hook(lambda m, a, o: self._count("teacher_backbone")),
        ]
        if hasattr(s, "head"):
            self.h += [
                s.head.register_forward_hook(lambda m, a, o: self.r.update(dense=o)),
                t.head.register_forward_hook(lambda m, a, o: self._count("teacher_head")),
            ]
        if hasattr(s, "roi_heads"):
            rh = s.roi_heads
            self.h += [
                rh.box_pooler.register_forward_pre_hook(lambda m, a: self.r.update(boxes=[b.clone() for b in a[1]])),
                rh.box_predictor.register_forward_hook(lambda m, a, o: self.r.update(logits=o[0], deltas=o[1])),
                rh.register_forward_hook(lambda m, a, o: self.r.update(labels=torch.cat([p.gt_classes for p in o[0]]))),
            ]
        dense = getattr(model, "diffkd_dense", None)
        if dense is not None:  # the RNG state right before the first dense DiffKD pass
            first = next(iter(dense.values()))
            self.h.append(first.register_forward_pre_hook(lambda m, a: self.r.update(rng=torch.get_rng_state())))

    def _count(self, key):
        self.r[key] += 1

    def remove(self):
        for h in self.h:
            h.remove()


def forward(model, batch, it):
    rec = Rec(model)
    try:
        with EventStorage(it) as storage:
            losses = model(batch)
            logged = {k: v[0] for k, v in storage.latest().items()}
    finally:
        rec.remove()
    return losses, rec.r, logged


# ---------------------------------------------------------------- dense head (RetinaNet)


def _retina_cfg():
    cfg = get_tiny_retinanet_cfg(num_classes=K, dense="DKD", deepkd=True, diffkd_outputs=("cls", "reg"))
    cfg.TEACHER.MODEL.RESNETS.NORM = "GN"  # a random teacher's maps at a trained one's scale
    d = cfg.KD.DENSE
    d.TEMPERATURE, d.ALPHA, d.BETA, d.LOSS_WEIGHT = 2.0, 0.7, 1.3, 0.5
    cfg.KD.WARMUP_ITERS = 10
    cfg.DEEPKD.TOPK.MODE, cfg.DEEPKD.TOPK.K_START = "constant", 2  # of K = 3 non-target classes
    cfg.KD.DIFFKD.DENSE_WEIGHT, cfg.KD.DIFFKD.DIFF_WEIGHT = 0.3, 0.6
    return cfg


@pytest.fixture(scope="module")
def retina():
    torch.manual_seed(0)
    model = build_model(_retina_cfg())
    model.train()
    return model


@pytest.fixture(scope="module")
def retina_step(retina):
    """One training forward of the RetinaNet student at iteration 4, recorded."""
    batch = make_batch(seed=1, h=70, w=90)
    losses, rec, logged = forward(retina, batch, it=4)
    t = retina.teacher
    with torch.no_grad():
        x = teacher_padded_input(t, batch, tuple(rec["student_input"].shape[-2:]))
        t_feats = t.model.backbone(x)
        t_cls, t_reg = t.model.head([t_feats[f] for f in t.model.head_in_features])
        s = retina.student
        anchors = s.anchor_generator([rec["student_feats"][f] for f in s.head_in_features])
        labels, _ = s.label_anchors(anchors, [b["instances"] for b in batch])
    return dict(batch=batch, losses=losses, rec=rec, logged=logged, t_cls=t_cls, t_reg=t_reg,
                labels=torch.stack(labels).reshape(-1))


def test_retinanet_student_returns_its_losses_and_the_parts(retina, retina_step):
    assert [p.name for p in retina.parts] == ["dense_logits", "diffkd", "dense_diffkd"]
    assert set(retina_step["losses"]) == {
        "loss_cls", "loss_box_reg", "loss_dense_tckd", "loss_dense_nckd",
        "loss_diffkd_kd", "loss_diffkd_diff", "loss_diffkd_dense_kd", "loss_diffkd_dense_diff"}
    assert retina.loss_components == {"loss_dense_tckd": "tcg", "loss_dense_nckd": "ncg"}
    assert set(retina.training_only_prefixes) == {"teacher.", "diffkd.", "diffkd_dense."}
    # One teacher backbone pass and one teacher head pass served the three parts.
    assert retina_step["rec"]["teacher_backbone"] == 1 and retina_step["rec"]["teacher_head"] == 1


def test_dense_logit_part_is_core_dense_kd_on_the_teachers_own_outputs(retina_step):
    st = retina_step
    labels = st["labels"]
    assert bool(((labels >= 0) & (labels < K)).any()) and bool((labels == K).any())  # positives and negatives
    s_cls = flat(st["rec"]["dense"][0], K).detach()
    t_cls = flat(st["t_cls"], K)
    warm = warmup_factor(4, 10)
    assert warm == pytest.approx(0.4)
    kw = dict(temperature=2.0, alpha=0.7, beta=1.3, negatives="nontarget", warmup=warm)
    tckd, nckd = dense_kd_components(s_cls, t_cls, labels, K, topk=2, **kw)
    losses = st["losses"]
    assert float(tckd) > 0 and float(nckd) > 0
    assert torch.allclose(losses["loss_dense_tckd"].detach(), 0.5 * tckd, rtol=1e-5)
    assert torch.allclose(losses["loss_dense_nckd"].detach(), 0.5 * nckd, rtol=1e-5)
    # DEEPKD.TOPK reached it: k = 2 was logged and used (all classes give another NCKD).
    assert st["logged"]["kd/topk_k"] == 2.0
    _, nckd_all = dense_kd_components(s_cls, t_cls, labels, K, topk=None, **kw)
    assert not torch.allclose(losses["loss_dense_nckd"].detach(), 0.5 * nckd_all, rtol=1e-3)


def test_dense_diffkd_part_replays_on_the_teachers_own_outputs(retina, retina_step):
    st = retina_step
    s_out = st["rec"]["dense"]
    torch.set_rng_state(st["rec"]["rng"])
    kd = diff = 0.0
    levels = list(retina.student.head_in_features)
    assert list(retina.diffkd_dense) == [f"{o}_{lv}" for o in ("cls", "reg") for lv in levels]
    with torch.no_grad():
        for name, module in retina.diffkd_dense.items():
            out, level = name.split("_", 1)
            i, j = {"cls": 0, "reg": 1}[out], levels.index(level)
            teacher = (st["t_cls"], st["t_reg"])[i][j]
            assert teacher.shape[1] == 3 * (K if out == "cls" else 4)  # A*K resp. A*4 channels
            res = module(s_out[i][j].detach(), teacher)
            kd, diff = kd + res.losses["kd"], diff + res.losses["diff"]
    losses = st["losses"]
    assert torch.allclose(losses["loss_diffkd_dense_kd"].detach(), 0.3 * kd, rtol=1e-5)
    assert torch.allclose(losses["loss_diffkd_dense_diff"].detach(), 0.6 * diff, rtol=1e-5)


def test_dense_losses_reach_the_students_head_never_the_teacher(retina, retina_step):
    losses = retina_step["losses"]
    retina.zero_grad(set_to_none=True)
    (losses["loss_dense_tckd"] + losses["loss_dense_nckd"]).backward(retain_graph=True)
    head = retina.student.head
    assert float(head.cls_score.weight.grad.abs().sum()) > 0
    assert head.bbox_pred.weight.grad is None  # the class logits only
    assert all(p.grad is None and not p.requires_grad for p in retina.teacher.parameters())
    retina.zero_grad(set_to_none=True)
    (losses["loss_diffkd_dense_kd"] + losses["loss_diffkd_dense_diff"]).backward()
    assert float(head.bbox_pred.weight.grad.abs().sum()) > 0  # "reg" distils the deltas
    assert all(p.grad is not None for p in retina.diffkd_dense["cls_p3"].denoiser.parameters())
    assert all(p.grad is None for p in retina.teacher.parameters())
    retina.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- levels and channels across families


def test_levels_pair_by_stride():
    spec = {f"p{i}": ShapeSpec(channels=64, stride=2**i) for i in range(2, 7)}  # R-CNN p2-p6
    retina = {f"p{i}": ShapeSpec(channels=128, stride=2**i) for i in range(3, 8)}  # RetinaNet p3-p7
    assert pair_levels("KEY", ["p3", "p4", "p5", "p6"], spec, retina) == {f"p{i}": f"p{i}" for i in range(3, 7)}
    with pytest.raises(ValueError, match=r"KEY: the student's 'p2' has stride 4, which no teacher output has"):
        pair_levels("KEY", ["p2", "p3"], spec, retina)
    with pytest.raises(ValueError, match=r"KEY \['p9'\]: \['p9'\] not among the student's backbone outputs"):
        pair_levels("KEY", ["p9"], spec, retina)
    # A name both have, at different strides: the stride decides, not the name.
    shifted = {f"p{i + 1}": ShapeSpec(channels=128, stride=2**i) for i in range(2, 7)}  # "p3" has stride 4
    assert pair_levels("KEY", ["p2", "p3", "p4"], spec, shifted) == {"p2": "p3", "p3": "p4", "p4": "p5"}


def _cross_family_cfg():
    """R-CNN student (FPN p2-p6, 64 channels), RetinaNet teacher (FPN on res3-res5 with p6/p7,
    128 channels); ReviewKD and DiffKD (attention-weighted MSE) on p3-p6."""
    cfg = get_tiny_cfg(num_classes=K, kd_type="NONE", deepkd=False)
    cfg.MODEL.META_ARCHITECTURE = "DistillDetector"
    t = cfg.TEACHER.MODEL
    t.META_ARCHITECTURE = "RetinaNet"
    t.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    t.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    t.RESNETS.NORM = "GN"
    t.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    t.FPN.OUT_CHANNELS = 128
    t.RETINANET.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    t.RETINANET.NUM_CLASSES = K
    t.RETINANET.NUM_CONVS = 1
    t.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.KD.REVIEWKD.ENABLED = True
    cfg.KD.REVIEWKD.IN_FEATURES = LEVELS
    cfg.KD.REVIEWKD.MID_CHANNELS = 32
    cfg.KD.DIFFKD.ENABLED = True
    cfg.KD.DIFFKD.IN_FEATURES = LEVELS
    cfg.KD.DIFFKD.INFERENCE_STEPS = 2
    cfg.KD.DIFFKD.ATTENTION = True
    cfg.KD.DIFFKD.LOSS_WEIGHT = 0.8
    cfg.KD.DIFFKD.REG_WEIGHT = 0.0  # box-regression KD needs an R-CNN teacher (refused otherwise)
    return cfg


def test_feature_parts_map_levels_and_channels_of_another_family_and_diffkd_uses_the_attention_mse():
    torch.manual_seed(0)
    model = build_model(_cross_family_cfg())
    model.train()
    assert type(model.teacher.model).__name__ == "RetinaNet" and type(model.student).__name__ == "GeneralizedRCNN"
    t_shapes = model.teacher.backbone.output_shape()
    assert sorted(t_shapes) == ["p3", "p4", "p5", "p6", "p7"] and t_shapes["p3"].channels == 128
    for name in ("reviewkd", "diffkd"):
        assert model.part(name).levels == {lv: lv for lv in LEVELS}
    # Channels: the student's 64 mapped to the teacher's 128 by each part's own projection.
    for lv in LEVELS:
        proj = model.diffkd[lv].student_proj
        convs = [m for m in proj.modules() if isinstance(m, nn.Conv2d)]
        assert convs[0].in_channels == 64 and convs[-1].out_channels == 128, lv
        assert model.diffkd[lv].kd_loss_kind == "attention_mse"
    outs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, lv=lv: outs.update({lv: o})) for lv, m in model.diffkd.items()]
    reviewed = {}
    hooks.append(model.reviewkd_head.register_forward_hook(lambda m, a, o: reviewed.update(out=o)))
    try:
        losses, rec, _ = forward(model, make_batch(seed=5), it=0)
    finally:
        for h in hooks:
            h.remove()
    assert rec["teacher_backbone"] == 1  # ReviewKD and DiffKD share one teacher pass
    assert [tuple(r.shape[1:2]) for r in reviewed["out"]] == [(128,)] * 4
    with torch.no_grad():  # the teacher maps the parts compared with are the same size as the student's
        for lv in LEVELS:
            assert outs[lv].target.shape[1] == 128
            assert outs[lv].target.shape[-2:] == rec["student_feats"][lv].shape[-2:]
        expected = sum(attention_weighted_mse(outs[lv].denoised, outs[lv].target) for lv in LEVELS)
        plain = sum(F.mse_loss(outs[lv].denoised, outs[lv].target) for lv in LEVELS)
    assert torch.allclose(losses["loss_diffkd_kd"].detach(), 0.8 * expected, rtol=1e-5)
    assert not torch.allclose(expected, plain, rtol=1e-2)
    assert torch.isfinite(losses["loss_reviewkd"]) and float(losses["loss_reviewkd"]) > 0


# ---------------------------------------------------------------- heads that cannot be paired


def _cascade_teacher():
    cfg = get_tiny_cfg(num_classes=K)
    cfg.TEACHER.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    cfg.TEACHER.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    return cfg, r"GeneralizedRCNN with StandardROIHeads.*GeneralizedRCNN with CascadeROIHeads.*cascade stage"


def _retinanet_teacher():
    cfg = get_tiny_cfg(num_classes=K)
    cfg.TEACHER.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.TEACHER.MODEL.RETINANET.NUM_CLASSES = K
    cfg.TEACHER.MODEL.RETINANET.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    return cfg, r"GeneralizedRCNN with StandardROIHeads.*RetinaNet with RetinaNetHead.*no R-CNN box head"


def _rcnn_student_dense_kd():
    cfg, _ = _retinanet_teacher()
    cfg.KD.TYPE, cfg.KD.DENSE.TYPE = "NONE", "DKD"  # sigmoid logit KD asked of an R-CNN student
    return cfg, r"GeneralizedRCNN with StandardROIHeads.*RetinaNet with RetinaNetHead.*student has no dense"


@pytest.mark.parametrize("make,key", [(_cascade_teacher, "KD.TYPE 'DKD'"), (_retinanet_teacher, "KD.TYPE 'DKD'"),
                                      (_rcnn_student_dense_kd, "KD.DENSE.TYPE 'DKD'")])
def test_a_logit_part_whose_heads_cannot_be_paired_is_refused_in_one_line(make, key):
    cfg, names = make()
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(key), message
    assert re.search(names, message), message


# ---------------------------------------------------------------- Mask R-CNN


@pytest.mark.parametrize("student_mask", [True, False], ids=["mask-student", "faster-student-of-mask-teacher"])
def test_rcnn_logit_and_regression_parts_are_unchanged_with_mask_heads(student_mask):
    torch.manual_seed(0)
    cfg = get_tiny_mask_cfg(num_classes=K, kd_type="DKD", deepkd=True, student_mask=student_mask, teacher_mask=True)
    cfg.KD.ALPHA, cfg.KD.BETA, cfg.KD.TEMPERATURE = 0.7, 0.3, 2.0
    cfg.KD.DIFFKD.ENABLED, cfg.KD.DIFFKD.IN_FEATURES, cfg.KD.DIFFKD.REG_WEIGHT = True, ["p5"], 1.3
    cfg.KD.DIFFKD.INFERENCE_STEPS = 2
    model = build_model(cfg)
    model.train()
    assert model.teacher.model.roi_heads.mask_on and model.student.roi_heads.mask_on == student_mask
    batch = make_batch(seed=3, masks=True)
    losses, rec, _ = forward(model, batch, it=0)
    assert ("loss_mask" in losses) == student_mask
    t = model.teacher
    with torch.no_grad():
        feats = t.model.backbone(teacher_padded_input(t, batch, tuple(rec["student_input"].shape[-2:])))
        rh = t.model.roi_heads
        pooled = rh.box_pooler([feats[f] for f in rh.box_in_features], [Boxes(b.tensor) for b in rec["boxes"]])
        t_logits, t_deltas = rh.box_predictor(rh.box_head(pooled))
    labels = rec["labels"]
    tckd, nckd = dkd_components(rec["logits"].detach(), t_logits, labels, alpha=0.7, beta=0.3, temperature=2.0,
                                warmup=1.0, topk=None)
    assert torch.allclose(losses["loss_tckd"].detach(), tckd, rtol=1e-4, atol=1e-7)
    assert torch.allclose(losses["loss_nckd"].detach(), nckd, rtol=1e-4, atol=1e-7)
    reg = box_regression_kd_loss(rec["deltas"].detach(), t_deltas, labels, K)
    assert float(reg) > 0 and torch.allclose(losses["loss_regkd"].detach(), 1.3 * reg, rtol=1e-4)
    assert rec["teacher_backbone"] == 1
    # The mask loss is a task loss: it feeds TOG, the logit terms TCG / NCG.
    parts = split_components(losses, model.loss_components)
    task = [k for k in losses if k not in ("loss_tckd", "loss_nckd")]
    assert torch.allclose(parts["tog"], sum(losses[k] for k in task))
    assert torch.equal(parts["tcg"], losses["loss_tckd"]) and torch.equal(parts["ncg"], losses["loss_nckd"])


# ---------------------------------------------------------------- a part added from outside


class ToyFeatureKD(DistillPart):
    """A new method written outside the package: 1x1 adapters and an MSE on paired levels."""

    order = 70
    name = "toy"
    what = "toy adapters"
    needs = frozenset({"features"})
    module_names = ("toy_adapter",)

    def __init__(self, adapters, levels, weight):
        self.adapters, self.levels, self.weight = adapters, levels, weight

    @classmethod
    def enabled(cls, cfg):
        return "TOY" in cfg.KD and cfg.KD.TOY.WEIGHT > 0

    @classmethod
    def disable(cls, cfg):
        if "TOY" in cfg.KD:
            cfg.KD.TOY.WEIGHT = 0.0

    @classmethod
    def from_config(cls, cfg, student, teacher):
        if not cls.enabled(cfg):
            return None
        s, t = student.backbone.output_shape(), teacher.backbone.output_shape()
        levels = pair_levels("KD.TOY.IN_FEATURES", list(cfg.KD.TOY.IN_FEATURES), s, t)
        adapters = nn.ModuleDict({n: nn.Conv2d(s[n].channels, t[levels[n]].channels, 1) for n in levels})
        return cls(adapters, levels, float(cfg.KD.TOY.WEIGHT))

    def modules(self):
        return {"toy_adapter": self.adapters}

    def components(self):
        return {"loss_toy": "ncg"}

    def losses(self, ctx):
        t = ctx.teacher_features()
        return {"loss_toy": self.weight * sum(
            F.mse_loss(self.adapters[n](ctx.student_features[n]), t[m]) for n, m in self.levels.items())}


@pytest.fixture
def toy_part():
    DISTILL_PART_REGISTRY.register(ToyFeatureKD)
    try:
        yield ToyFeatureKD
    finally:
        DISTILL_PART_REGISTRY._obj_map.pop(ToyFeatureKD.__name__)


def test_a_new_part_is_one_class_and_its_config_keys(toy_part):
    assert part_order()[-1] == "ToyFeatureKD" and training_only_modules()["toy_adapter"] == "toy adapters"
    torch.manual_seed(0)
    cfg = get_tiny_cfg(num_classes=K, kd_type="DKD", deepkd=True)
    cfg.TEACHER.MODEL.RESNETS.NORM = "GN"
    cfg.KD.TOY = CN({"WEIGHT": 0.5, "IN_FEATURES": ["p3", "p4"]})
    model = build_model(cfg)
    model.train()
    assert [p.name for p in model.parts] == ["logits", "toy"]
    assert isinstance(model.toy_adapter, nn.ModuleDict) and list(model.toy_adapter) == ["p3", "p4"]
    assert any(k.startswith("toy_adapter.") for k in model.state_dict())
    assert "toy_adapter." in model.training_only_prefixes
    assert model.loss_components == {"loss_tckd": "tcg", "loss_nckd": "ncg", "loss_toy": "ncg"}
    before = model.toy_adapter["p3"].weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    seen = []
    with EventStorage(0) as storage:
        for step in range(2):
            rec = Rec(model)
            try:
                losses = model(make_batch(seed=20 + step))
            finally:
                rec.remove()
            assert rec.r["teacher_backbone"] == 1  # the logit part and the new one share the teacher pass
            seen.append(float(losses["loss_toy"]))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            storage.step()
    assert all(v > 0 for v in seen)
    assert not torch.equal(before, model.toy_adapter["p3"].weight)  # it trains
    # The student alone for evaluation and export: no teacher, no toy adapter.
    plain = build_model(student_only_cfg(cfg))
    assert type(plain) is type(model.student)
    assert set(plain.state_dict()) == {k for k in model.state_dict() if not k.startswith(("toy_adapter.", "teacher."))}


# ---------------------------------------------------------------- built without a config


def test_the_wrapper_built_directly_needs_max_iter():
    cfg = get_tiny_cfg(num_classes=K, kd_type="NONE", deepkd=False)
    student = build_student(cfg)
    with pytest.raises(ValueError) as err:
        DistillDetector(student=student, teacher=None, parts=[], max_iter=None)
    assert "\n" not in str(err.value) and "max_iter" in str(err.value)
    with pytest.raises(TypeError, match="max_iter"):
        DistillDetector(student=student, teacher=None, parts=[])
    model = DistillDetector(student=student, teacher=None, parts=[], max_iter=5)
    assert model.max_iter == 5 and model.student is student
