"""ReviewKD feature distillation inside DeepKDRCNN (tiny, CPU): alone and with DKD on the logits."""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.solver.build import get_default_optimizer_params  # noqa: E402
from detectron2.structures import Boxes, ImageList  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import deepkd_det.det.modeling  # noqa: E402,F401  (registers DeepKDRCNN)
from deepkd_det.core.losses import dkd_components  # noqa: E402
from deepkd_det.core.reviewkd import REVIEWKD_DET_LOSS_WEIGHTS, hcl_loss  # noqa: E402
from deepkd_det.det.checkpoint import DeepKDCheckpointer  # noqa: E402
from deepkd_det.det.config import (  # noqa: E402
    add_deepkd_config,
    resolve_teacher_cfg,
    validate_deepkd_config,
)
from deepkd_det.det.distill.parts.reviewkd import ReviewKD  # noqa: E402
from tests.det.tiny import STUDENT_MEAN, STUDENT_STD, get_tiny_cfg, make_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FEATURES = ["p2", "p3", "p4", "p5", "p6"]
WEIGHT = 0.37


def _build_head(cfg, student_backbone, teacher_backbone):
    """The ReviewKD part's head for cfg, built from the two backbones alone."""
    part = ReviewKD.from_config(cfg, SimpleNamespace(backbone=student_backbone), SimpleNamespace(backbone=teacher_backbone))
    return part.head


def _rkd_cfg(kd_type="DKD", weight=WEIGHT):
    cfg = get_tiny_cfg(num_classes=3, kd_type=kd_type, deepkd=kd_type != "NONE")
    cfg.MODEL.META_ARCHITECTURE = "DeepKDRCNN"
    cfg.INPUT.FORMAT = "RGB"  # student RGB with its own normalisation, teacher BGR
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = STUDENT_MEAN, STUDENT_STD
    cfg.TEACHER.MODEL.RESNETS.NORM = "BN"  # would move its statistics if it ran in train mode
    cfg.KD.REVIEWKD.ENABLED = True
    cfg.KD.REVIEWKD.LOSS_WEIGHT = weight
    cfg.KD.REVIEWKD.MID_CHANNELS = 32
    return cfg


@pytest.fixture(scope="module")
def rkd_model():
    torch.manual_seed(0)
    model = build_model(_rkd_cfg())
    model.train()
    return model


class Spy:
    """Hooks: the student's FPN outputs, every teacher backbone call, both box predictors."""

    def __init__(self, model, logits=True):
        self.rec = {"teacher_backbone_calls": 0, "teacher_predictor_calls": 0, "head_calls": 0}
        t = model.teacher
        self.handles = [
            model.backbone.register_forward_hook(lambda m, a, o: self.rec.update(student_feats=o)),
            t.backbone.register_forward_hook(self._teacher_backbone),
            t.roi_heads.box_predictor.register_forward_hook(self._teacher_predictor),
            model.reviewkd_head.register_forward_hook(lambda m, a, o: self._count("head_calls")),
        ]
        if logits and model.part("logits") is not None:
            self.handles += [
                model.roi_heads.box_predictor.register_forward_hook(
                    lambda m, a, o: self.rec.update(student_logits=o[0])
                ),
                model.roi_heads.box_pooler.register_forward_pre_hook(
                    lambda m, a: self.rec.update(boxes=[Boxes(b.tensor.clone()) for b in a[1]])
                ),
                model.roi_heads.register_forward_hook(
                    lambda m, a, o: self.rec.update(labels=torch.cat([p.gt_classes for p in o[0]]))
                ),
            ]

    def _count(self, key):
        self.rec[key] += 1

    def _teacher_backbone(self, m, args, out):
        self._count("teacher_backbone_calls")
        self.rec["teacher_input"] = args[0].clone()
        self.rec["teacher_feats"] = {k: v.clone() for k, v in out.items()}

    def _teacher_predictor(self, m, args, out):
        self._count("teacher_predictor_calls")
        self.rec["teacher_logits"] = out[0].clone()

    def remove(self):
        for h in self.handles:
            h.remove()


def _forward(model, batch, it=3):
    spy = Spy(model)
    try:
        with EventStorage(it):
            losses = model(batch)
    finally:
        spy.remove()
    return losses, spy.rec


def test_reviewkd_loss_is_hcl_of_the_head_on_the_captured_features(rkd_model):
    batch = make_batch(seed=1, h=70, w=90)  # 70 x 90 -> padded to 96 x 96
    # Checked to 1e-5 against the teacher's own modules, so the teacher runs them here; the
    # folded forward (the default) has its own parity test in tests/det/test_speed.py.
    rkd_model.teacher.fold_norm = False
    try:
        losses, rec = _forward(rkd_model, batch)
    finally:
        rkd_model.teacher.fold_norm = True
    assert set(losses) == {
        "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_tckd", "loss_nckd", "loss_reviewkd"
    }
    # One teacher backbone pass per iteration serves the logits and the features.
    assert rec["teacher_backbone_calls"] == 1 and rec["teacher_predictor_calls"] == 1
    assert rec["head_calls"] == 1

    # The teacher saw the student's padded batch size, in its own channel order and normalisation.
    t = rkd_model.teacher
    expected = ImageList.from_tensors(
        [(x["image"].flip(0) - t.pixel_mean) / t.pixel_std for x in batch], t.backbone.size_divisibility
    ).tensor
    assert expected.shape[-2:] == (96, 96)
    assert torch.allclose(rec["teacher_input"], expected)
    with torch.no_grad():
        teacher_feats = t.backbone(expected)
    s_feats, t_feats = rec["student_feats"], rec["teacher_feats"]
    for name in FEATURES:
        assert s_feats[name].shape[-2:] == t_feats[name].shape[-2:]
        assert torch.allclose(t_feats[name], teacher_feats[name], atol=1e-5)

    # Independent recomputation: weight * HCL(head(student levels), teacher levels).
    with torch.no_grad():
        reviewed = rkd_model.reviewkd_head([s_feats[n].detach() for n in FEATURES])
        ref = WEIGHT * hcl_loss(reviewed, [teacher_feats[n] for n in FEATURES], levels=(4, 2, 1))
    assert float(ref) > 0
    assert torch.allclose(losses["loss_reviewkd"].detach(), ref, rtol=1e-5)

    # The shared features also gave the logits: the teacher's box head on the student's boxes.
    with torch.no_grad():
        rh = t.roi_heads
        pooled = rh.box_pooler([teacher_feats[f] for f in rh.box_in_features], rec["boxes"])
        zt = rh.box_predictor(rh.box_head(pooled))[0]
    assert torch.allclose(rec["teacher_logits"], zt, atol=1e-5)
    tckd, nckd = dkd_components(rec["student_logits"].detach(), zt, rec["labels"], alpha=1.0, beta=0.25)
    assert torch.allclose(losses["loss_tckd"].detach(), tckd, rtol=1e-5, atol=1e-7)
    assert torch.allclose(losses["loss_nckd"].detach(), nckd, rtol=1e-5, atol=1e-7)


def test_teacher_padding_must_fit(rkd_model):
    images = [x["image"] for x in make_batch(h=64, w=80)]
    with pytest.raises(ValueError, match="cannot pad"):
        rkd_model.teacher.preprocess(images, "RGB", pad_to=(64, 64))  # smaller than its own 64 x 96
    with pytest.raises(ValueError, match="multiple"):
        rkd_model.teacher.preprocess(images, "RGB", pad_to=(64, 100))


def test_head_and_student_get_gradients_teacher_none(rkd_model):
    rkd_model.zero_grad(set_to_none=True)
    losses, _ = _forward(rkd_model, make_batch(seed=2))
    losses["loss_reviewkd"].backward()
    head_params = list(rkd_model.reviewkd_head.parameters())
    assert head_params and all(p.grad is not None for p in head_params)
    assert float(sum(p.grad.abs().sum() for p in head_params)) > 0
    # The feature loss reaches the student's FPN, not its box head, and never the teacher.
    assert float(rkd_model.backbone.fpn_output2.weight.grad.abs().sum()) > 0
    assert rkd_model.roi_heads.box_predictor.cls_score.weight.grad is None
    assert all(p.grad is None and not p.requires_grad for p in rkd_model.teacher.parameters())
    rkd_model.zero_grad(set_to_none=True)


def test_head_is_a_trained_student_part(rkd_model):
    keys = list(rkd_model.state_dict())
    head_keys = [k for k in keys if k.startswith("reviewkd_head.")]
    assert len(head_keys) == len(rkd_model.reviewkd_head.state_dict()) > 0
    assert not any(k.startswith("teacher.") and "reviewkd" in k for k in keys)
    teacher_ids = {id(p) for p in rkd_model.teacher.parameters()}
    head_ids = {id(p) for p in rkd_model.reviewkd_head.parameters()}
    assert not teacher_ids & head_ids
    assert all(p.requires_grad for p in rkd_model.reviewkd_head.parameters())
    # detectron2's optimizer parameter groups (what the trainer optimises) include the head.
    grouped = {id(p) for g in get_default_optimizer_params(rkd_model) for p in g["params"]}
    assert head_ids <= grouped and not teacher_ids & grouped


def test_sgd_steps_train_the_head_and_leave_the_teacher(rkd_model):
    rkd_model.train()
    teacher_before = {k: v.clone() for k, v in rkd_model.teacher.state_dict().items()}
    head_before = {k: v.clone() for k, v in rkd_model.reviewkd_head.state_dict().items()}
    opt = torch.optim.SGD([p for p in rkd_model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    with EventStorage(0) as storage:
        for step in range(3):
            losses = rkd_model(make_batch(seed=20 + step))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            storage.step()
    for k, v in rkd_model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    head_after = rkd_model.reviewkd_head.state_dict()
    moved = [k for k, v in head_before.items() if k.endswith("weight") and not torch.equal(v, head_after[k])]
    assert moved and all(torch.isfinite(v).all() for v in head_after.values() if v.is_floating_point())


def test_training_the_head_lowers_the_feature_loss():
    """On fixed student/teacher features, a few optimiser steps on the head lower loss_reviewkd."""
    torch.manual_seed(1)
    model = build_model(_rkd_cfg(kd_type="NONE", weight=1.0))
    model.train()
    _, rec = _forward(model, make_batch(seed=3))
    s_feats = {k: v.detach() for k, v in rec["student_feats"].items()}
    # A random teacher's FPN maps are in the hundreds; scaled to unit std the target is one an
    # (unit-scale, BN-ended) head can approach in a few steps.
    t_feats = {k: v / v.std() for k, v in rec["teacher_feats"].items()}
    opt = torch.optim.Adam(model.reviewkd_head.parameters(), lr=1e-2)
    values = []
    for _ in range(8):
        loss = model.part("reviewkd").feature_loss(s_feats, t_feats)
        values.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert values[-1] < 0.9 * values[0], values


def test_reviewkd_alone_needs_no_logit_loss():
    torch.manual_seed(0)
    cfg = _rkd_cfg(kd_type="NONE")
    assert not cfg.DEEPKD.ENABLED
    validate_deepkd_config(cfg)
    model = build_model(cfg)
    model.train()
    assert model.teacher is not None and model.topk_schedule is None
    losses, rec = _forward(model, make_batch(seed=4))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_reviewkd"}
    assert rec["teacher_backbone_calls"] == 1 and rec["teacher_predictor_calls"] == 0
    ref = WEIGHT * hcl_loss(
        model.reviewkd_head([rec["student_feats"][n] for n in FEATURES]),
        [rec["teacher_feats"][n] for n in FEATURES],
    )
    assert torch.allclose(losses["loss_reviewkd"], ref, rtol=1e-5)


def test_inference_is_the_student_alone(rkd_model):
    rkd_model.eval()
    try:
        spy = Spy(rkd_model, logits=False)
        with torch.no_grad():
            out = rkd_model([{"image": x["image"], "height": 64, "width": 80} for x in make_batch()])
    finally:
        spy.remove()
        rkd_model.train()
    assert len(out) == 2 and all("instances" in o for o in out)
    assert spy.rec["teacher_backbone_calls"] == 0 and spy.rec["head_calls"] == 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"DEEPKD.ENABLED": True}, "DEEPKD.ENABLED needs a distillation loss"),
        ({"MODEL.META_ARCHITECTURE": "GeneralizedRCNN"}, "KD.REVIEWKD.ENABLED needs MODEL.META_ARCHITECTURE"),
        ({"KD.REVIEWKD.LOSS_WEIGHT": -1.0}, "LOSS_WEIGHT"),
        ({"KD.REVIEWKD.MID_CHANNELS": 0}, "MID_CHANNELS"),
        ({"KD.REVIEWKD.IN_FEATURES": ["p2", "p2"]}, "IN_FEATURES"),
        ({"KD.REVIEWKD.HCL_LEVELS": [4, 0]}, "HCL_LEVELS"),
    ],
)
def test_validate_rejects_bad_reviewkd_settings(changes, message):
    cfg = _rkd_cfg(kd_type="NONE")
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(ValueError, match=message):
        validate_deepkd_config(cfg)


def test_feature_names_and_order_are_checked_at_build():
    cfg = _rkd_cfg(kd_type="NONE")
    student, teacher = build_backbone(cfg), build_backbone(resolve_teacher_cfg(cfg))
    cfg.KD.REVIEWKD.IN_FEATURES = ["p2", "p7"]
    with pytest.raises(ValueError, match=r"\['p7'\] not among the student"):
        _build_head(cfg, student, teacher)
    cfg.KD.REVIEWKD.IN_FEATURES = ["p3", "p2"]
    with pytest.raises(ValueError, match="finest first"):
        _build_head(cfg, student, teacher)
    cfg.KD.REVIEWKD.IN_FEATURES = ["p3", "p5"]  # a subset works, channels come from both FPNs
    head = _build_head(cfg, student, teacher)
    assert len(head.abfs) == 2


# ---------------------------------------------------------------- checkpoints


def _release_file(tmp_path):
    """Combined release layout: teacher.* (a tiny trained-looking detector) + the student backbone."""
    torch.manual_seed(5)
    teacher = build_model(_rkd_cfg(kd_type="NONE")).teacher  # a teacher-shaped module
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {"teacher." + k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model(get_tiny_cfg(kd_type="NONE"))
    state.update({k: v.clone() for k, v in student.state_dict().items() if k.startswith("backbone.bottom_up.")})
    path = tmp_path / "release.pth"
    torch.save({"model": state}, path)
    return path, state


def _load(model, path):
    ckpt = DeepKDCheckpointer(model)
    return ckpt._load_model(ckpt._load_file(str(path)))


def test_release_file_loads_without_the_head(tmp_path, caplog):
    path, state = _release_file(tmp_path)
    cfg = _rkd_cfg()
    cfg.MODEL.WEIGHTS = str(path)
    cfg.TEACHER.ALLOW_RANDOM_INIT = False  # the teacher must come from the file
    torch.manual_seed(6)
    model = build_model(cfg)
    head_before = {k: v.clone() for k, v in model.reviewkd_head.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="deepkd_det.det.checkpoint"):
        incompatible = _load(model, path)
    assert "ReviewKD head not in the checkpoint" in caplog.text
    assert not [k for k in incompatible.missing_keys if k.startswith(("reviewkd_head.", "teacher."))]
    # Other student parts absent from a release file are still reported as missing.
    assert any(k.startswith("backbone.fpn") for k in incompatible.missing_keys)
    for k, v in model.reviewkd_head.state_dict().items():
        assert torch.equal(v, head_before[k]), k
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_trained_head_round_trips_and_partial_head_is_refused(rkd_model, tmp_path):
    full = {k: v.clone() for k, v in rkd_model.state_dict().items()}
    torch.save({"model": full}, tmp_path / "full.pth")
    torch.manual_seed(7)
    other = build_model(_rkd_cfg())
    incompatible = _load(other, tmp_path / "full.pth")
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    for k, v in rkd_model.reviewkd_head.state_dict().items():
        assert torch.equal(other.reviewkd_head.state_dict()[k], v), k

    dropped = "reviewkd_head.abfs.1.attention.0.weight"
    assert dropped in full
    torch.save({"model": {k: v for k, v in full.items() if k != dropped}}, tmp_path / "partial.pth")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"part of the ReviewKD head[\s\S]*abfs\.1\.attention\.0\.weight"):
        _load(other, tmp_path / "partial.pth")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())  # untouched

    # A model without the head (plain DKD student) ignores the head keys.
    plain_cfg = _rkd_cfg()
    plain_cfg.KD.REVIEWKD.ENABLED = False
    plain = build_model(plain_cfg)
    assert plain.part("reviewkd") is None and "reviewkd_head" not in dict(plain.named_children())
    incompatible = _load(plain, tmp_path / "full.pth")
    assert not [k for k in incompatible.unexpected_keys if k.startswith("reviewkd_head.")]


# ---------------------------------------------------------------- configs

# The Faster R-CNN pairs (the Mask R-CNN and RetinaNet rows are checked in tests/det/test_configs.py).
NEW_CONFIGS = sorted(p for p in glob.glob(str(ROOT / "configs/DEEPKD/ReviewKD-*.yaml"))
                     if not p.endswith("-Mask.yaml") and "-RT" not in Path(p).name) + [
    str(ROOT / "configs/DEEPKD/demo/student-reviewkd-deepkd.yaml")
]


@pytest.mark.parametrize("path", NEW_CONFIGS, ids=lambda p: Path(p).name)
def test_new_configs_validate_and_build_the_head(path):
    from detectron2.config import get_cfg

    from deepkd_det.det.data import add_data_config

    cfg = add_deepkd_config(get_cfg())
    add_data_config(cfg)
    cfg.merge_from_file(path)
    validate_deepkd_config(cfg)
    r = cfg.KD.REVIEWKD
    assert r.ENABLED and cfg.MODEL.META_ARCHITECTURE == "DeepKDRCNN"
    name = Path(path).stem
    if "demo" not in path:
        student, teacher = name.split("-")[-2:]
        assert r.LOSS_WEIGHT == REVIEWKD_DET_LOSS_WEIGHTS[f"{teacher}-{student}"]
        assert cfg.OUTPUT_DIR.endswith(name)
    deepkd = "-DKD-" in name and "plain" not in name or "deepkd" in name
    assert cfg.DEEPKD.ENABLED == deepkd
    assert (cfg.KD.TYPE == "NONE") == (name.startswith("ReviewKD-") and "DKD" not in name)
    # Feature names, strides and padding agree between the two FPNs of the pair.
    cfg.MODEL.DEVICE = "cpu"
    head = _build_head(cfg, build_backbone(cfg), build_backbone(resolve_teacher_cfg(cfg)))
    assert len(head.abfs) == len(r.IN_FEATURES) == 5
