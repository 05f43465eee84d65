"""GPD core: width slicing, inverse reparameterization, CBR folding and export (deepkd_det/core/gpd.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import MobileNetV2, resnet18
from torchvision.models.resnet import Bottleneck, ResNet

from deepkd_det.cls.models.cifar_resnet import resnet8, resnet8x4
from deepkd_det.core.gpd import (
    DYNAMIC_TEACHER,
    STUDENT,
    BranchConv2d,
    SlicedBatchNorm2d,
    at_width,
    export,
    gpd_ratio,
    gpd_soft_target_loss,
    ir_gap,
    set_width,
    widen,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_mobilenet_v2(num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, width_mult=0.25)  # torchvision's class: ReLU6 + depthwise


def small_bottleneck_resnet(num_classes: int = 10) -> ResNet:
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes, width_per_group=16)


class GroupedNet(nn.Module):
    """A stem, a grouped conv with 2 channels per group, a depthwise 3x3 and a bias conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.pointwise = nn.Conv2d(8, 6, 1, bias=True)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.grouped(x))) + x
        x = self.act(self.bn2(self.depthwise(x)))
        x = F.relu(self.pointwise(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomize_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Arbitrary values in every parameter and BN statistic, so no IR structure is left."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif "branch_scale" in name or "identity" in name or "prior" in name:
                continue  # keep CBR structure tensors meaningful
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model


def logits(model: nn.Module, x: torch.Tensor, width: str = STUDENT, train: bool = False) -> torch.Tensor:
    """Logits at ``width``; train mode (BN batch statistics, dropout off) runs on a copy of ``model``."""
    probe = copy.deepcopy(model) if train else model
    probe.train(train)
    for module in probe.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    with torch.no_grad(), at_width(probe, width):
        return probe(x)


# ---------------------------------------------------------------------------------------------
# slicing


def plain_from_slices(shared: nn.Module, student: nn.Module, ratio: int) -> nn.Module:
    """The test's own reading of the sharing rule, applied to a fresh plain student.

    Conv (groups 1) / linear: ``W[:out, :in]`` of the shared tensor, times ``ratio`` unless the
    layer is the head; grouped conv: ``W[:out]``; BN: affine ``[:c]`` and the student's statistics.
    """
    plain = copy.deepcopy(student)
    shared_modules = dict(shared.named_modules())
    with torch.no_grad():
        for name, module in plain.named_modules():
            big = shared_modules[name]
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                out = module.weight.shape[0]
                is_head = big.ratio_out == 1
                if isinstance(module, nn.Conv2d) and module.groups > 1:
                    module.weight.copy_(big.weight[:out])
                    if module.bias is not None:
                        module.bias.copy_(big.bias[:out])
                else:
                    scale = 1 if is_head else ratio
                    module.weight.copy_(big.weight[:out, : module.weight.shape[1]] * scale)
                    if module.bias is not None:
                        module.bias.copy_(big.bias[:out] * scale)
            elif isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(big.weight[:c])
                module.bias.copy_(big.bias[:c])
                module.running_mean.copy_(big.student_running_mean)
                module.running_var.copy_(big.student_running_var)
    return plain


@pytest.mark.parametrize(
    "build", [resnet8, small_mobilenet_v2, GroupedNet], ids=["resnet8", "mobilenet_v2", "grouped"]
)
def test_student_forward_equals_plain_student_from_sliced_weights(build):
    torch.manual_seed(0)
    student = build() if build is GroupedNet else build(num_classes=10)
    shared = randomize_(widen(student, 2, cbr=False))
    plain = plain_from_slices(shared, student, 2)
    x = torch.randn(4, 3, 16, 16)
    for train in (False, True):
        expected = logits(plain, x, train=train)
        got = logits(shared, x, STUDENT, train=train)
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), (got - expected).abs().max()


def test_student_uses_only_the_leading_slices():
    torch.manual_seed(0)
    student = resnet8x4(num_classes=10)
    shared = widen(student, 2, cbr=False)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    before = logits(shared, x, train=True)
    reference = student.state_dict()
    leading = {
        name: tuple(slice(0, n) for n in reference[name].shape) for name, _ in shared.named_parameters()
    }
    with torch.no_grad():  # rewrite everything outside the student's slices
        for name, p in shared.named_parameters():
            keep = p[leading[name]].clone()
            p.normal_()
            p[leading[name]] = keep
    assert torch.equal(logits(shared, x, train=True), before)

    shared.train()
    F.cross_entropy(shared(x), y).backward()  # starts at STUDENT width
    for name, p in shared.named_parameters():
        outside = p.grad.clone()
        outside[leading[name]] = 0
        assert outside.abs().max() == 0, name
    shared.zero_grad()
    with at_width(shared, DYNAMIC_TEACHER):
        F.cross_entropy(shared(x), y).backward()
    conv = shared.layer1[0].conv1.weight
    outside = conv.grad.clone()
    outside[leading["layer1.0.conv1.weight"]] = 0
    assert outside.abs().max() > 0  # the dynamic teacher trains the whole tensor


def test_batchnorm_keeps_statistics_per_width():
    torch.manual_seed(0)
    shared = widen(resnet8(num_classes=10), 2, cbr=False).train()
    bn = shared.bn1
    assert isinstance(bn, SlicedBatchNorm2d)
    x = torch.randn(4, 3, 16, 16)
    teacher_stats = bn.running_mean.clone()
    with torch.no_grad(), at_width(shared, STUDENT):
        shared(x)
    assert torch.equal(bn.running_mean, teacher_stats)
    student_stats = bn.student_running_mean.clone()
    assert not torch.equal(student_stats, torch.zeros_like(student_stats))
    with torch.no_grad(), at_width(shared, DYNAMIC_TEACHER):
        shared(x)
    assert torch.equal(bn.student_running_mean, student_stats)
    assert not torch.equal(bn.running_mean, teacher_stats)
    # the teacher's statistics are those of the student's pre-activations (replicated)
    assert torch.allclose(bn.running_mean, student_stats.repeat(2), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# inverse reparameterization


@pytest.mark.parametrize(
    "build, cbr",
    [
        (resnet8, True),
        (resnet8x4, False),
        (small_mobilenet_v2, True),
        (small_bottleneck_resnet, True),
        (GroupedNet, True),
    ],
    ids=["resnet8-cbr", "resnet8x4", "mobilenet_v2-cbr", "bottleneck-cbr", "grouped-cbr"],
)
def test_fresh_dynamic_teacher_computes_the_student(build, cbr):
    """Without noise IR is exact up to rounding (float64: 1e-9 relative; float32 rounding, amplified
    by BN over tiny batches, reaches ~1e-4). With the released noise the gap stays below 1e-2
    (largest here: ~8e-3 for the 0.25-wide MobileNetV2, 16 px, batch 8)."""
    torch.manual_seed(0)
    student = build() if build is GroupedNet else build(num_classes=10)
    x = torch.randn(8, 3, 16, 16)
    exact = widen(student.double(), 2, cbr=cbr, noise_std=0.0)
    assert gpd_ratio(exact) == 2
    for train in (True, False):
        s, t = logits(exact, x.double(), STUDENT, train), logits(exact, x.double(), DYNAMIC_TEACHER, train)
        assert torch.allclose(t, s, rtol=0, atol=1e-9 * s.abs().max().item()), (t - s).abs().max()
    # released noise (N(0, 1e-6) on the replicas), float32: the gap stays small relative to the logits
    gap, scale = ir_gap(widen(student.float(), 2, cbr=cbr), x)
    assert gap < 1e-2 * scale, (gap, scale)


def test_ir_with_ratio_three_and_single_branch_init_keeps_a_pretrained_student():
    torch.manual_seed(0)
    student = randomize_(resnet8(num_classes=10))  # stands for a trained student
    x = torch.randn(4, 3, 16, 16)
    shared = widen(student, 3, cbr=True, cbr_init="single", noise_std=0.0)
    for train in (False, True):
        original = logits(student, x, train=train)
        assert torch.allclose(logits(shared, x, STUDENT, train), original, atol=1e-5)
        assert torch.allclose(logits(shared, x, DYNAMIC_TEACHER, train), original, rtol=1e-4, atol=1e-4)


def test_widen_rejects_what_it_cannot_slice():
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):  # channel concat: the student's slice is not the leading block
            x = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
            return self.fc(x.mean((2, 3)))

    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match="differ"):
        widen(Concat(), 2, stem=["a", "b"], example_input=x)
    widen(resnet8(num_classes=10), 2, example_input=x)  # a sliceable model passes the same check
    with pytest.raises(ValueError, match="SiLU"):
        widen(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 36, 2)))
    with pytest.raises(ValueError, match="LayerNorm"):  # only a channel (1-D) LayerNorm widens
        widen(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(), nn.Linear(4 * 36, 2)))
    with pytest.raises(ValueError, match="PReLU"):
        widen(nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="ratio"):
        widen(resnet8(), 0)
    with pytest.raises(ValueError, match="stem"):
        widen(resnet8(), 2, stem=["nope"])


# ---------------------------------------------------------------------------------------------
# channel-branch reparameterization


def branches_as_ops(x: torch.Tensor, p: dict, groups: int, stride: int, pad: int) -> torch.Tensor:
    """The six CBR branches run as the sequences of ops they stand for (no kernel algebra)."""
    co, ci = p["weight_origin"].shape[0], x.shape[1]
    k = p["weight_origin"].shape[-1]
    s = p["branch_scale"]

    def scaled(i, y):
        return y * s[i].view(1, -1, 1, 1)

    def conv(y, w, **kw):
        return F.conv2d(y, w, **kw)

    out = scaled(0, conv(x, p["weight_origin"], stride=stride, padding=pad, groups=groups))
    y = conv(x, p["weight_avg"][:, :, None, None], groups=groups)
    out = out + scaled(1, F.avg_pool2d(y, k, stride=stride, padding=pad, count_include_pad=True))
    y = conv(x, p["weight_prior_1x1"][:, :, None, None], groups=groups)
    out = out + scaled(2, conv(y, p["prior"][:, None], stride=stride, padding=pad, groups=co))
    y = conv(x, (p["weight_id_residual"] + p["identity"])[:, :, None, None], groups=groups)
    out = out + scaled(3, conv(y, p["weight_kxk_after_1x1"], stride=stride, padding=pad, groups=groups))
    out = out + scaled(4, conv(x, p["weight_kxk"], stride=stride, padding=pad, groups=groups))
    y = conv(x, p["weight_dw"][:, None], stride=stride, padding=pad, groups=ci)
    out = out + scaled(5, conv(y, p["weight_pw"][:, :, None, None], groups=groups))
    return out if p["bias"] is None else out + p["bias"].view(1, -1, 1, 1)


@pytest.mark.parametrize(
    "cin, cout, groups, stride",
    [(6, 10, 1, 1), (8, 8, 8, 1), (8, 12, 4, 1), (6, 6, 1, 2)],
    ids=["dense", "depthwise", "grouped", "stride2"],
)
def test_cbr_folded_kernel_equals_its_branches(cin, cout, groups, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=True)
    layer = randomize_(BranchConv2d(conv, 2, 2, init="multi"))
    with torch.no_grad():
        layer.branch_scale.uniform_(-1, 1)  # every branch active
    for width, channels in ((STUDENT, cin), (DYNAMIC_TEACHER, 2 * cin)):
        x = torch.randn(3, channels, 9, 9)
        weight, bias = layer.fold(width)
        folded = F.conv2d(
            x,
            weight,
            bias,
            stride=stride,
            padding=1,
            groups=groups if width == STUDENT else 2 * groups if groups > 1 else 1,
        )
        multi = branches_as_ops(
            x,
            layer.branch_tensors(width),
            groups if width == STUDENT else (2 * groups if groups > 1 else 1),
            stride,
            1,
        )
        assert torch.allclose(folded, multi, rtol=1e-5, atol=1e-5), (width, (folded - multi).abs().max())
        layer.width = width
        forward = layer(x)
        if width == STUDENT or groups == 1:
            assert torch.allclose(forward, folded, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize(
    "build, cbr",
    [(resnet8, True), (resnet18, False), (small_mobilenet_v2, True), (small_bottleneck_resnet, True)],
    ids=[
        "cifar-resnet8-cbr",
        "torchvision-resnet18",
        "torchvision-mobilenet_v2-cbr",
        "torchvision-bottleneck-cbr",
    ],
)
def test_export_loads_into_the_ordinary_class_and_gives_the_same_logits(build, cbr):
    torch.manual_seed(0)
    student = build(num_classes=10)
    shared = randomize_(widen(student, 2, cbr=cbr))
    x = torch.randn(2, 3, 32, 32)
    plain = export(shared)
    assert not any(isinstance(m, (BranchConv2d, SlicedBatchNorm2d)) for m in plain.modules())
    fresh = build(num_classes=10)
    fresh.load_state_dict(plain.state_dict())  # strict: same keys and shapes as the ordinary class
    for train in (False, True):
        expected = logits(shared, x, STUDENT, train=train)
        got = logits(fresh, x, train=train)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()), (
            (got - expected).abs().max()
        )
    set_width(shared, DYNAMIC_TEACHER)
    assert torch.equal(logits(export(shared), x), logits(fresh, x))  # export is always the student


def test_soft_target_loss_is_label_smoothed_cross_entropy_to_the_dynamic_teacher():
    torch.manual_seed(0)
    zs = torch.randn(5, 7, requires_grad=True)
    zt = torch.randn(5, 7, requires_grad=True)
    loss = gpd_soft_target_loss(zs, zt)
    p = torch.softmax(zt, 1)
    expected = 0.9 * F.cross_entropy(zs, p.detach()) + 0.1 * F.cross_entropy(zs, torch.full_like(p, 1 / 7))
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert zt.grad is None and zs.grad is not None  # the dynamic teacher gets no gradient from this term


def test_export_leaves_the_global_random_streams_alone():
    """A trainer exports the student at every checkpoint: the plain layers' random init must not
    move the training RNG (else a resumed run draws different augmentations)."""
    shared = widen(resnet8(num_classes=10), 2)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    export(shared)
    assert torch.equal(torch.rand(4), expected)
