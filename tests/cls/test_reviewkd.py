"""ReviewKD for classification: stage features, the loss against an independent replica of the
released computation, GPD (a head per width) and DeepKD, in the trainer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.cls.config import ConfigError
from deepkd_det.cls.distillers import GPD, ReviewKD, StepContext
from deepkd_det.cls.distillers.gpd import widen_student
from deepkd_det.cls.engine import ClsTrainer
from deepkd_det.cls.models import build_model
from deepkd_det.cls.models.mobilenet_v1 import MobileNetV1
from deepkd_det.core.gpd import DYNAMIC_TEACHER, at_width

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("build", [lambda: build_model("resnet8x4", 10), lambda: build_model("imagenet_resnet18", 10),
                                   lambda: MobileNetV1(10, width_mult=0.25)], ids=["cifar", "imagenet", "mobilenet_v1"])
def test_stage_features_are_the_stages_before_and_after_relu(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pre, logits = model.forward_stages(x, preact=True)
        post, logits2 = model.forward_stages(x, preact=False)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(logits2, model(x))
        torch.testing.assert_close(model.forward_feature_map(x), F.relu(pre[-2]))
    for a, b in zip(pre[:-1], post[:-1]):
        torch.testing.assert_close(F.relu(a), b)
        assert (a < 0).any()  # really before the ReLU
    assert pre[-1].shape[-2:] == (1, 1) and [f.shape[-1] for f in pre[:-1]] == sorted(
        [f.shape[-1] for f in pre[:-1]], reverse=True)


# ------------------------------------------------------------------ an independent replica of the released forward

class _ReleaseABF(nn.Module):
    """The released ABF's computation (conv1 = 1x1 + BN, conv2 = 3x3 + BN, att_conv), written anew."""

    def __init__(self, ours):
        super().__init__()
        self.conv1, self.conv2, self.att_conv = ours.lateral, ours.output, ours.attention

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def _release_hcl(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for size in [4, 2, 1]:
            if size >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, (size, size)),
                                     F.adaptive_avg_pool2d(ft, (size, size))) * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


def _release_loss(distiller, x, y, epoch, warmup, student_preact):
    """mdistiller's ReviewKD.forward_train, step by step, with the same modules."""
    feats, logits = distiller.student.forward_stages(x, preact=student_preact)
    with torch.no_grad():
        t_feats, _ = distiller.teacher.forward_stages(x, preact=True)
    shapes = [f.shape[-1] for f in feats][::-1]
    out_shapes = [f.shape[-1] for f in t_feats][::-1]
    abfs = [_ReleaseABF(a) for a in distiller.reviewkd.abfs][::-1]
    xs = feats[::-1]
    results = []
    out, res = abfs[0](xs[0], out_shape=out_shapes[0])
    results.append(out)
    for f, abf, shape, out_shape in zip(xs[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out, res = abf(f, res, shape, out_shape)
        results.insert(0, out)
    ce = F.cross_entropy(logits, y)
    return ce, min(epoch / warmup, 1.0) * _release_hcl(results, t_feats)


class _HalfSizeTeacher(nn.Module):
    """A teacher whose stage maps are half the student's size (as a CIFAR ShuffleNet's are)."""

    def __init__(self):
        super().__init__()
        self.net = build_model("resnet32", 10)

    def forward(self, x):
        return self.net(x)

    def forward_stages(self, x, preact=True):
        feats, logits = self.net.forward_stages(x, preact)
        return [F.avg_pool2d(f, 2) for f in feats[:-1]] + feats[-1:], logits


@pytest.mark.parametrize("student_preact", [False, True])
def test_reviewkd_loss_equals_the_released_computation(student_preact):
    torch.manual_seed(0)
    # resnet8x4 student (32/16/8 px stages) -> a teacher with 16/8/4 px stages: the out_shape
    # resizing of the fused maps is exercised as well
    student = build_model("resnet8x4", 10).train()
    teacher = _HalfSizeTeacher().eval()
    distiller = ReviewKD(student, teacher, probe_size=32, warmup=4.0, student_preact=student_preact).train()
    assert [a.lateral[0].in_channels for a in distiller.reviewkd.abfs] == [64, 128, 256, 256]
    assert [a.output[0].out_channels for a in distiller.reviewkd.abfs] == [16, 32, 64, 64]
    assert distiller.reviewkd.abfs[0].lateral[0].out_channels == 256  # min(512, 256)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    state = {k: v.clone() for k, v in distiller.state_dict().items()}
    logits, losses = distiller(x, y, StepContext(epoch=3))
    distiller.load_state_dict(state)  # BN running statistics back to where they were
    ce, hcl = _release_loss(distiller, x, y, epoch=3, warmup=4.0, student_preact=student_preact)
    torch.testing.assert_close(losses["tog"], ce)
    torch.testing.assert_close(losses["reviewkd"], hcl)
    assert losses["reviewkd"].item() > 0
    assert distiller.buffer_losses(losses).keys() == {"tog"}


def test_reviewkd_levels_must_pair_up():
    with pytest.raises(ValueError, match="levels"):
        ReviewKD(build_model("resnet8", 10), build_model("imagenet_resnet18", 10), probe_size=32)


def test_gpd_reviewkd_gives_each_width_its_own_head(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, GPD__ENABLED=True, GPD__CBR=False)
    shared = widen_student(cfg, build_model("resnet8", 10))
    teacher = build_model("resnet8x4", 10).eval()
    inner = ReviewKD(shared, teacher, probe_size=8, warmup=0.0)
    gpd = GPD(inner).train()
    assert [a.lateral[0].in_channels for a in gpd.reviewkd_dynamic_teacher.abfs] == [32, 64, 128, 128]
    assert [a.lateral[0].in_channels for a in gpd.reviewkd.abfs] == [16, 32, 64, 64]
    assert any(k.startswith("reviewkd_dynamic_teacher.") for k in gpd.extra_state_dict())
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    logits, losses = gpd(x, y, StepContext(epoch=1))
    assert losses.keys() == {"tog", "reviewkd", "dt_tog", "dt_reviewkd", "gpd_kd"}
    assert set(gpd.buffer_losses(losses)) == {"tog"}
    # the dynamic teacher's terms: the shared model at its width through its own head, recomputed
    t_levels, _ = inner.teacher_levels(x)
    with at_width(shared, DYNAMIC_TEACHER):
        _, again = inner.losses_at(x, y, t_levels, StepContext(epoch=1), gpd.reviewkd_dynamic_teacher)
    torch.testing.assert_close(again["reviewkd"], losses["dt_reviewkd"])
    torch.testing.assert_close(again["tog"], losses["dt_tog"])
    # the soft target: the student's logits against the dynamic teacher's, released weight 3
    assert losses["gpd_kd"].item() > 0 and losses["dt_reviewkd"].item() > 0


@pytest.mark.parametrize("extra", [{}, {"GPD__ENABLED": True}, {"DEEPKD__ENABLED": True}],
                         ids=["reviewkd", "reviewkd_gpd", "deepkd_reviewkd"])
def test_reviewkd_trains_checkpoints_and_resumes(extra, tmp_path, teacher_ckpt, tiny_cfg):
    opts = dict(DISTILLER__TYPE="REVIEWKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt,
                REVIEWKD__WARMUP=1.0, SOLVER__EPOCHS=2, DATASET__DIGITS__TRAIN_LIMIT=96, **extra)
    full = ClsTrainer(tiny_cfg(tmp_path / "full", **opts))
    full.train()
    rows = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    assert "train/reviewkd" in rows[-1] and rows[-1]["train/reviewkd"] > 0
    heads = {k: v for k, v in full.distiller.extra_state_dict().items() if "reviewkd" in k}
    assert heads and any(k.startswith("reviewkd.") for k in heads)
    ClsTrainer(tiny_cfg(tmp_path / "split", **opts)).train(stop_after=1)
    resumed = ClsTrainer(tiny_cfg(tmp_path / "split", **opts), resume=True)
    resumed.train()
    for name, value in full.distiller.state_dict().items():
        assert torch.equal(value, resumed.distiller.state_dict()[name]), name


def test_reviewkd_refuses_a_model_without_stages(tmp_path, tiny_cfg):
    with pytest.raises(ConfigError, match="no stage features"):
        tiny_cfg(tmp_path, DISTILLER__TYPE="REVIEWKD", DISTILLER__TEACHER="resnet8", DISTILLER__STUDENT="vgg8")


def test_reviewkd_configs_carry_the_published_recipes():
    import os

    from deepkd_det.cls.config import load_cfg

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cls")
    expect = {  # file: (weight, warm-up, student preact, mid, lr, batch, GPD)
        "cifar100/reviewkd/resnet32x4_resnet8x4.yaml": (5.0, 20.0, False, 0, 0.05, 64, False),
        "imagenet/reviewkd/resnet34_resnet18.yaml": (1.0, 1.0, True, 0, 0.1, 256, False),
        "imagenet/reviewkd/resnet50_mobilenetv1.yaml": (8.0, 1.0, True, 256, 0.1, 256, False),
        "imagenet/gpd/reviewkd_resnet34_resnet18.yaml": (1.0, 0.0, True, 512, 0.1, 512, True),
        "imagenet/gpd/reviewkd_resnet50_mobilenetv1.yaml": (1.0, 0.0, True, 256, 0.1, 512, True),
    }
    for name, (weight, warmup, preact, mid, lr, batch, gpd) in expect.items():
        cfg = load_cfg(os.path.join(root, name))
        r = cfg.REVIEWKD
        assert cfg.DISTILLER.TYPE == "REVIEWKD"
        assert (r.WEIGHT, r.WARMUP, r.STUDENT_PREACT, r.MID_CHANNELS) == (weight, warmup, preact, mid), name
        assert (cfg.SOLVER.LR, cfg.SOLVER.BATCH_SIZE, cfg.GPD.ENABLED) == (lr, batch, gpd), name
        if gpd:
            assert (cfg.GPD.KD_RATIO, cfg.GPD.CLIP_GRAD_NORM, cfg.EMA.ENABLED) == (3.0, 5.0, True)
