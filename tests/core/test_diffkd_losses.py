"""DiffKD's KD-loss options: attention-weighted MSE and binary KL, against hand re-computations in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepkd_det.core.dense_kd import binary_kl
from deepkd_det.core.diffkd import DiffKD, attention_weighted_mse, diffkd_kd_loss, feature_attention

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _attention_mse_by_hand(s, t, tau):
    """Loops over every element, softmaxes written out with math.exp (float64)."""
    n, c, h, w = t.shape
    total = 0.0
    for i in range(n):
        g_sp = [[sum(abs(float(t[i, k, y, x])) for k in range(c)) / c for x in range(w)] for y in range(h)]
        g_ch = [sum(abs(float(t[i, k, y, x])) for y in range(h) for x in range(w)) / (h * w) for k in range(c)]
        z_sp = sum(math.exp(v / tau) for row in g_sp for v in row)
        z_ch = sum(math.exp(v / tau) for v in g_ch)
        for k in range(c):
            a_c = c * math.exp(g_ch[k] / tau) / z_ch
            for y in range(h):
                for x in range(w):
                    a_s = h * w * math.exp(g_sp[y][x] / tau) / z_sp
                    total += a_s * a_c * (float(s[i, k, y, x]) - float(t[i, k, y, x])) ** 2
    return total / (n * c * h * w)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_attention_weighted_mse_matches_a_hand_computation(tau):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64) * 2
    got = attention_weighted_mse(s, t, tau)
    assert got.item() == pytest.approx(_attention_mse_by_hand(s, t, tau), rel=1e-12)
    assert got.item() != pytest.approx(F.mse_loss(s, t).item(), rel=1e-3)  # the weights do something


def test_attention_averages_one_and_uniform_attention_is_plain_mse():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    spatial, channel = feature_attention(t)
    assert spatial.shape == (2, 1, 3, 5) and channel.shape == (2, 4, 1, 1)
    assert torch.allclose(spatial.mean(dim=(1, 2, 3)), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(channel.mean(dim=(1, 2, 3)), torch.ones(2, dtype=torch.float64))
    # |teacher| constant: every weight is 1 and the loss is exactly the MSE
    signs = torch.randint(0, 2, t.shape, generator=g).double() * 2 - 1
    flat = 0.7 * signs
    s = torch.randn(t.shape, generator=g, dtype=torch.float64)
    assert attention_weighted_mse(s, flat).item() == pytest.approx(F.mse_loss(s, flat).item(), rel=1e-14)


def test_attention_weighted_mse_gradient_reaches_the_student_only():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    attention_weighted_mse(s, t).backward()
    spatial, channel = feature_attention(t.detach())
    expected = 2 * spatial * channel * (s.detach() - t.detach()) / s.numel()
    assert torch.allclose(s.grad, expected, rtol=1e-12)
    assert t.grad is None


def _pair(kd_loss, **kw):
    torch.manual_seed(3)
    plain = DiffKD(3, 4, kind="feature", inference_steps=2, num_train_timesteps=20)
    torch.manual_seed(3)
    other = DiffKD(3, 4, kind="feature", inference_steps=2, num_train_timesteps=20, kd_loss=kd_loss, **kw)
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_diffkd_attention_option_changes_only_the_kd_loss():
    plain, att = _pair("attention_mse", attention_temperature=0.5)
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 4, 5, generator=g)
    t = torch.randn(2, 4, 4, 5, generator=g)
    a = plain(s, t, generator=torch.Generator().manual_seed(5))
    b = att(s, t, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.denoised, b.denoised) and torch.equal(a.losses["diff"], b.losses["diff"])
    assert a.losses["kd"].item() == pytest.approx(F.mse_loss(a.denoised, a.target).item(), rel=1e-6)
    by_hand = _attention_mse_by_hand(b.denoised.detach().double(), b.target.double(), 0.5)
    assert b.losses["kd"].item() == pytest.approx(by_hand, rel=1e-5)
    b.losses["kd"].backward()
    assert att.student_proj.weight.grad is not None


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_diffkd_binary_kl_option_for_maps_of_sigmoid_logits(T):
    plain, bkl = _pair("bkl", temperature=T)
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 3, 3, 3, generator=g)
    t = torch.randn(2, 4, 3, 3, generator=g) * 3
    out = bkl(s, t, generator=torch.Generator().manual_seed(7))
    d, z = out.denoised.detach().double(), out.target.double()
    p, q = torch.sigmoid(z / T), torch.sigmoid(d / T)
    by_hand = (T * T * (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log())).mean()
    assert out.losses["kd"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert diffkd_kd_loss(out.denoised, out.target, "bkl", T).item() == out.losses["kd"].item()
    assert torch.equal(binary_kl(out.target, out.target, T), torch.zeros_like(out.target))


def test_bad_options():
    with pytest.raises(ValueError, match="attention_mse"):
        DiffKD(4, 4, kind="logits", kd_loss="attention_mse")
    with pytest.raises(ValueError, match="attention_temperature"):
        DiffKD(4, 4, kind="feature", kd_loss="attention_mse", attention_temperature=0.0)
    with pytest.raises(ValueError, match="kd_loss must be one of"):
        DiffKD(4, 4, kind="feature", kd_loss="l1")
    with pytest.raises(ValueError, match="same shape"):
        attention_weighted_mse(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        feature_attention(torch.zeros(2, 3))
