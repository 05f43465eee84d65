"""The core on a CUDA GPU: optimizer parity with CPU, fp16 / bf16 decoupled steps (skipped without a GPU)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.amp import ComponentGradScaler, autocast
from deepkd_det.core.optim import DeepKDOptimizer
from deepkd_det.core.step import STRATEGIES, DecoupledStep

pytestmark = pytest.mark.cuda


def _net(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).to(device)


def _losses(net, k, device, dtype=None):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(16, 3, 12, 12, generator=gen).to(device)
    y = torch.randint(0, 10, (16,), generator=gen).to(device)
    zt = torch.randn(16, 10, generator=gen).to(device)
    with autocast(device, dtype):
        z = net(x)
    z = z.float()
    p = F.softmax(zt, 1)
    return {"tog": F.cross_entropy(z, y), "tcg": (F.softmax(z, 1) - p).pow(2).sum(1).mean(),
            "ncg": F.kl_div(F.log_softmax(z, 1), p, reduction="batchmean")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_step_matches_cpu(strategy):
    nets = {d: _net(d) for d in ("cpu", "cuda")}
    opts = {d: DeepKDOptimizer(n.parameters(), lr=0.05, weight_decay=5e-4) for d, n in nets.items()}
    for k in range(4):
        for d in nets:
            DecoupledStep(opts[d], strategy)(_losses(nets[d], k, d))
            opts[d].step()
    for a, b in zip(nets["cpu"].parameters(), nets["cuda"].parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_mixed_precision_decoupled_step_trains(dtype):
    net = _net("cuda")
    opt = DeepKDOptimizer(net.parameters(), lr=0.05, weight_decay=5e-4, delta_ncg=0.075, merge_equal_momenta=True)
    scaler = ComponentGradScaler() if dtype is torch.float16 else None
    step = DecoupledStep(opt, "sequential", scaler=scaler)
    before = [p.detach().clone() for p in net.parameters()]
    first = None
    for k in range(20):
        values = step(_losses(net, k % 4, "cuda", dtype))
        opt.step()
        first = first if first is not None else sum(values.values())
    assert sum(values.values()) < first
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    if scaler is not None:
        assert scaler.scale > 0 and scaler.skipped_steps < 20


def test_cuda_fused_sgd_available():
    p = torch.zeros(4, device="cuda", requires_grad=True)
    p.grad = torch.ones(4, device="cuda")
    torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
    assert torch.allclose(p, torch.full((4,), -0.1, device="cuda"))
