"""GPD in the classification trainer: config, losses and buffers, training, resume, export, eval_cls."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from deepkd_det.cls.config import ConfigError
from deepkd_det.cls.distillers import DKD, GPD, StepContext, Vanilla
from deepkd_det.cls.distillers.gpd import widen_student
from deepkd_det.cls.engine import ClsTrainer, evaluate
from deepkd_det.cls.models import build_model, load_teacher_weights
from deepkd_det.core.gpd import DYNAMIC_TEACHER, STUDENT, WidthSliced, at_width, gpd_soft_target_loss
from deepkd_det.core.losses import dkd_components
from tests.toolload import load_tool


def _gpd_opts(teacher_ckpt, **extra):
    return dict(DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt, GPD__ENABLED=True,
                **extra)


@pytest.mark.parametrize("key, value, match", [
    ("GPD__RATIO", 1, "GPD.RATIO"),
    ("GPD__BRANCHES", 4, "GPD.BRANCHES"),
    ("GPD__KD_RATIO", -1.0, "GPD.KD_RATIO"),
    ("GPD__CLIP_GRAD_NORM", -1.0, "GPD.CLIP_GRAD_NORM"),
    ("GPD__DEEPKD_BUFFERS", "both", "GPD.DEEPKD_BUFFERS"),
    ("GPD__CBR_INIT", "zero", "GPD.CBR_INIT"),
    ("DISTILLER__STUDENT", "ShuffleV1", "cannot be width-sliced"),
])
def test_bad_gpd_settings_are_refused(tmp_path, tiny_cfg, key, value, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(tmp_path, GPD__ENABLED=True, **{key: value})


def test_gpd_needs_a_one_view_method(tmp_path, tiny_cfg):
    with pytest.raises(ConfigError, match="GPD.ENABLED supports DISTILLER.TYPE NONE"):
        tiny_cfg(tmp_path, GPD__ENABLED=True, DISTILLER__TYPE="MLKD", DISTILLER__TEACHER="resnet8")


def test_losses_follow_the_released_step_and_the_buffer_maps(tmp_path, tiny_cfg):
    """Every loss term against an independent computation; the buffer sums exact for both maps."""
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, GPD__ENABLED=True)
    shared = widen_student(cfg, build_model("resnet8", 10))
    teacher = build_model("resnet8", 10).eval()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    reference = copy.deepcopy(shared).train()  # train-mode BN: batch statistics, so logits match
    with torch.no_grad():
        with at_width(reference, DYNAMIC_TEACHER):
            z_dt = reference(x)
        z_s = reference(x)
        z_t = teacher(x)
    ctx = StepContext(epoch=5, topk=3)
    dkd = dict(alpha=1.0, beta=2.0, temperature=4.0, warmup=1.0)
    gpd = GPD(DKD(shared, teacher, alpha=1.0, beta=2.0, temperature=4.0, warmup=1.0), kd_ratio=3.0).train()
    logits, losses = gpd(x, y, ctx)
    torch.testing.assert_close(logits, z_s)
    tcg, ncg = dkd_components(z_s, z_t, y, topk=3, **dkd)  # the student: with DeepKD's top-k mask
    dt_tcg, dt_ncg = dkd_components(z_dt, z_t, y, topk=None, **dkd)  # the dynamic teacher: plain DKD
    expected = {"tog": F.cross_entropy(z_s, y), "tcg": tcg, "ncg": ncg, "dt_tog": F.cross_entropy(z_dt, y),
                "dt_tcg": dt_tcg, "dt_ncg": dt_ncg, "gpd_kd": 3.0 * gpd_soft_target_loss(z_s, z_dt)}
    assert losses.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name], msg=name)
    task = gpd.buffer_losses(losses)
    torch.testing.assert_close(task["tog"], sum(expected[n] for n in ("tog", "dt_tog", "dt_tcg", "dt_ncg", "gpd_kd")))
    assert task["tcg"] is losses["tcg"] and task["ncg"] is losses["ncg"]
    gpd.buffer_map = GPD(DKD(shared, teacher), buffers="split").buffer_map
    split = gpd.buffer_losses(losses)
    torch.testing.assert_close(split["tog"], expected["tog"] + expected["dt_tog"] + expected["gpd_kd"])
    torch.testing.assert_close(split["tcg"], tcg + dt_tcg)
    torch.testing.assert_close(split["ncg"], ncg + dt_ncg)
    # From scratch: the dynamic teacher learns CE only, the student CE + soft target.
    _, scratch = GPD(Vanilla(shared)).train()(x, y, ctx)
    assert scratch.keys() == {"tog", "dt_tog", "gpd_kd"}
    torch.testing.assert_close(scratch["dt_tog"], F.cross_entropy(z_dt, y))


def test_gpd_deepkd_learns(tmp_path, teacher_ckpt, tiny_cfg):
    """GPD + DeepKD (CBR on, clip through the decoupled step): three epochs move the student's top-1."""
    cfg = tiny_cfg(tmp_path, **_gpd_opts(teacher_ckpt, DEEPKD__ENABLED=True, SOLVER__LR=0.01))
    trainer = ClsTrainer(cfg)
    assert any(isinstance(m, WidthSliced) for m in trainer.student.modules())
    before = evaluate(trainer.student, trainer.val_loader, trainer.device)["top1"]
    summary = trainer.train()
    assert summary["last_top1"] > before + 7.0, (before, summary)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert {"train/dt_tog", "train/dt_tcg", "train/dt_ncg", "train/gpd_kd", "val/dt_top1"} <= rows[0].keys()
    for p in trainer.student.parameters():  # the shared weights hold all three DeepKD buffers
        for component in ("tog", "tcg", "ncg"):
            assert trainer.optimizer.momentum_buffer(p, component) is not None


def test_gpd_deepkd_resumes_exactly(tmp_path, teacher_ckpt, tiny_cfg):
    """Stopping after epoch 1 and resuming gives the uninterrupted run's bits (both widths' BN too)."""
    opts = _gpd_opts(teacher_ckpt, DEEPKD__ENABLED=True, SOLVER__EPOCHS=2, SOLVER__LR_DECAY_STAGES=[1],
                     DATASET__DIGITS__TRAIN_LIMIT=64, DEEPKD__TOPK__END=1.0)
    full = ClsTrainer(tiny_cfg(tmp_path / "full", **opts))
    full.train()
    first = ClsTrainer(tiny_cfg(tmp_path / "split", **opts))
    first.train(stop_after=1)
    torch.manual_seed(999)  # whatever the process did in between must not matter
    resumed = ClsTrainer(tiny_cfg(tmp_path / "split", **opts), resume=True)
    assert resumed.start_epoch == 1
    resumed.train()
    a, b = full.student.state_dict(), resumed.student.state_dict()
    assert a.keys() == b.keys() and any(k.endswith("student_running_mean") for k in a)
    assert any(k.endswith("branch_scale") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [[json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")] for d in ("full", "split")]
    assert [(r["val/top1"], r["val/dt_top1"]) for r in rows[0]] == [(r["val/top1"], r["val/dt_top1"]) for r in rows[1]]


def test_gpd_dkd_learns_and_exports_the_plain_student(tmp_path, teacher_ckpt, tiny_cfg, capsys):
    """GPD + DKD (CBR off, plain SGD with the clip): top-1 moves; the student files load strictly into
    the ordinary resnet8 and give the shared model's student-width logits; eval_cls agrees."""
    eval_cls = load_tool("eval_cls")

    cfg = tiny_cfg(tmp_path, **_gpd_opts(teacher_ckpt, GPD__CBR=False, SOLVER__EPOCHS=2, SOLVER__LR_DECAY_STAGES=[1]))
    trainer = ClsTrainer(cfg)
    before = evaluate(trainer.student, trainer.val_loader, trainer.device)["top1"]
    summary = trainer.train()
    assert summary["last_top1"] > before + 8.0, (before, summary)
    last = tmp_path / f"ckpt_epoch_{cfg.SOLVER.EPOCHS}.pth"
    plain = load_teacher_weights(build_model("resnet8", 10), last)  # strict: the ordinary class
    assert not any(isinstance(m, WidthSliced) for m in plain.modules())
    x = torch.randn(16, 3, 8, 8)
    trainer.student.eval()
    plain.eval()
    with torch.no_grad(), at_width(trainer.student, STUDENT):
        torch.testing.assert_close(plain(x), trainer.student(x), rtol=1e-5, atol=1e-5)
    best = load_teacher_weights(build_model("resnet8", 10), tmp_path / "student_best.pth")
    assert evaluate(best, trainer.val_loader, trainer.device)["top1"] == pytest.approx(summary["best_top1"])

    cfg_file = str(tmp_path / "config.yaml")
    assert eval_cls.main(["--cfg", cfg_file, "--ckpt", str(tmp_path / "latest.pth")]) == 0
    shared = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shared["agree"] and shared["max_logit_diff"] <= 1e-4
    assert shared["shared_student"]["top1"] == pytest.approx(shared["exported"]["top1"])
    assert shared["exported"]["top1"] == pytest.approx(summary["last_top1"])
    assert "dynamic_teacher" in shared
    assert eval_cls.main(["--cfg", cfg_file, "--ckpt", str(last)]) == 0
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exported["top1"] == pytest.approx(summary["last_top1"]) and "agree" not in exported


def test_imagenet_gpd_configs_carry_the_released_recipe():
    import os

    from deepkd_det.cls.config import load_cfg

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cls", "imagenet", "gpd")
    for pair, student, beta in (("resnet34_resnet18", "imagenet_resnet18", 0.5),
                                ("resnet50_mobilenetv2", "imagenet_mobilenet_v2", 2.0)):
        for prefix, deepkd in (("", False), ("deepkd_", True)):
            cfg = load_cfg(os.path.join(root, f"{prefix}{pair}.yaml"))
            s, d, g = cfg.SOLVER, cfg.DKD, cfg.GPD
            assert (s.EPOCHS, s.LR, list(s.LR_DECAY_STAGES), s.LR_DECAY_RATE, s.BATCH_SIZE) == (100, 0.1, [30, 60, 90],
                                                                                                0.1, 512)
            assert (s.WEIGHT_DECAY, s.MOMENTUM, s.WARMUP_EPOCHS) == (1e-4, 0.9, 0.0)
            assert (d.ALPHA, d.BETA, d.T, d.WARMUP, d.CE_WEIGHT) == (1.0, beta, 1.0, 0.0, 1.0)
            assert (g.ENABLED, g.RATIO, g.CBR, g.BRANCHES, g.KD_RATIO, g.CLIP_GRAD_NORM) == (True, 2, True, 6, 3.0, 5.0)
            assert cfg.DISTILLER.STUDENT == student and cfg.DEEPKD.ENABLED == deepkd
    for name in ("scratch_resnet18", "scratch_mobilenetv2"):
        cfg = load_cfg(os.path.join(root, f"{name}.yaml"))
        assert cfg.DISTILLER.TYPE == "NONE" and cfg.GPD.ENABLED and not cfg.DEEPKD.ENABLED
