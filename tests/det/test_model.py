"""DeepKDRCNN, the teacher, the MobileNetV2-FPN backbone and the config validation (tiny, CPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
import torchvision  # noqa: E402
from detectron2.layers import (
    FrozenBatchNorm2d,  # noqa: E402
    ShapeSpec,  # noqa: E402
)
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.structures import Boxes, ImageList  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import deepkd_det.det.modeling  # noqa: E402,F401  (registers DeepKDRCNN and the MV2 backbones)
from deepkd_det.core.losses import dkd_components, kd_components, warmup_factor  # noqa: E402
from deepkd_det.det.config import validate_deepkd_config  # noqa: E402
from tests.det.tiny import STUDENT_MEAN, STUDENT_STD, get_tiny_cfg, make_batch  # noqa: E402


@pytest.fixture(scope="module")
def kd_model():
    """DKD model: RGB student with its own normalisation, BGR teacher with trainable-style BN
    (so that a teacher wrongly in train mode would move its running statistics)."""
    torch.manual_seed(0)
    cfg = get_tiny_cfg(num_classes=3, kd_type="DKD", deepkd=True)
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = STUDENT_MEAN
    cfg.MODEL.PIXEL_STD = STUDENT_STD
    cfg.TEACHER.MODEL.RESNETS.NORM = "BN"
    cfg.KD.ALPHA, cfg.KD.BETA, cfg.KD.TEMPERATURE = 0.7, 0.3, 2.0
    cfg.KD.WARMUP_ITERS = 10
    cfg.DEEPKD.TOPK.MODE = "constant"
    cfg.DEEPKD.TOPK.K_START = 2  # of 3 non-target classes: one is masked
    model = build_model(cfg)
    model.train()
    return model


class Spy:
    """Forward hooks recording the student's sampled proposals and both box heads' in/outputs."""

    def __init__(self, model):
        self.handles = []
        self.rec = {}
        s, t = model.roi_heads, model.teacher.roi_heads
        self._out(
            s,
            "student_sampled",
            lambda o: [(p.proposal_boxes.tensor.clone(), p.gt_classes.clone()) for p in o[0]],
        )
        self._out(s.box_predictor, "student_logits", lambda o: o[0])
        self._out(t.box_predictor, "teacher_logits", lambda o: o[0].clone())
        self.handles.append(
            t.box_pooler.register_forward_pre_hook(
                lambda m, a: self.rec.__setitem__("teacher_boxes", [b.tensor.clone() for b in a[1]])
            )
        )
        self.handles.append(
            model.teacher.backbone.register_forward_pre_hook(
                lambda m, a: self.rec.__setitem__("teacher_input", a[0].clone())
            )
        )

    def _out(self, module, name, fn):
        self.handles.append(module.register_forward_hook(lambda m, a, o: self.rec.__setitem__(name, fn(o))))

    def remove(self):
        for h in self.handles:
            h.remove()


def _forward_with_spy(model, batch, it):
    spy = Spy(model)
    try:
        with EventStorage(it) as storage:
            losses = model(batch)
            k_logged = storage.latest()["kd/topk_k"][0]
    finally:
        spy.remove()
    return losses, spy.rec, k_logged


def test_teacher_classifies_the_student_sampled_proposals(kd_model):
    batch = make_batch(seed=1)
    # The wiring is checked to 1e-5 against the teacher's own modules, so the teacher runs them
    # here; the folded forward (the default) has its own parity test in tests/det/test_speed.py.
    kd_model.teacher.fold_norm = False
    try:
        losses, rec, _ = _forward_with_spy(kd_model, batch, it=4)
    finally:
        kd_model.teacher.fold_norm = True
    sampled = rec["student_sampled"]
    assert len(rec["teacher_boxes"]) == len(sampled) == 2
    for tb, (sb, _) in zip(rec["teacher_boxes"], sampled):
        assert torch.equal(tb, sb)  # the very boxes the student sampled, in the same order
    n = sum(sb.shape[0] for sb, _ in sampled)
    assert rec["teacher_logits"].shape == rec["student_logits"].shape == (n, 4)

    # The teacher saw the images in its own channel order (BGR) and normalisation.
    t = kd_model.teacher
    expected = ImageList.from_tensors(
        [(x["image"].flip(0) - t.pixel_mean) / t.pixel_std for x in batch], t.backbone.size_divisibility
    ).tensor
    assert torch.allclose(rec["teacher_input"], expected)

    # And its logits are its box head on those boxes (recomputed independently).
    with torch.no_grad():
        feats = t.backbone(expected)
        rh = t.roi_heads
        pooled = rh.box_pooler([feats[f] for f in rh.box_in_features], [Boxes(sb) for sb, _ in sampled])
        ref = rh.box_predictor(rh.box_head(pooled))[0]
    assert torch.allclose(rec["teacher_logits"], ref, atol=1e-5)
    assert set(losses) == {
        "loss_cls",
        "loss_box_reg",
        "loss_rpn_cls",
        "loss_rpn_loc",
        "loss_tckd",
        "loss_nckd",
    }


@pytest.mark.parametrize("kd_type", ["DKD", "KD"])
def test_distillation_losses_equal_core_losses(kd_model, kd_type):
    part = kd_model.part("logits")
    part.kd_type = kd_type
    part.coupling, part.kd_weight = "batch", 0.5
    try:
        losses, rec, k_logged = _forward_with_spy(kd_model, make_batch(seed=2), it=4)
    finally:
        part.kd_type = "DKD"
    labels = torch.cat([c for _, c in rec["student_sampled"]])
    assert int(labels.max()) == 3 and int(labels.min()) >= 0  # background (= NUM_CLASSES) included
    zs, zt = rec["student_logits"].detach(), rec["teacher_logits"]
    warm = warmup_factor(4, 10)
    assert warm == pytest.approx(0.4)
    if kd_type == "DKD":
        tckd, nckd = dkd_components(zs, zt, labels, alpha=0.7, beta=0.3, temperature=2.0, warmup=warm, topk=2)
    else:
        tckd, nckd = kd_components(
            zs, zt, labels, temperature=2.0, weight=0.5 * warm, topk=2, coupling="batch"
        )
    assert k_logged == 2.0
    assert torch.allclose(losses["loss_tckd"].detach(), tckd, rtol=1e-5, atol=1e-7)
    assert torch.allclose(losses["loss_nckd"].detach(), nckd, rtol=1e-5, atol=1e-7)
    assert float(nckd) > 0 and float(tckd) > 0
    # The distillation terms reach the student's box head, not the teacher.
    losses["loss_tckd"].backward(retain_graph=True)
    grad = kd_model.roi_heads.box_predictor.cls_score.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert all(p.grad is None for p in kd_model.teacher.parameters())
    kd_model.zero_grad(set_to_none=True)


def test_teacher_stays_frozen_through_training_steps(kd_model):
    kd_model.train()
    assert not kd_model.teacher.training
    assert not any(m.training for m in kd_model.teacher.modules())
    kd_model.teacher.train()
    assert not kd_model.teacher.training
    assert all(not p.requires_grad for p in kd_model.teacher.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in kd_model.teacher.modules())

    teacher_before = {k: v.clone() for k, v in kd_model.teacher.state_dict().items()}
    student_before = kd_model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    params = [p for p in kd_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    with EventStorage(0) as storage:
        for step in range(2):
            losses = kd_model(make_batch(seed=10 + step))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            storage.step()
    after = kd_model.teacher.state_dict()
    for k, v in teacher_before.items():
        assert torch.equal(v, after[k]), k
    assert not torch.equal(student_before, kd_model.roi_heads.box_predictor.cls_score.weight)


def test_kd_type_none_builds_no_teacher():
    cfg = get_tiny_cfg(kd_type="NONE", deepkd=False)
    cfg.MODEL.META_ARCHITECTURE = "DeepKDRCNN"
    model = build_model(cfg)
    assert model.teacher is None and model.topk_schedule is None
    assert not any(k.startswith("teacher.") for k in model.state_dict())
    model.train()
    with EventStorage(0):
        losses = model(make_batch(n=1))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}


def test_inference_uses_the_student_only(kd_model):
    kd_model.eval()
    calls = []
    h = kd_model.teacher.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            out = kd_model(make_batch(n=1))
    finally:
        h.remove()
        kd_model.train()
    assert "instances" in out[0] and not calls


# ---------------------------------------------------------------- MobileNetV2-FPN


def _mv2_cfg(norm="BN", freeze_at=0):
    cfg = get_tiny_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_mobilenetv2_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.MOBILENETV2.NORM = norm
    cfg.MODEL.FPN.IN_FEATURES = ["m2", "m3", "m4", "m5"]
    return cfg


def test_mobilenetv2_fpn_features_match_torchvision():
    torch.manual_seed(0)
    backbone = build_backbone(_mv2_cfg(norm="BN"), ShapeSpec(channels=3)).eval()
    bottom_up = backbone.bottom_up
    shapes = bottom_up.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "m2": (24, 4),
        "m3": (32, 8),
        "m4": (96, 16),
        "m5": (320, 32),
    }
    tv = torchvision.models.mobilenet_v2(weights=None).eval()
    with torch.no_grad():  # random running statistics, so BN in eval mode matters
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    tv_state = {k: v for k, v in tv.state_dict().items() if not k.startswith(("features.18", "classifier"))}
    bottom_up.load_state_dict(tv_state, strict=True)  # torchvision's own key names

    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        ours = bottom_up(x)
        for name, end in {"m2": 3, "m3": 6, "m4": 13, "m5": 17}.items():
            assert torch.allclose(ours[name], tv.features[: end + 1](x), atol=1e-5), name
        out = backbone(x)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for name, stride in zip(out, (4, 8, 16, 32, 64)):
        assert out[name].shape == (1, 64, 64 // stride, 128 // stride), name
    assert {k: s.stride for k, s in backbone.output_shape().items()} == {
        "p2": 4,
        "p3": 8,
        "p4": 16,
        "p5": 32,
        "p6": 64,
    }


def test_mobilenetv2_freeze_at():
    bottom_up = build_backbone(_mv2_cfg(norm="BN", freeze_at=2), ShapeSpec(channels=3)).bottom_up
    for i, block in enumerate(bottom_up.features):
        frozen = i <= 3  # stem (features.0) and the m2 stage (features.1-3)
        assert all(p.requires_grad != frozen for p in block.parameters()), i
        has_frozen_bn = any(isinstance(m, FrozenBatchNorm2d) for m in block.modules())
        assert has_frozen_bn == frozen, i


def test_student_and_teacher_can_be_mobilenetv2_and_resnet():
    cfg = _mv2_cfg(norm="FrozenBN")
    cfg.MODEL.META_ARCHITECTURE = "DeepKDRCNN"
    model = build_model(cfg)
    assert type(model.backbone.bottom_up).__name__ == "MobileNetV2Backbone"
    assert type(model.teacher.backbone.bottom_up).__name__ == "ResNet"
    with EventStorage(0):
        losses = model(make_batch(n=1))
    assert torch.isfinite(losses["loss_tckd"]) and torch.isfinite(losses["loss_nckd"])


# ---------------------------------------------------------------- config validation


def _set(cfg, dotted, value):
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


BAD_SETTINGS = [
    ({"KD.TYPE": "FOO"}, "KD.TYPE must be one of"),
    ({"KD.TYPE": "NONE", "DEEPKD.ENABLED": True}, "DEEPKD.ENABLED needs a distillation loss"),
    ({"MODEL.META_ARCHITECTURE": "GeneralizedRCNN"}, "needs MODEL.META_ARCHITECTURE 'DistillDetector'"),
    ({"KD.TEMPERATURE": 0.0}, "KD.TEMPERATURE must be > 0"),
    ({"KD.BETA": -1.0}, "KD.BETA must be >= 0"),
    ({"KD.WARMUP_ITERS": -1}, "KD.WARMUP_ITERS must be >= 0"),
    ({"KD.COUPLING": "rows"}, "KD.COUPLING must be one of"),
    ({"DEEPKD.TOPK.MODE": "cosine"}, "DEEPKD.TOPK.MODE must be one of"),
    (
        {"DEEPKD.TOPK.MODE": "constant", "DEEPKD.TOPK.K_START": 4},
        r"DEEPKD.TOPK.K_START=4 is out of range: K must lie in \[1, C-1\] = \[1, 3\]",
    ),
    ({"DEEPKD.TOPK.K_END": -2}, "DEEPKD.TOPK.K_START and K_END must be >= 1"),
    ({"DEEPKD.TOPK.MODE": "linear", "DEEPKD.TOPK.K_START": 3, "DEEPKD.TOPK.K_END": 2}, "k_start=3 > k_end=2"),
    ({"DEEPKD.TOPK.MODE": "linear", "DEEPKD.TOPK.START": 0.8, "DEEPKD.TOPK.END": 0.5}, "need 0 <= start <= end <= 1"),
    ({"DEEPKD.TOPK.MODE": "step", "DEEPKD.TOPK.PHASES": []}, "mode 'step' needs at least one phase"),
    ({"DEEPKD.TOPK.MODE": "step", "DEEPKD.TOPK.PHASES": [[0.5, 2], [0.3, 3]]}, "strictly increasing"),
    ({"DEEPKD.TOPK.PHASES": [[0.5]]}, r"\[progress, K\] pairs"),
    ({"DEEPKD.OPTIMIZER": "adam"}, "DEEPKD.OPTIMIZER must be one of"),
    ({"DEEPKD.COMPAT": "reference"}, "DEEPKD.COMPAT must be one of"),
    ({"DEEPKD.GRAD_STRATEGY": "magic"}, "DEEPKD.GRAD_STRATEGY must be one of"),
    ({"DEEPKD.DELTA_TOG": 0.1}, r"TOG momentum SOLVER.MOMENTUM \+ DEEPKD.DELTA_TOG = .* is outside \[0, 1\)"),
    ({"DEEPKD.DELTA_TCG": -0.95}, r"TCG momentum SOLVER.MOMENTUM \+ DEEPKD.DELTA_TCG = .* is outside \[0, 1\)"),
    ({"DEEPKD.OPTIMIZER": "dot", "DEEPKD.DOT_DELTA": 0.2}, r"DOT distillation momentum SOLVER.MOMENTUM -/\+ DEEPKD.DOT_DELTA"),
    ({"DEEPKD.GSNR.PERIOD": -1}, "DEEPKD.GSNR.PERIOD must be >= 0"),
    ({"DEEPKD.GSNR.WINDOW": 1}, "DEEPKD.GSNR.WINDOW must be >= 2"),
    ({"TEACHER.INPUT_FORMAT": "YUV"}, "TEACHER.INPUT_FORMAT must be one of"),
    ({"TEACHER.CONFIG_FILE": "/nonexistent/teacher.yaml"}, "TEACHER.CONFIG_FILE .* does not exist"),

]


def test_a_teacher_of_other_classes_is_refused_at_build():
    cfg = get_tiny_cfg()
    cfg.TEACHER.MODEL.ROI_HEADS.NUM_CLASSES = 5
    with pytest.raises(ValueError, match="KD.TYPE 'DKD' .*teacher has 5 classes, student 3: they must agree"):
        build_model(cfg)


def test_a_logit_part_with_heads_that_cannot_be_paired_is_refused_at_build():
    cfg = get_tiny_cfg()
    cfg.TEACHER.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.TEACHER.MODEL.RETINANET.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    cfg.TEACHER.MODEL.RETINANET.IN_FEATURES = list(cfg.MODEL.RPN.IN_FEATURES)  # the tiny FPN's levels
    validate_deepkd_config(cfg)  # a RetinaNet teacher is fine for the feature parts ...
    with pytest.raises(ValueError, match=r"KD.TYPE 'DKD' .*GeneralizedRCNN with StandardROIHeads.*RetinaNet with "
                                         r"RetinaNetHead.*teacher RetinaNet has no R-CNN box head"):
        build_model(cfg)  # ... not for logits of an R-CNN box head


@pytest.mark.parametrize(
    "changes,message",
    BAD_SETTINGS,
    ids=[next(iter(c)) + "-" + str(i) for i, (c, _) in enumerate(BAD_SETTINGS)],
)
def test_validate_rejects_bad_settings(changes, message):
    cfg = get_tiny_cfg()
    validate_deepkd_config(cfg)  # the tiny config itself is valid
    for k, v in changes.items():
        _set(cfg, k, v)
    with pytest.raises(ValueError, match=message):
        validate_deepkd_config(cfg)


def test_validate_accepts_edges_and_the_model_refuses_bad_config():
    cfg = get_tiny_cfg()
    cfg.DEEPKD.TOPK.MODE, cfg.DEEPKD.TOPK.K_START = "constant", 3  # K = C - 1: all non-target classes
    cfg.DEEPKD.OPTIMIZER, cfg.DEEPKD.DOT_DELTA = "dot", 0.09  # 0.99 < 1
    validate_deepkd_config(cfg)
    cfg.TEACHER.MODEL.ROI_HEADS.NUM_CLASSES = 4
    with pytest.raises(ValueError, match="teacher has 4 classes, student 3"):
        build_model(cfg)


def test_config_round_trips_through_yaml(tmp_path):
    import yaml

    from deepkd_det.det.config import get_deepkd_cfg

    cfg = get_tiny_cfg()
    cfg.DEEPKD.TOPK.MODE, cfg.DEEPKD.TOPK.PHASES = "step", [[0.2, 2], [0.5, 3]]
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    again = get_deepkd_cfg()
    again.merge_from_file(str(path))
    assert yaml.safe_load(again.dump()) == yaml.safe_load(cfg.dump())
    validate_deepkd_config(again)
    with pytest.raises((KeyError, AssertionError), match="KD.NO_SUCH_KEY"):  # yacs: unknown keys fail
        again.merge_from_list(["KD.NO_SUCH_KEY", 1])


def test_teacher_config_file_is_the_base_and_explicit_keys_win():
    from deepkd_det.det.config import get_deepkd_cfg, resolve_teacher_cfg

    cfg = get_deepkd_cfg()
    cfg.TEACHER.CONFIG_FILE = "model_zoo:COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
    cfg.TEACHER.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.DEVICE = "cpu"
    t = resolve_teacher_cfg(cfg).MODEL
    assert t.RESNETS.DEPTH == 101 and t.BACKBONE.NAME == "build_resnet_fpn_backbone"  # from the yaml
    assert list(t.RPN.IN_FEATURES) == ["p2", "p3", "p4", "p5", "p6"]  # from its _BASE_
    assert t.ROI_HEADS.NUM_CLASSES == 3  # explicit TEACHER.MODEL setting
    assert t.WEIGHTS == ""  # the yaml's ImageNet init is not a teacher checkpoint
    assert t.DEVICE == "cpu"


def test_model_zoo_names_resolve_without_importing_detectron2_model_zoo(monkeypatch):
    """detectron2 after v0.6 imports pkg_resources in detectron2.model_zoo: our lookup must not need it."""
    import os
    import sys

    import detectron2

    from deepkd_det.det.config import get_deepkd_cfg, model_zoo_config_file, resolve_teacher_cfg

    monkeypatch.setitem(sys.modules, "detectron2.model_zoo", None)  # any import of it now fails
    name = "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
    path = model_zoo_config_file(name)
    expected = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs", name)
    assert os.path.samefile(path, expected)
    cfg = get_deepkd_cfg()
    cfg.TEACHER.CONFIG_FILE = "model_zoo:" + name
    assert resolve_teacher_cfg(cfg).MODEL.RESNETS.DEPTH == 101
    cfg.TEACHER.CONFIG_FILE = "model_zoo:COCO-Detection/no_such.yaml"
    with pytest.raises(ValueError, match=r"TEACHER.CONFIG_FILE: 'COCO-Detection/no_such.yaml' is not a detectron2"):
        resolve_teacher_cfg(cfg)
