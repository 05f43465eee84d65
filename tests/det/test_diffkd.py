"""DiffKD feature distillation inside DeepKDRCNN (tiny, CPU): alone and with DeepKD-DKD on the logits."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.modeling import GeneralizedRCNN, build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import deepkd_det.det.modeling  # noqa: E402,F401  (registers DeepKDRCNN)
from deepkd_det.core.boxkd import box_regression_kd_loss  # noqa: E402
from deepkd_det.core.diffkd import DiffKD, drop_diffkd_keys  # noqa: E402
from deepkd_det.det.config import validate_deepkd_config  # noqa: E402
from deepkd_det.det.engine.steps import split_components  # noqa: E402
from deepkd_det.det.weights.checkpoint import DeepKDCheckpointer  # noqa: E402
from tests.det.test_engine import (  # noqa: E402
    _args,
    _Crash,
    _trainer,
    shapes_root,  # noqa: E402,F401  (fixture)
)
from tests.det.tiny import get_tiny_cfg, make_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "DEEPKD" / "demo"
FEATURES = ["p2", "p3", "p4", "p5", "p6"]
TASK = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
DIFF = {"loss_diffkd_kd", "loss_diffkd_diff", "loss_regkd"}
# A randomly initialised teacher with batch norm in eval mode (unit running statistics) has
# exploding feature maps; group norm keeps its maps at the scale a trained teacher's have.
RANDOM_TEACHER = ["TEACHER.MODEL.RESNETS.NORM", "GN"]


def _cfg(kd_type="NONE", weights=(5.0, 1.0, 1.0)):
    cfg = get_tiny_cfg(num_classes=3, kd_type=kd_type, deepkd=kd_type != "NONE")
    cfg.MODEL.META_ARCHITECTURE = "DeepKDRCNN"
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.TEACHER.MODEL.RESNETS.NORM = "GN"  # see RANDOM_TEACHER
    cfg.KD.DIFFKD.ENABLED = True
    cfg.KD.DIFFKD.IN_FEATURES = FEATURES
    cfg.KD.DIFFKD.LOSS_WEIGHT, cfg.KD.DIFFKD.DIFF_WEIGHT, cfg.KD.DIFFKD.REG_WEIGHT = weights
    return cfg


@pytest.fixture(scope="module")
def dkd_model():
    torch.manual_seed(0)
    model = build_model(_cfg("DKD", weights=(5.0, 0.7, 1.3)))
    model.train()
    return model


def _record(model):
    rec = {"teacher_backbone_calls": 0}
    first = next(iter(model.diffkd.values()))

    def teacher_backbone(m, a, o):
        rec["teacher_backbone_calls"] += 1
        rec["teacher_feats"] = {k: v.clone() for k, v in o.items()}

    handles = [
        model.backbone.register_forward_hook(lambda m, a, o: rec.update(student_feats=o)),
        model.teacher.backbone.register_forward_hook(teacher_backbone),
        # The RNG state right before the first DiffKD pass: its noise can be replayed.
        first.register_forward_pre_hook(lambda m, a: rec.update(rng=torch.get_rng_state())),
        model.roi_heads.box_predictor.register_forward_hook(lambda m, a, o: rec.update(deltas=o[1])),
        model.roi_heads.box_pooler.register_forward_pre_hook(lambda m, a: rec.update(boxes=[b.clone() for b in a[1]])),
        model.roi_heads.register_forward_hook(
            lambda m, a, o: rec.update(labels=torch.cat([p.gt_classes for p in o[0]]))),
    ]
    return rec, handles


def test_losses_are_the_per_level_diffkd_and_box_regression_kd(dkd_model):
    model = dkd_model
    assert list(model.diffkd) == FEATURES and all(isinstance(m, DiffKD) for m in model.diffkd.values())
    rec, handles = _record(model)
    try:
        with EventStorage(3):
            losses = model(make_batch(seed=1, h=70, w=90))
    finally:
        for h in handles:
            h.remove()
    assert set(losses) == TASK | DIFF | {"loss_tckd", "loss_nckd"}
    assert rec["teacher_backbone_calls"] == 1  # one teacher pass serves logits, DiffKD and regression KD
    # DeepKD: every DiffKD loss and the regression KD go into TOG with the detector losses.
    parts = split_components(losses)
    assert torch.allclose(parts["tog"], sum(losses[k] for k in TASK | DIFF))

    # Replay: the same noise (RNG state before the first level), the captured maps.
    torch.set_rng_state(rec["rng"])
    with torch.no_grad():
        raw = model.part("diffkd").level_losses({k: v.detach() for k, v in rec["student_feats"].items()},
                                  rec["teacher_feats"])
    assert torch.allclose(losses["loss_diffkd_kd"], 5.0 * raw["kd"], rtol=1e-5)
    assert torch.allclose(losses["loss_diffkd_diff"], 0.7 * raw["diff"], rtol=1e-5)
    # Regression KD on the very boxes the student's head pooled, against the teacher's deltas.
    _, t_deltas = model.teacher.box_logits(None, "BGR", rec["boxes"], features=rec["teacher_feats"], with_deltas=True)
    expected = box_regression_kd_loss(rec["deltas"].detach(), t_deltas, rec["labels"], 3)
    assert expected > 0 and torch.allclose(losses["loss_regkd"], 1.3 * expected, rtol=1e-5)


def test_gradients_reach_the_student_and_diffkd_never_the_teacher(dkd_model):
    model = dkd_model
    model.zero_grad(set_to_none=True)
    with EventStorage(3):
        losses = model(make_batch(seed=2))
    (losses["loss_diffkd_kd"] + losses["loss_diffkd_diff"] + losses["loss_regkd"]).backward()
    for name, module in model.diffkd.items():
        for part in ("student_proj", "denoiser", "noise_adapter", "out_proj"):
            grads = [p.grad for p in getattr(module, part).parameters()]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), (name, part)
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0  # the KD loss reaches the backbone
    assert model.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0  # regression KD
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    model.zero_grad(set_to_none=True)


def test_diffkd_modules_are_training_only(dkd_model, tmp_path):
    model = dkd_model
    keys = model.state_dict().keys()
    diff_keys = [k for k in keys if k.startswith("diffkd.")]
    assert diff_keys and set(drop_diffkd_keys(model.state_dict())) == set(keys) - set(diff_keys)
    # Part of the trained model (so detectron2's param groups and optimizers include them).
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(p) in trained for p in model.diffkd.parameters())
    # Inference is the student alone: a plain GeneralizedRCNN given the checkpoint gives the same
    # detections and never receives the DiffKD tensors.
    DeepKDCheckpointer(model, save_dir=str(tmp_path)).save("full")
    full = torch.load(tmp_path / "full.pth", weights_only=True)["model"]
    assert any(k.startswith("diffkd.") for k in full)
    plain_cfg = get_tiny_cfg(num_classes=3, kd_type="NONE")
    plain = build_model(plain_cfg)
    assert isinstance(plain, GeneralizedRCNN) and getattr(plain, "diffkd", None) is None
    DeepKDCheckpointer(plain).load(str(tmp_path / "full.pth"), checkpointables=[])
    own = plain.state_dict()
    assert not [k for k in own if k.startswith("diffkd.")]
    assert all(torch.equal(v, full[k]) for k, v in own.items())
    model.eval(), plain.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in make_batch(seed=3)]
    with torch.no_grad():
        a, b = model(batch), plain(batch)
    model.train()
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)


def test_validation_names_the_bad_key():
    for key, value, message in [
        ("LOSS_WEIGHT", -1.0, "KD.DIFFKD.LOSS_WEIGHT"),
        ("INFERENCE_STEPS", 0, "KD.DIFFKD.INFERENCE_STEPS"),
        ("AE_CHANNELS", -2, "KD.DIFFKD.AE_CHANNELS"),
        ("IN_FEATURES", ["p2", "p2"], "KD.DIFFKD.IN_FEATURES"),
    ]:
        cfg = _cfg()
        cfg.KD.DIFFKD[key] = value
        with pytest.raises(ValueError, match=message):
            validate_deepkd_config(cfg)
    cfg = _cfg()
    cfg.KD.DIFFKD.IN_FEATURES = ["p7"]
    with pytest.raises(ValueError, match=r"KD.DIFFKD.IN_FEATURES.*p7"):
        build_model(cfg)
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    with pytest.raises(ValueError, match="KD.DIFFKD.ENABLED needs MODEL.META_ARCHITECTURE"):
        validate_deepkd_config(cfg)


def _history(trainer, steps):
    with EventStorage(0) as storage:
        trainer.storage = storage
        for i in range(steps):
            trainer.iter = storage.iter = i
            trainer.run_step()
        return {k: [v for v, _ in h.values()] for k, h in storage.histories().items()}


@pytest.mark.slow
@pytest.mark.parametrize("config,decoupled", [("student-diffkd.yaml", False), ("student-diffkd-deepkd.yaml", True)])
def test_training_lowers_the_diffkd_losses(tmp_path, shapes_root, config, decoupled):  # noqa: F811
    torch.manual_seed(0)
    trainer = _trainer(_args(DEMO / config, tmp_path / "run", shapes_root, *RANDOM_TEACHER))
    assert (type(trainer.optimizer).__name__ == "DeepKDOptimizer") == decoupled
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in trainer.model.diffkd.parameters())
    teacher_before = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    # One batch, repeated: the denoised student is batch-normalised (DiffKD's output projection),
    # so from one batch to the next its KD loss varies about as much as 8 steps lower it.
    inner = trainer._trainer
    batch = next(iter(inner.data_loader))
    if hasattr(inner, "_data_loader_iter_obj"):  # detectron2 > v0.6: created lazily
        inner._data_loader_iter_obj = itertools.repeat(batch)
    else:
        inner._data_loader_iter = itertools.repeat(batch)
    h = _history(trainer, 8)
    # Measured (both configs): loss_diffkd_kd 16.2 -> 12.8 over these 8 steps (last two / first
    # two 0.82); the diffusion loss (about 2 per level, one random t per sample) barely moves.
    total = [a + b for a, b in zip(h["loss_diffkd_kd"], h["loss_diffkd_diff"])]
    for key, values, ratio in (("loss_diffkd_kd", h["loss_diffkd_kd"], 0.9), ("kd + diff", total, 0.95)):
        first, last = sum(values[:2]) / 2, sum(values[-2:]) / 2
        assert last < ratio * first, (key, values)
    if decoupled:
        assert "loss_tckd" in h
    for k, v in trainer.model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


@pytest.mark.slow
def test_resume_with_diffkd_is_exact(tmp_path, shapes_root):  # noqa: F811
    opts = ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.STEPS", "(2,)"]
    config = DEMO / "student-diffkd-deepkd.yaml"
    whole = tmp_path / "whole"
    opts += RANDOM_TEACHER
    _trainer(_args(config, whole, shapes_root, *opts)).train()
    parts = tmp_path / "parts"
    first = _trainer(_args(config, parts, shapes_root, *opts))
    first.register_hooks([_Crash(2)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = _trainer(_args(config, parts, shapes_root, *opts, resume=True))
    assert resumed.start_iter == 2
    resumed.train()
    a = torch.load(whole / "model_final.pth", weights_only=True)["model"]
    b = torch.load(parts / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and any(k.startswith("diffkd.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    mid = torch.load(parts / "model_0000001.pth", weights_only=True)["model"]
    assert any(not torch.equal(mid[k], b[k]) for k in b if k.startswith("diffkd."))
