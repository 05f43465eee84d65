"""Classification MLKD and CRLD (two views), plain and with DeepKD, and DOT as the optimizer."""

from __future__ import annotations

import copy
import glob
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from deepkd_det.cls.config import ConfigError, experiment_name, load_cfg
from deepkd_det.cls.data import CIFAR100_MEAN, CIFAR100_STD, build_datasets
from deepkd_det.cls.distillers import StepContext
from deepkd_det.cls.engine import ClsTrainer, evaluate, lr_at
from deepkd_det.core.crld import crld_loss
from deepkd_det.core.losses import dkd_components
from deepkd_det.core.mlkd import mlkd_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




def _student_opts(teacher_ckpt, **extra):
    return dict(DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt, **extra)


# ----------------------------------------------------------------------------- two views
def _cifar_pil(entry, i):
    return Image.fromarray(entry["data"][i].reshape(3, 32, 32).transpose(1, 2, 0))


def test_two_view_cifar_items_are_two_augmentations_of_the_same_image(tmp_path, tiny_cfg, write_cifar100):
    files = write_cifar100(str(tmp_path / "cifar"), n_train=3, n_test=2)
    cfg = tiny_cfg(tmp_path / "run", DATASET__TYPE="cifar100", DATASET__ROOT=str(tmp_path / "cifar"))
    train, val, _ = build_datasets(cfg, two_views=True)
    plain_train, plain_val, _ = build_datasets(cfg)
    normalize = T.Normalize(CIFAR100_MEAN, CIFAR100_STD)
    weak_ops = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    weak_ref = T.Compose(weak_ops + [T.ToTensor(), normalize])
    strong_ref = T.Compose(weak_ops + [T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), T.ToTensor(), normalize])
    for i in range(3):
        torch.manual_seed(100 + i)
        (weak, strong), label = train[i]
        assert label == files["train"]["fine_labels"][i]
        assert weak.shape == strong.shape == (3, 32, 32)
        assert not torch.equal(weak, strong)
        # the same random draws on the file's own image give the same two views, weak first
        torch.manual_seed(100 + i)
        image = _cifar_pil(files["train"], i)
        torch.testing.assert_close(weak, weak_ref(image), rtol=0, atol=0)
        torch.testing.assert_close(strong, strong_ref(image), rtol=0, atol=0)
        # and the weak view is a shifted, possibly mirrored copy of that image
        original = normalize(T.ToTensor()(image))
        assert _is_shifted_copy(weak, original, pad=4, flips=True)
    # evaluation data is untouched: one tensor per item, as without two views
    for i in range(2):
        image, label = val[i]
        assert torch.is_tensor(image)
        torch.testing.assert_close(image, plain_val[i][0], rtol=0, atol=0)
        assert label == plain_val[i][1] == files["test"]["fine_labels"][i]
    assert torch.is_tensor(plain_train[0][0])


def _is_shifted_copy(view, original, pad, flips=False):
    """True when ``view`` equals ``original`` shifted by up to ``pad`` pixels (zeros outside), maybe mirrored."""
    h, w = original.shape[-2:]
    candidates = [original, original.flip(-1)] if flips else [original]
    for src in candidates:
        padded = F.pad(src, (pad, pad, pad, pad))
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                window = padded[:, dy:dy + h, dx:dx + w]
                # torchvision pads the raw pixels with 0 before normalising: compare inside the image only
                inside = F.pad(torch.ones(1, h, w), (pad, pad, pad, pad))[:, dy:dy + h, dx:dx + w].bool()
                if torch.allclose(view[:, inside[0]], window[:, inside[0]], atol=1e-6):
                    return True
    return False


def test_two_view_digits_items_and_batches(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, DATASET__DIGITS__SIZE=16, DATASET__DIGITS__TRAIN_LIMIT=64)
    train, val, _ = build_datasets(cfg, two_views=True)
    torch.manual_seed(0)
    differ = 0
    for i in range(8):
        (weak, strong), label = train[i]
        assert label == int(train.labels[i])
        assert weak.shape == strong.shape == (3, 16, 16)
        assert _is_shifted_copy(weak, train.images[i], pad=2)  # digits: shift, no flip
        differ += not torch.equal(weak, strong)
    assert differ >= 6  # AutoAugment may draw an identity-like op now and then, not for most images
    assert torch.is_tensor(val[0][0])
    from deepkd_det.cls.data import build_loaders

    loader, _ = build_loaders(cfg, train, val)
    views, labels = next(iter(loader(0)))
    assert len(views) == 2 and views[0].shape == views[1].shape == (32, 3, 16, 16) and labels.shape == (32,)


# ----------------------------------------------------------------------------- distillers
@pytest.mark.parametrize("method", ["MLKD", "CRLD"])
def test_plain_two_view_distiller_is_the_core_loss(method, tmp_path, teacher_ckpt, tiny_cfg):
    """Plain MLKD/CRLD: the three losses sum to core's plain loss on the two views (wiring check)."""
    cfg = tiny_cfg(tmp_path, **_student_opts(teacher_ckpt, DISTILLER__TYPE=method))
    trainer = ClsTrainer(cfg)
    distiller = trainer.distiller.train()
    assert type(distiller).needs_two_views
    torch.manual_seed(0)
    weak, strong = torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)
    target = torch.randint(0, 10, (16,))
    logits, losses = distiller((weak, strong), target, StepContext(epoch=1))
    assert set(losses) == {"tog", "tcg", "ncg"}
    zs_w, zs_s = distiller.student(weak), distiller.student(strong)  # train mode: batch statistics again
    with torch.no_grad():
        zt_w, zt_s = distiller.teacher(weak), distiller.teacher(strong)
    torch.testing.assert_close(logits, zs_w)
    if method == "MLKD":
        ref = mlkd_loss(zs_w, zt_w, zs_s, zt_s, target, ce_weight=cfg.MLKD.CE_WEIGHT, kd_weight=cfg.MLKD.KD_WEIGHT)
    else:
        ref = crld_loss(zs_w, zt_w, zs_s, zt_s, target)
    torch.testing.assert_close(sum(losses.values()), sum(ref.values()), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs two views of each batch"):
        distiller(weak, target, StepContext(epoch=1))


METHODS = {
    "mlkd": dict(DISTILLER__TYPE="MLKD", MLKD__CE_WEIGHT=0.5, MLKD__KD_WEIGHT=0.5),
    "crld": dict(DISTILLER__TYPE="CRLD"),
    "deepkd_mlkd": dict(DISTILLER__TYPE="MLKD", MLKD__CE_WEIGHT=0.5, MLKD__KD_WEIGHT=0.5, MLKD__SPLIT="dkd",
                        MLKD__WARMUP=1.0, DEEPKD__ENABLED=True),
    "deepkd_crld": dict(DISTILLER__TYPE="CRLD", CRLD__SPLIT="dkd", CRLD__WARMUP=1.0, DEEPKD__ENABLED=True),
    "dot_dkd": dict(DISTILLER__TYPE="DKD", DEEPKD__ENABLED=True, DEEPKD__OPTIMIZER="dot", DEEPKD__TOPK__MODE="off"),
}
BUFFERS = {"deepkd_mlkd": ("tog", "tcg", "ncg"), "deepkd_crld": ("tog", "tcg", "ncg"), "dot_dkd": ("task", "kd")}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_learns(method, tmp_path, teacher_ckpt, tiny_cfg):
    cfg = tiny_cfg(tmp_path, **_student_opts(teacher_ckpt, SOLVER__EPOCHS=2, SOLVER__LR_DECAY_STAGES=[1],
                                             **METHODS[method]))
    trainer = ClsTrainer(cfg)
    before = evaluate(trainer.student, trainer.val_loader, trainer.device)["top1"]
    summary = trainer.train()
    assert summary["last_top1"] > before + 20.0, (before, summary)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert set(k for k in rows[0] if k.startswith("train/")) == {"train/tog", "train/tcg", "train/ncg",
                                                                 "train/loss", "train/top1"}
    if method in BUFFERS:
        assert tuple(trainer.optimizer.components) == BUFFERS[method]
        for p in trainer.student.parameters():
            for component in BUFFERS[method]:
                assert float(trainer.optimizer.momentum_buffer(p, component).abs().sum()) > 0
    else:
        assert isinstance(trainer.optimizer, torch.optim.SGD)
    if method.startswith("deepkd"):
        assert rows[0]["topk/K"] < rows[-1]["topk/K"] <= 9  # the dynamic top-k mask grows
    if method == "dot_dkd":
        assert experiment_name(cfg) == "dot_dkd_resnet8_resnet8" and "topk/K" not in rows[0]


# ----------------------------------------------------------------------------- DOT
def test_dot_through_the_trainer_is_the_two_buffer_update(tmp_path, teacher_ckpt, tiny_cfg):
    """Two steps of DKD under DOT equal a plain-torch two-buffer momentum update on the same batches."""
    cfg = tiny_cfg(tmp_path, **_student_opts(
        teacher_ckpt, DISTILLER__TYPE="DKD", DEEPKD__ENABLED=True, DEEPKD__OPTIMIZER="dot", DEEPKD__DOT_DELTA=0.05,
        DEEPKD__TOPK__MODE="off", SOLVER__EPOCHS=1, DATASET__DIGITS__TRAIN_LIMIT=64, SOLVER__WEIGHT_DECAY=5e-3))
    trainer = ClsTrainer(cfg)
    assert type(trainer.optimizer).__name__ == "DOTOptimizer" and len(trainer.train_loader) == 2
    student = copy.deepcopy(trainer.student).train()
    rng = torch.get_rng_state()
    batches = list(trainer.train_loader(0))
    torch.set_rng_state(rng)  # the trainer draws the same augmentations
    trainer.train()

    params = list(student.parameters())
    mu, delta, wd, lr = cfg.SOLVER.MOMENTUM, cfg.DEEPKD.DOT_DELTA, cfg.SOLVER.WEIGHT_DECAY, lr_at(cfg, 0.0)
    buffers = {"task": None, "kd": None}
    for image, target in batches:
        logits = student(image)
        with torch.no_grad():
            teacher_logits = trainer.distiller.teacher(image)
        tcg, ncg = dkd_components(logits, teacher_logits, target, alpha=cfg.DKD.ALPHA, beta=cfg.DKD.BETA,
                                  temperature=cfg.DKD.T)
        task = cfg.DKD.CE_WEIGHT * F.cross_entropy(logits, target)
        g_task = torch.autograd.grad(task, params, retain_graph=True)
        g_kd = torch.autograd.grad(tcg + ncg, params)
        g_task = [g + wd * p.detach() for g, p in zip(g_task, params)]
        for name, grads, m in (("task", g_task, mu - delta), ("kd", g_kd, mu + delta)):
            old = buffers[name]
            buffers[name] = [g.clone() for g in grads] if old is None else [m * b + g for b, g in zip(old, grads)]
        with torch.no_grad():
            for i, p in enumerate(params):
                p -= lr * (buffers["task"][i] + buffers["kd"][i])
    for (name, a), b in zip(trainer.student.named_parameters(), params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for p, b_task, b_kd in zip(trainer.student.parameters(), buffers["task"], buffers["kd"]):
        torch.testing.assert_close(trainer.optimizer.momentum_buffer(p, "task"), b_task, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(trainer.optimizer.momentum_buffer(p, "kd"), b_kd, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "opts, message",
    [
        (["DISTILLER.TYPE", "DKD", "DISTILLER.TEACHER", "resnet8", "DEEPKD.ENABLED", "True", "DEEPKD.OPTIMIZER",
          "adam"], "DEEPKD.OPTIMIZER must be one of \\('deepkd', 'dot'\\), got 'adam'"),
        (["DEEPKD.OPTIMIZER", "dot"], "DEEPKD.OPTIMIZER dot needs DEEPKD.ENABLED True"),
        (["DISTILLER.TYPE", "DKD", "DISTILLER.TEACHER", "resnet8", "DEEPKD.ENABLED", "True", "DEEPKD.OPTIMIZER",
          "dot", "DEEPKD.DOT_DELTA", "0.15"], "DOT distillation momentum .* = 1.05 is outside \\[0, 1\\)"),
        (["DISTILLER.TYPE", "DKD", "DISTILLER.TEACHER", "resnet8", "DEEPKD.ENABLED", "True", "DEEPKD.OPTIMIZER",
          "dot", "DEEPKD.DECOUPLE", "False"], "contradicts DEEPKD.DECOUPLE False"),
        (["DISTILLER.TYPE", "MLKD"], "needs a teacher"),
        (["MLKD.TEMPERATURES", "[4, 0]"], "MLKD.TEMPERATURES must be a non-empty list of positive numbers"),
        (["MLKD.SPLIT", "dot"], "MLKD.SPLIT must be 'kd' or 'dkd'"),
        (["CRLD.TAU_STRONG", "1.2"], "CRLD.TAU_STRONG is a probability threshold"),
        (["CRLD.CONFIDENCE_MASK", "rows"], "CRLD.CONFIDENCE_MASK must be one of"),
        (["DATASET.STRONG_AUG", "mixup"], "DATASET.STRONG_AUG must be one of"),
    ],
)
def test_bad_method_settings_are_refused(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_cfg(None, opts)


PAIRS = {("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
         ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"), ("wrn_40_2", "ShuffleV1"),
         ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV2")}
LIGHT = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


@pytest.mark.parametrize("method", ["mlkd", "crld"])
def test_cifar100_two_view_configs_follow_the_release(method):
    seen = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "configs/cls/cifar100", method, "[!_]*.yaml"))):
        cfg = load_cfg(path)
        t, s = cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT
        seen.add((t, s))
        assert cfg.DISTILLER.TYPE == method.upper() and cfg.DEEPKD.ENABLED and cfg.DEEPKD.OPTIMIZER == "deepkd"
        assert (cfg.DEEPKD.DELTA_TOG, cfg.DEEPKD.DELTA_TCG, cfg.DEEPKD.DELTA_NCG) == (0.075, -0.075, 0.05)
        assert (cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.MOMENTUM) == (64, 5e-4, 0.9)
        if method == "mlkd":
            m = cfg.MLKD
            assert (cfg.SOLVER.EPOCHS, list(cfg.SOLVER.LR_DECAY_STAGES)) == (480, [150, 180, 210])
            assert cfg.SOLVER.LR == (0.01 if s in LIGHT else 0.025), path
            assert (m.CE_WEIGHT, m.KD_WEIGHT, m.SPLIT, m.ALPHA, m.BETA) == (0.5, 0.5, "dkd", 1.0, 2.0)
            assert list(m.TEMPERATURES) == [2.0, 3.0, 4.0, 5.0, 6.0]
        else:
            c = cfg.CRLD
            assert (cfg.SOLVER.EPOCHS, cfg.SOLVER.LR_SCHEDULER) == (240, "cosine")
            assert cfg.SOLVER.LR == (0.01 if s in LIGHT else 0.05), path
            assert (c.CE_WEIGHT, c.WITHIN_WEIGHT, c.CROSS_WEIGHT, c.T) == (1.0, 2.0, 0.5, 4.0)
            assert (c.TAU_WEAK, c.TAU_STRONG, c.SPLIT, c.ALPHA, c.BETA) == (0.9, 0.2, "dkd", 1.0, 2.0)
    assert seen == PAIRS
    for pair in ("resnet34_resnet18", "resnet50_mobilenetv2"):
        cfg = load_cfg(os.path.join(ROOT, "configs/cls/imagenet", method, f"{pair}.yaml"))
        assert cfg.DATASET.TYPE == "imagenet" and cfg.DEEPKD.ENABLED and cfg[method.upper()].BETA == 0.5
    dot = load_cfg(os.path.join(ROOT, "configs/cls/digits/dot_dkd.yaml"))
    assert (dot.DEEPKD.OPTIMIZER, dot.DEEPKD.DOT_DELTA, dot.DEEPKD.TOPK.MODE) == ("dot", 0.075, "off")


def test_strong_augment_choices_build(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, DATASET__STRONG_AUG="randaugment", DATASET__DIGITS__TRAIN_LIMIT=32)
    train, _, _ = build_datasets(cfg, two_views=True)
    assert type(train.strong_aug).__name__ == "RandAugment"
    (weak, strong), _ = train[0]
    assert np.isfinite(strong.numpy()).all() and strong.shape == weak.shape
