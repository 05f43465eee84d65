"""DiffKD in the classifier: pre-pooling maps of every model, the distiller's losses, training, resume."""

from __future__ import annotations

import glob
import os

import pytest
import torch
import torch.nn.functional as F

from deepkd_det.cls.config import load_cfg
from deepkd_det.cls.distillers import StepContext, build_distiller
from deepkd_det.cls.distillers.diffkd import match_spatial
from deepkd_det.cls.engine import ClsTrainer
from deepkd_det.cls.models import build_model, feature_map_and_logits, list_models
from deepkd_det.core.losses import kd_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name", list_models())
def test_feature_map_and_logits_are_the_forward_of_every_model(name):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    size = getattr(model, "img_size", None) or (64 if name.startswith("imagenet") else 32)
    x = torch.randn(2, 3, size, size)
    if hasattr(model, "img_size"):  # the ViTs pool a class token, not the map: DiffKD refuses them clearly
        with pytest.raises(TypeError, match="classifier"):
            feature_map_and_logits(model, x)
        return
    with torch.no_grad():
        fmap, logits = feature_map_and_logits(model, x)
        assert fmap.dim() == 4 and fmap.shape[1] == model.feature_dim
        assert torch.equal(logits, model(x))
        assert torch.equal(torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1), model.forward_features(x))


def _distiller(tiny_cfg, tmp_path, **over):
    cfg = tiny_cfg(tmp_path, DISTILLER__TYPE="DIFFKD", DISTILLER__TEACHER="resnet8", **over)
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), build_model("resnet8", 10)
    return build_distiller(cfg, student, teacher.eval(), num_classes=10)


def test_losses_are_the_core_diffkd_terms_and_the_exact_kl_split(tiny_cfg, tmp_path):
    d = _distiller(tiny_cfg, tmp_path, DIFFKD__AE_CHANNELS=16, DIFFKD__DIFF_WEIGHT=0.7)
    d.train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    rng = torch.get_rng_state()
    logits, losses = d(x, y, StepContext(epoch=1, topk=None))
    assert set(losses) == {"tog", "tcg", "ncg"} and set(d.diffkd) == {"feature", "logits"}
    # Replay with the same noise: the feature pass draws first, then the logit pass.
    torch.set_rng_state(rng)
    fs, ls = feature_map_and_logits(d.student, x)
    with torch.no_grad():
        ft, lt = feature_map_and_logits(d.teacher, x)
    f_out = d.diffkd["feature"](fs, ft)
    l_out = d.diffkd["logits"](ls, lt)
    ce = F.cross_entropy(ls, y)
    expected_tog = ce + f_out.losses["kd"] + 0.7 * f_out.losses["diff"] + f_out.losses["ae"] + 0.7 * l_out.losses["diff"]
    assert f_out.losses["ae"] > 0 and f_out.target.shape[1] == 16  # the map is distilled in the AE latent
    assert torch.allclose(losses["tog"], expected_tog, rtol=1e-5)
    # Without a mask TCKD + NCKD is exactly KL(p_t || p_denoised) at T = 1.
    assert torch.allclose(losses["tcg"] + losses["ncg"], kd_loss(l_out.denoised, lt, temperature=1.0), rtol=1e-5)
    assert torch.allclose(l_out.losses["kd"], kd_loss(l_out.denoised, lt, temperature=1.0), rtol=1e-5)
    # Gradients: student and both DiffKD modules; never the teacher.
    sum(losses.values()).backward()
    assert d.student.conv1.weight.grad.abs().sum() > 0
    for name in ("feature", "logits"):
        assert all(p.grad is not None for p in d.diffkd[name].student_proj.parameters()), name
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    # The top-k mask (DeepKD) changes only the NCKD part.
    torch.set_rng_state(rng)
    _, masked = d(x, y, StepContext(epoch=1, topk=2))
    assert torch.allclose(masked["tcg"], losses["tcg"]) and not torch.allclose(masked["ncg"], losses["ncg"])


def test_maps_of_different_sizes_are_pooled_to_the_smaller():
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 8, 8)
    a, b = match_spatial(s, t)
    assert a is s and torch.allclose(b, F.avg_pool2d(t, 2))


def _run_steps(trainer, steps):
    history, ctx = [], StepContext(epoch=1, topk=None)
    trainer.distiller.train()
    loader = trainer.train_loader(0)
    while len(history) < steps:
        for image, target in loader:
            _, values = trainer.train_step(image, target, ctx, 0, len(history))
            history.append(values)
            if len(history) == steps:
                break
    return history


@pytest.mark.slow
@pytest.mark.parametrize("deepkd", [False, True])
def test_training_lowers_the_diffkd_losses(tmp_path, teacher_ckpt, tiny_cfg, deepkd):
    cfg = tiny_cfg(tmp_path, DISTILLER__TYPE="DIFFKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt,
                   DEEPKD__ENABLED=deepkd, DEEPKD__TOPK__MODE="off", SOLVER__LR=0.1, DIFFKD__CE_WEIGHT=0.0)
    trainer = ClsTrainer(cfg)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    extra = trainer.distiller.extra_parameters()
    assert extra and all(id(p) in optimized for p in extra)
    assert (type(trainer.optimizer).__name__ == "DeepKDOptimizer") == deepkd
    teacher_before = {k: v.clone() for k, v in trainer.distiller.teacher.state_dict().items()}
    h = _run_steps(trainer, 24)
    # tog = feature MSE + diffusion losses here (CE weight 0); tcg + ncg = the logit KL, which
    # falls more slowly (measured: 1.76 -> 1.26 over these 24 steps, tog 5.6 -> 2.8).
    for name, value, ratio in (("tog", lambda v: v["tog"], 0.7), ("kl", lambda v: v["tcg"] + v["ncg"], 0.9)):
        first, last = sum(map(value, h[:3])) / 3, sum(map(value, h[-3:])) / 3
        assert last < ratio * first, (name, [value(v) for v in h])
    for k, v in trainer.distiller.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


@pytest.mark.slow
def test_resume_with_diffkd_is_exact_and_exports_hold_only_the_student(tmp_path, teacher_ckpt, tiny_cfg):
    opts = dict(DISTILLER__TYPE="DIFFKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt,
                DEEPKD__ENABLED=True, SOLVER__EPOCHS=3, DATASET__DIGITS__TRAIN_LIMIT=128, DIFFKD__AE_CHANNELS=16)
    full = ClsTrainer(tiny_cfg(tmp_path / "full", **opts))
    full.train()
    first = ClsTrainer(tiny_cfg(tmp_path / "split", **opts))
    first.train(stop_after=2)
    torch.manual_seed(999)  # whatever the process did in between must not matter
    resumed = ClsTrainer(tiny_cfg(tmp_path / "split", **opts), resume=True)
    assert resumed.start_epoch == 2
    resumed.train()
    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("diffkd.feature.autoencoder.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for p, q in zip(full.params, resumed.params):
        for c in ("tog", "tcg", "ncg"):
            x, y = full.optimizer.momentum_buffer(p, c), resumed.optimizer.momentum_buffer(q, c)
            assert (x is None and y is None) or torch.equal(x, y)  # None: no gradient of that component
    latest = torch.load(tmp_path / "split" / "latest.pth", weights_only=True)
    assert latest["distiller"] and all(k.startswith("diffkd.") for k in latest["distiller"])
    for name in ("student_best.pth", "ckpt_epoch_3.pth"):
        exported = torch.load(tmp_path / "split" / name, weights_only=True)["model"]
        assert exported.keys() == full.student.state_dict().keys(), name


def test_shipped_diffkd_configs():
    files = sorted(glob.glob(os.path.join(ROOT, "configs/cls/*/diffkd/[!_]*.yaml")))
    files += sorted(glob.glob(os.path.join(ROOT, "configs/cls/digits/*diffkd*.yaml")))
    pairs = {}
    for path in files:
        cfg = load_cfg(path)
        assert cfg.DISTILLER.TYPE == "DIFFKD" and cfg.DIFFKD.INFERENCE_STEPS == 5, path
        assert (cfg.DIFFKD.FEATURE_WEIGHT, cfg.DIFFKD.LOGIT_WEIGHT, cfg.DIFFKD.DIFF_WEIGHT) == (1.0, 1.0, 1.0), path
        pairs[(cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT, cfg.DEEPKD.ENABLED)] = cfg
    cifar = {(t, s) for (ds, t, s, _) in pairs if ds == "cifar100"}
    assert cifar == {("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
                     ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2")}
    assert all(pairs[("cifar100", t, s, on)].DIFFKD.AE_CHANNELS == 0 for (t, s) in cifar for on in (False, True))
    for t, s in (("imagenet_resnet34", "imagenet_resnet18"), ("imagenet_resnet50", "imagenet_mobilenet_v2")):
        for on in (False, True):
            assert pairs[("imagenet", t, s, on)].DIFFKD.AE_CHANNELS == 1024
