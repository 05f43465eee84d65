"""prepare_teacher / fold_batchnorm: same logits, frozen, eval mode pinned."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from deepkd_det.core.teacher import fold_batchnorm, prepare_teacher


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class SmallResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 16, 2), Block(16, 16, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x, return_features=False):
        feat = F.adaptive_avg_pool2d(self.layer1(F.relu(self.bn1(self.conv1(x)))), 1).flatten(1)
        return (self.fc(feat), feat) if return_features else self.fc(feat)


class PreActUntraceable(nn.Module):
    """BN registered right after a conv but applied to (conv + shortcut): order-based pairing is wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = x + self.conv(x)
        return self.bn(x)


def _randomise_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("build", [SmallResNet, lambda: torchvision.models.resnet18(weights=None, num_classes=10)])
def test_folded_teacher_gives_the_same_logits(build):
    torch.manual_seed(0)
    model = build()
    _randomise_bn(model)
    model.train()  # fold_batchnorm must evaluate the eval-mode function regardless
    x = torch.randn(2, 3, 32, 32)
    folded = fold_batchnorm(model)
    assert _count(folded, nn.BatchNorm2d) == 0
    assert _count(model, nn.BatchNorm2d) > 0 and model.training  # the input is left alone
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-4)


class UntraceableWithBlocks(nn.Module):
    """Untraceable top level (shape-dependent branch) around traceable conv-bn blocks."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.inner = PreActUntraceable()

    def forward(self, x):
        x = self.block(x)
        if x.sum() > -1e9:
            x = x * 2
        return self.inner(x)


def test_untraceable_parts_are_entered_and_never_folded_wrongly():
    torch.manual_seed(0)
    model = UntraceableWithBlocks()
    _randomise_bn(model)
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(RuntimeWarning, match="left unfolded"):
        folded = fold_batchnorm(model, example_input=x)
    assert isinstance(folded.block[1], nn.Identity)  # the traceable block is folded
    assert isinstance(folded.inner.bn, nn.BatchNorm2d)  # the BN applied to (x + conv(x)) is not
    model.eval()
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-4)
    # pairing by registration order is wrong for `inner`; the example input catches it
    with pytest.warns(RuntimeWarning, match="registration order"):
        with pytest.raises(RuntimeError, match="changed the output"):
            fold_batchnorm(model, example_input=x, order_fallback=True)


def test_prepare_teacher_is_frozen_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = SmallResNet()
    _randomise_bn(model)
    x = torch.randn(2, 3, 16, 16)
    teacher = prepare_teacher(model, example_input=x)
    assert all(not p.requires_grad for p in teacher.parameters())
    parent = nn.ModuleDict({"teacher": teacher, "student": SmallResNet()})
    parent.train()
    assert parent["student"].training
    assert not any(m.training for m in teacher.modules())
    logits, feat = teacher(x, return_features=True)  # keyword arguments of forward still work
    assert not logits.requires_grad
    model.eval()
    torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-4)
    fast = prepare_teacher(model, channels_last=True)
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-4)
    unfolded = prepare_teacher(model, fold_bn=False)
    assert unfolded is model and _count(unfolded, nn.BatchNorm2d) == 7


def test_copy_module_sharing_hooks_keeps_recorders_shared_and_copies_weights():
    from deepkd_det.core.teacher import copy_module_sharing_hooks

    class Recorder:  # a bound-method hook holding a non-leaf tensor, which deepcopy refuses
        def __init__(self):
            self.calls, self.held = 0, nn.Linear(2, 2)(torch.ones(1, 2))

        def hook(self, m, args, out):
            self.calls += 1

    net = nn.Sequential(nn.Linear(2, 2))
    rec = Recorder()
    net[0].register_forward_hook(rec.hook)
    copy = copy_module_sharing_hooks(net)
    copy(torch.ones(1, 2))
    assert rec.calls == 1  # the original's recorder saw the copy's forward
    assert copy[0].weight is not net[0].weight and torch.equal(copy[0].weight, net[0].weight)
