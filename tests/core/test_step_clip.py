"""DecoupledStep's gradient-norm clip: the summed gradient is clipped, the decomposition kept."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.optim import DeepKDOptimizer
from deepkd_det.core.step import STRATEGIES, DecoupledStep


def _losses(model, x, y):
    z = model(x)
    return {"tog": F.cross_entropy(z, y), "tcg": 3.0 * z[:, 0].pow(2).mean(), "ncg": z[:, 1:].exp().mean()}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("clip", [0.05, 1e3])
def test_clip_scales_every_component_like_clip_grad_norm(strategy, clip):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    x, y = torch.randn(16, 6), torch.randint(0, 5, (16,))
    # Reference: one backward of the sum, torch's clip; and the unclipped components.
    reference = {name: torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
                 for name, loss in _losses(model, x, y).items()}
    model.zero_grad()
    sum(_losses(model, x, y).values()).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    clipped_sum = [p.grad.clone() for p in model.parameters()]

    seen = {}
    opt = DeepKDOptimizer(model.parameters(), lr=0.1, momentum=0.9)
    step = DecoupledStep(opt, strategy, clip_norm=clip,
                         grad_hook=lambda name, params, grads: seen.__setitem__(name, grads))
    step(opt.component_losses(**_losses(model, x, y)))
    assert step.last_grad_norm == pytest.approx(float(norm), rel=1e-5)
    coef = min(1.0, clip / (float(norm) + 1e-6))
    for name, grads in seen.items():  # every component scaled by the same factor
        for g, r in zip(grads, reference[name]):
            torch.testing.assert_close(g, coef * r, rtol=1e-5, atol=1e-7)
    for j, expected in enumerate(clipped_sum):
        torch.testing.assert_close(sum(seen[n][j] for n in seen), expected, rtol=1e-5, atol=1e-7)
    if clip < float(norm):
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(sum(seen[n][j] for n in seen))
                                                      for j in range(len(clipped_sum))]))
        assert float(total) == pytest.approx(clip, rel=1e-4)


def test_clip_norm_must_not_be_negative():
    opt = DeepKDOptimizer(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="clip_norm"):
        DecoupledStep(opt, clip_norm=-1.0)
