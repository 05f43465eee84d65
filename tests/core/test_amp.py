"""One gradient scaler over the components of the decoupled step: skip on overflow, exact otherwise."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.amp import ComponentGradScaler, amp_dtype, autocast
from deepkd_det.core.optim import DeepKDOptimizer
from deepkd_det.core.step import STRATEGIES, DecoupledStep


class _InfGrad(torch.autograd.Function):
    """Identity whose backward turns the gradient into inf when ``armed``."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf") if _InfGrad.armed else g


def _setup(strategy, merge=False, scale=2.0**10, interval=2000):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = DeepKDOptimizer(net.parameters(), lr=0.1, weight_decay=1e-3, delta_ncg=0.075 if merge else 0.05,
                          merge_equal_momenta=merge)
    scaler = ComponentGradScaler(init_scale=scale, growth_interval=interval)
    return net, opt, DecoupledStep(opt, strategy, scaler=scaler), scaler


def _losses(net, k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    z = net(x)
    p = F.softmax(torch.randn(6, 3, generator=gen, dtype=torch.float64), 1)
    return {"tog": F.cross_entropy(z, y), "tcg": _InfGrad.apply(z).pow(2).mean(),
            "ncg": F.kl_div(F.log_softmax(z, 1), p, reduction="batchmean")}


def _snapshot(net, opt):
    params = [p.detach().clone() for p in net.parameters()]
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for p in net.parameters()}
    return params, state


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("merge", [False, True])
def test_overflow_in_one_component_skips_the_whole_update(strategy, merge):
    net, opt, step, scaler = _setup(strategy, merge)
    for k in range(2):
        step(_losses(net, k))
        opt.step()
    params, state = _snapshot(net, opt)
    _InfGrad.armed = True
    try:
        step(_losses(net, 2))
    finally:
        _InfGrad.armed = False
    opt.step()
    assert step.skipped and scaler.scale == 2.0**9 and scaler.skipped_steps == 1
    for p, before in zip(net.parameters(), params):
        assert torch.equal(p, before)
    for p in net.parameters():
        assert opt.state[p].keys() == state[id(p)].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, state[id(p)][key]) if torch.is_tensor(value) else value == state[id(p)][key]
    step(_losses(net, 3))  # the next clean step updates again
    opt.step()
    assert not step.skipped
    assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), params))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scaled_steps_equal_unscaled_steps_bit_for_bit(strategy):
    # A power-of-two scale multiplies and divides exactly (no overflow, no subnormals here).
    scaled, s_opt, s_step, scaler = _setup(strategy, interval=2)
    plain, p_opt, _, _ = _setup(strategy)
    if strategy == "streaming":
        # With a scaler the gradients are held and folded as whole lists; without one they are
        # folded per tensor, always on our own update: fold the lists on it too, for bit equality.
        s_opt.sgd_kernel = "own"
    p_step = DecoupledStep(p_opt, strategy)
    for k in range(5):
        s_step(_losses(scaled, k))
        s_opt.step()
        p_step(_losses(plain, k))
        p_opt.step()
    for a, b in zip(scaled.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert scaler.scale == 2.0**12 and scaler.clean_steps == 1  # grew twice, at steps 2 and 4
    other = ComponentGradScaler()
    other.load_state_dict(scaler.state_dict())
    assert other.state_dict() == scaler.state_dict()


def test_amp_dtype_names_and_cpu_bf16_autocast():
    assert amp_dtype("bf16") is torch.bfloat16 and amp_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="SOLVER.AMP.DTYPE"):
        amp_dtype("fp8", "SOLVER.AMP.DTYPE")
    layer = nn.Linear(4, 4)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert layer(torch.randn(2, 4)).dtype is torch.bfloat16
    with autocast("cpu", None):
        assert layer(torch.randn(2, 4)).dtype is torch.float32
