"""GSNRMeter against a direct numpy computation."""

import numpy as np
import pytest
import torch

from deepkd_det.core.gsnr import GSNRMeter
from deepkd_det.core.optim import DeepKDOptimizer

EPS = 1e-12


def _numpy_gsnr(samples, ddof=0):
    """samples: list over layers of arrays (M, *shape) -> per-layer means, overall mean."""
    per_layer, all_values = [], []
    for arr in samples:
        arr = np.asarray(arr, dtype=np.float64).reshape(arr.shape[0], -1)
        ratio = arr.mean(axis=0) ** 2 / (arr.var(axis=0, ddof=ddof) + EPS)
        per_layer.append(ratio.mean())
        all_values.append(ratio)
    return per_layer, np.concatenate(all_values).mean()


def _params():
    return [
        ("conv.weight", torch.nn.Parameter(torch.zeros(4, 3))),
        ("conv.bias", torch.nn.Parameter(torch.zeros(4))),
        ("dead", torch.nn.Parameter(torch.zeros(2))),  # zero gradient: var = 0 and mean = 0
        ("constant", torch.nn.Parameter(torch.zeros(3))),  # constant gradient: var = 0
    ]


@pytest.mark.parametrize("unbiased", [False, True])
def test_gsnr_matches_numpy_and_ignores_inactive_iterations(unbiased):
    named = _params()
    window, period = 4, 7
    meter = GSNRMeter(named, window=window, period=period, eps=EPS, unbiased=unbiased)
    rng = np.random.default_rng(0)
    recorded = {c: [[] for _ in named] for c in ("tog", "ncg")}
    results = {}
    for it in range(period + window):
        active = meter.begin(it)
        assert active == (it % period < window)
        for c, offset in (("tog", 0.3), ("ncg", -1.0)):
            grads = [
                torch.from_numpy(rng.normal(offset, 1.0, size=(4, 3)).astype(np.float32)),
                torch.from_numpy(rng.normal(offset, 0.1, size=(4,)).astype(np.float32)),
                torch.zeros(2),
                torch.full((3,), 0.5),
            ]
            meter.gradient_hook(c, [p for _, p in named], grads)
            if active and it < window:  # the first window is the one checked
                for k, g in enumerate(grads):
                    recorded[c][k].append(g.numpy())
        out = meter.end()
        if it % period == window - 1:
            assert out is not None
            results[it] = (out, meter.per_layer)
        else:
            assert out is None
    assert set(results) == {window - 1, period + window - 1}
    scalars, per_layer = results[window - 1]
    for c in ("tog", "ncg"):
        layers, overall = _numpy_gsnr([np.stack(x) for x in recorded[c]], ddof=1 if unbiased else 0)
        assert scalars[f"gsnr/{c}"] == pytest.approx(overall, rel=1e-9)
        for (name, _), value in zip(named, layers):
            assert per_layer[f"gsnr/{c}"][name] == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert per_layer[f"gsnr/{c}"]["dead"] == 0.0
        assert per_layer[f"gsnr/{c}"]["constant"] == pytest.approx(0.25 / EPS)
    # different data in the second window gives a different value (the meter really resets)
    assert results[period + window - 1][0]["gsnr/tog"] != scalars["gsnr/tog"]


def test_bsnr_of_momentum_buffers_matches_numpy():
    named = _params()[:2]
    params = [p for _, p in named]
    opt = DeepKDOptimizer(params, lr=0.01)
    meter = GSNRMeter(named, window=5, period=5, eps=EPS)
    gen = torch.Generator().manual_seed(2)
    snapshots = {c: [[] for _ in params] for c in opt.components}
    out = None
    for it in range(5):
        meter.begin(it)
        for c in opt.components:
            grads = [torch.randn(p.shape, generator=gen) + 1.0 for p in params]
            meter.gradient_hook(c, params, grads)
            opt.fold(c, grads)
        opt.step()
        meter.observe_buffers(opt)
        for c in opt.components:
            for k, p in enumerate(params):
                snapshots[c][k].append(opt.momentum_buffer(p, c).numpy())
        out = meter.end()
    assert out is not None and set(out) == {f"{k}/{c}" for k in ("gsnr", "bsnr") for c in opt.components}
    for c in opt.components:
        layers, overall = _numpy_gsnr([np.stack(x) for x in snapshots[c]])
        assert out[f"bsnr/{c}"] == pytest.approx(overall, rel=1e-9)
        assert meter.per_layer[f"bsnr/{c}"]["conv.bias"] == pytest.approx(layers[1], rel=1e-9)
    # momentum averages noise away: buffers have a higher SNR than the raw gradients
    assert out["bsnr/tog"] > out["gsnr/tog"]


def test_bad_meter_arguments():
    with pytest.raises(ValueError, match="window"):
        GSNRMeter(_params(), window=1)
    with pytest.raises(ValueError, match="period"):
        GSNRMeter(_params(), window=10, period=5)
