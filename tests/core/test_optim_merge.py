"""Equal momenta share one buffer: the merged update equals the separate-buffer update exactly."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.optim import DeepKDOptimizer, DOTOptimizer
from deepkd_det.core.step import STRATEGIES, DecoupledStep

DEEPKD_KD = dict(momentum=0.9, delta_tog=0.075, delta_tcg=-0.075, delta_ncg=0.075)


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts how often the graph is traversed."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


class Net(nn.Module):
    """Shared trunk; ``task`` only reaches the task loss, ``late`` joins the NCG loss from step 3."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(5, 6)
        self.head = nn.Linear(6, 4)
        self.task = nn.Linear(6, 1)
        self.late = nn.Linear(6, 4)

    def losses(self, x, y, zt, step):
        h = _CountBackward.apply(torch.tanh(self.trunk(x)))
        z = self.head(h)
        tog = F.cross_entropy(z, y) + self.task(h).pow(2).mean()
        ncg_logits = z + self.late(h) if step >= 3 else z
        p_t = F.softmax(zt, 1)
        ncg = F.kl_div(F.log_softmax(ncg_logits, 1), p_t, reduction="batchmean")
        tcg = (F.softmax(z, 1).gather(1, y[:, None]) - p_t.gather(1, y[:, None])).pow(2).mean()
        return {"tog": tog, "tcg": tcg, "ncg": ncg}


def _run(merge, strategy, steps=12, **opt_kwargs):
    torch.manual_seed(0)
    net = Net().double()
    groups = [{"params": [net.trunk.weight, net.trunk.bias, net.head.weight, net.task.weight, net.late.weight]},
              {"params": [net.head.bias, net.task.bias, net.late.bias], "lr": 0.02,
               "weight_decay": 0.0}]
    opt = DeepKDOptimizer(groups, lr=0.05, weight_decay=1e-2, merge_equal_momenta=merge, **{**DEEPKD_KD, **opt_kwargs})
    step = DecoupledStep(opt, strategy)
    gen = torch.Generator().manual_seed(1)
    _CountBackward.calls = 0
    for k in range(steps):
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (8,), generator=gen)
        zt = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        step(net.losses(x, y, zt, k))
        opt.step()
    return net, opt, _CountBackward.calls


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merged_tie_equals_three_buffers(strategy):
    separate, sep_opt, sep_calls = _run(False, strategy)
    merged, opt, calls = _run(True, strategy)
    assert opt.ties == (("tog", "ncg"),) and opt.fold_names == ("tcg", "tog+ncg")
    if strategy != "batched":  # batched traverses the graph once either way
        assert (sep_calls, calls) == (3 * 12, 2 * 12)
    for (name, a), b in zip(separate.named_parameters(), merged.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    for p in separate.parameters():
        q = dict(zip(map(id, separate.parameters()), merged.parameters()))[id(p)]
        parts = [sep_opt.momentum_buffer(p, c) for c in ("tog", "ncg")]
        want = sum(b for b in parts if b is not None)
        torch.testing.assert_close(opt.momentum_buffer(q, "tog+ncg"), want, rtol=1e-10, atol=1e-12)
    # the task-only head is reached by TOG alone, the late layer by NCG alone (and without weight decay)
    assert opt.state[merged.task.weight]["tog+ncg_sources"] == "tog"
    assert opt.state[merged.late.weight]["tog+ncg_sources"] == "ncg"
    assert sep_opt.momentum_buffer(separate.late.weight, "tog") is None


def test_shrinking_membership_is_refused_before_anything_changes():
    opt = DeepKDOptimizer([torch.zeros(3, dtype=torch.float64)], lr=0.1, merge_equal_momenta=True, **DEEPKD_KD)
    (w,) = opt.params
    both, tog_only = [frozenset({"tog", "ncg"})], [frozenset({"tog"})]
    opt.fold("tog+ncg", [torch.ones(3, dtype=torch.float64)], sources=both)
    opt.step()
    before = w.clone(), opt.momentum_buffer(w, "tog+ncg")
    with pytest.raises(RuntimeError, match="reached a parameter in earlier steps"):
        opt.fold("tog+ncg", [torch.ones(3, dtype=torch.float64)], sources=tog_only)
    opt.step()
    assert torch.equal(w, before[0]) and torch.equal(opt.momentum_buffer(w, "tog+ncg"), before[1])
    with pytest.raises(ValueError, match="shares one buffer"):
        opt.fold("tog", [torch.ones(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="needs sources"):
        opt.fold("tog+ncg", [torch.ones(3, dtype=torch.float64)])


def test_late_join_with_dampening_is_refused_and_no_tie_where_it_cannot_hold():
    opt = DeepKDOptimizer([torch.zeros(2)], lr=0.1, dampening=0.1, merge_equal_momenta=True, **DEEPKD_KD)
    opt.fold("tog+ncg", [torch.ones(2)], sources=[frozenset({"tog"})])
    opt.step()
    with pytest.raises(RuntimeError, match="dampening"):
        opt.fold("tog+ncg", [torch.ones(2)], sources=[frozenset({"tog", "ncg"})])
    # official mode, unequal momenta, or merging off: three buffers, as before
    assert DeepKDOptimizer([torch.zeros(1)], lr=0.1, compat="official", merge_equal_momenta=True, **DEEPKD_KD).ties == ()
    assert DeepKDOptimizer([torch.zeros(1)], lr=0.1, merge_equal_momenta=True).ties == ()
    assert DeepKDOptimizer([torch.zeros(1)], lr=0.1, **DEEPKD_KD).ties == ()
    assert DOTOptimizer([torch.zeros(1)], lr=0.1, delta=0.0, merge_equal_momenta=True).ties == (("task", "kd"),)


def test_grad_hook_and_mismatched_checkpoint_are_refused():
    opt = DeepKDOptimizer([torch.zeros(2)], lr=0.1, merge_equal_momenta=True, **DEEPKD_KD)
    with pytest.raises(ValueError, match="grad_hook"):
        DecoupledStep(opt, grad_hook=lambda *a: None)
    opt.fold("tog+ncg", [torch.ones(2)], sources=[frozenset({"tog", "ncg"})])
    opt.step()
    plain = DeepKDOptimizer([torch.zeros(2)], lr=0.1, **DEEPKD_KD)
    with pytest.raises(ValueError, match="MERGE_EQUAL_MOMENTA"):
        plain.load_state_dict(opt.state_dict())


def test_checkpoint_with_old_buffer_key_loads():
    opt = DeepKDOptimizer([torch.zeros(2)], lr=0.1)
    opt.fold("tog", [torch.full((2,), 2.0)])
    opt.step()
    state = opt.state_dict()
    state["state"][0]["tog_buffer"] = state["state"][0].pop("scaled_buffer_tog")
    other = DeepKDOptimizer([torch.zeros(2)], lr=0.1)
    other.load_state_dict(state)
    torch.testing.assert_close(other.momentum_buffer(other.params[0], "tog"), torch.full((2,), 2.0))
