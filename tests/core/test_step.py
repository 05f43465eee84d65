"""DecoupledStep: component gradients equal independent backward passes, for every strategy."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.losses import dkd_components
from deepkd_det.core.optim import DeepKDOptimizer, DOTOptimizer
from deepkd_det.core.step import STRATEGIES, DecoupledStep

NUM_CLASSES = 10


class TinyNet(nn.Module):
    """Conv + BN + linear head, and an auxiliary head that only the task loss uses."""

    def __init__(self, width=6):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, NUM_CLASSES)
        self.aux = nn.Linear(width, 1)

    def forward(self, x):
        feat = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.fc(feat), self.aux(feat)


def _setup(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    student = TinyNet().to(dtype)
    teacher = TinyNet(width=8).to(dtype).eval().requires_grad_(False)
    student.bn.weight.requires_grad_(False)  # a frozen parameter that is in the optimizer
    x = torch.randn(8, 3, 6, 6, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (8,))
    return student, teacher, x, y


def _losses(student, teacher, x, y):
    with torch.no_grad():
        zt, _ = teacher(x)
    zs, aux = student(x)
    tcg, ncg = dkd_components(zs, zt, y, alpha=1.0, beta=2.0, temperature=2.0, topk=4)
    tog = F.cross_entropy(zs, y) + aux.pow(2).mean()
    return {"tog": tog, "tcg": tcg, "ncg": ncg}


def _reference_grads(student, teacher, x, y):
    """Three independent backward passes (fresh forward each), read from .grad."""
    out = {}
    for name in ("tog", "tcg", "ncg"):
        student.zero_grad(set_to_none=True)
        _losses(student, teacher, x, y)[name].backward()
        out[name] = {n: (None if p.grad is None else p.grad.clone()) for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("compat", ["paper", "official"])
def test_component_gradients_and_update_match_independent_backward(strategy, compat):
    student, teacher, x, y = _setup()
    # BN in eval mode so that the three reference forwards are the same function of the weights
    student.eval()
    ref = _reference_grads(student, teacher, x, y)
    names = [n for n, _ in student.named_parameters()]
    assert ref["tcg"]["aux.weight"] is None and ref["tog"]["aux.weight"] is not None

    seen = {}

    def hook(component, params, grads):
        by_id = {id(p): g for p, g in zip(params, grads)}
        seen[component] = {n: by_id.get(id(p)) for n, p in student.named_parameters()}

    opt = DeepKDOptimizer(student.parameters(), lr=0.1, weight_decay=1e-3, compat=compat)
    twin = DeepKDOptimizer([p.detach().clone().requires_grad_(p.requires_grad) for p in student.parameters()],
                           lr=0.1, weight_decay=1e-3, compat=compat)
    step = DecoupledStep(opt, strategy, grad_hook=hook)
    teacher_before = [p.clone() for p in teacher.parameters()]
    frozen_before = student.bn.weight.detach().clone()
    for _ in range(2):  # two steps: buffers exist in the second
        ref = _reference_grads(student, teacher, x, y)
        values = step(_losses(student, teacher, x, y))
        assert set(values) == {"tog", "tcg", "ncg"}
        for c in ("tog", "tcg", "ncg"):
            for n in names:
                if n == "bn.weight":
                    assert seen[c][n] is None  # frozen: never computed
                elif ref[c][n] is None:
                    assert seen[c][n] is None, (c, n)
                else:
                    torch.testing.assert_close(seen[c][n], ref[c][n], rtol=1e-9, atol=1e-12)
            twin.fold(c, [ref[c][n] for n in names])
        opt.step()
        twin.step()
    for p, q in zip(student.parameters(), twin.params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12)
    # frozen parameters untouched: the student's frozen BN weight and the whole teacher
    torch.testing.assert_close(student.bn.weight.detach(), frozen_before, rtol=0, atol=0)
    assert all(opt.momentum_buffer(student.bn.weight, c) is None for c in ("tog", "tcg", "ncg"))
    for p, before in zip(teacher.parameters(), teacher_before):
        assert p.grad is None
        torch.testing.assert_close(p, before, rtol=0, atol=0)
    # the auxiliary head gets no KD gradient, so it has no KD buffers
    assert opt.momentum_buffer(student.aux.weight, "tcg") is None
    assert opt.momentum_buffer(student.aux.weight, "tog") is not None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_before_anything_is_folded(bad):
    student, teacher, x, y = _setup()
    opt = DeepKDOptimizer(student.parameters(), lr=0.1)
    before = [p.detach().clone() for p in student.parameters()]
    losses = _losses(student, teacher, x, y)
    losses["ncg"] = losses["ncg"] * bad
    with pytest.raises(FloatingPointError, match=r"ncg=(nan|inf)"):
        DecoupledStep(opt)(losses)
    opt.step()  # nothing pending: a no-op
    opt.state_dict()  # would raise if a fold were half done
    for p, b in zip(student.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


def test_bad_arguments():
    student, teacher, x, y = _setup()
    opt = DeepKDOptimizer(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="strategy"):
        DecoupledStep(opt, "threads")
    with pytest.raises(TypeError, match="decoupled-momentum optimizer"):
        DecoupledStep(torch.optim.SGD(student.parameters(), lr=0.1))
    losses = _losses(student, teacher, x, y)
    with pytest.raises(ValueError, match="not components"):
        DecoupledStep(opt)({"kd": losses["tcg"]})
    with pytest.raises(ValueError, match="scalar"):
        DecoupledStep(opt)({"tog": torch.ones(3, requires_grad=True)})


class _ItemInBackward(torch.autograd.Function):
    """Identity whose backward calls .item(), which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        scale = 1.0 if grad.sum().item() < float("inf") else 0.0
        return grad * scale


def test_batched_falls_back_with_a_clear_warning():
    student, teacher, x, y = _setup()
    ref = _reference_grads(student, teacher, x, y)
    opt = DeepKDOptimizer(student.parameters(), lr=0.1)
    got = {}
    step = DecoupledStep(opt, "batched", grad_hook=lambda c, ps, gs: got.setdefault(c, dict(zip(map(id, ps), gs))))
    losses = _losses(student, teacher, x, y)
    losses = {k: _ItemInBackward.apply(v) for k, v in losses.items()}
    with pytest.warns(RuntimeWarning, match="falling back to strategy 'sequential'"):
        step(losses)
    assert step.strategy == "sequential"
    for n, p in student.named_parameters():
        if ref["tcg"][n] is not None and p.requires_grad:
            torch.testing.assert_close(got["tcg"][id(p)], ref["tcg"][n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dot_through_decoupled_step(strategy):
    student, teacher, x, y = _setup()
    student.eval()
    ref = _reference_grads(student, teacher, x, y)
    opt = DOTOptimizer(student.parameters(), lr=0.1)
    got = {}
    step = DecoupledStep(opt, strategy, grad_hook=lambda c, ps, gs: got.setdefault(c, dict(zip(map(id, ps), gs))))
    losses = _losses(student, teacher, x, y)
    step(opt.component_losses(**losses))
    opt.step()
    p = student.fc.weight
    torch.testing.assert_close(got["kd"][id(p)], ref["tcg"]["fc.weight"] + ref["ncg"]["fc.weight"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["task"][id(p)], ref["tog"]["fc.weight"], rtol=1e-9, atol=1e-12)


def test_streaming_restores_existing_grad_and_ignores_it():
    student, teacher, x, y = _setup()
    student.eval()
    ref = _reference_grads(student, teacher, x, y)
    student.fc.weight.grad = torch.full_like(student.fc.weight, 7.0)
    opt = DeepKDOptimizer(student.parameters(), lr=0.1)
    got = {}
    step = DecoupledStep(opt, "streaming", grad_hook=lambda c, ps, gs: got.setdefault(c, dict(zip(map(id, ps), gs))))
    step(_losses(student, teacher, x, y))
    torch.testing.assert_close(got["tog"][id(student.fc.weight)], ref["tog"]["fc.weight"], rtol=1e-9, atol=1e-12)
    assert torch.all(student.fc.weight.grad == 7.0)
    assert student.conv.weight.grad is None
