"""Per-pixel KD / DKD / DeepKD: the decomposition per pixel, ignored pixels, the top-k mask, DiffKD on maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepkd_det.core.losses import kd_parts
from deepkd_det.seg.losses import (
    IGNORE_LABEL,
    pixel_cross_entropy,
    pixel_dkd_components,
    pixel_kd_components,
    pixel_kd_loss,
    pixel_rows,
)


def _maps(seed=0, n=2, c=5, h=6, w=7, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n, h, w), generator=g)
    y[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE_LABEL
    return zs, zt, y


def test_tckd_plus_weighted_nckd_is_kl_at_every_pixel():
    zs, zt, y = _maps()
    T = 2.0
    # Independent per-pixel KL over the channel dimension, on the maps themselves.
    kl_map = (F.softmax(zt / T, 1) * (F.log_softmax(zt / T, 1) - F.log_softmax(zs / T, 1))).sum(1) * T * T
    valid = y != IGNORE_LABEL
    rows_s, rows_t, rows_y = pixel_rows(zs, zt, y)
    parts = kd_parts(rows_s, rows_t, rows_y, temperature=T, reduction="none")
    per_pixel = parts.tckd + (1 - parts.teacher_target_prob) * parts.nckd
    assert per_pixel.shape[0] == int(valid.sum()) > 0
    torch.testing.assert_close(per_pixel, kl_map[valid], atol=1e-10, rtol=1e-10)
    tcg, ncg = pixel_kd_components(zs, zt, y, temperature=T, weight=0.7)
    torch.testing.assert_close(tcg + ncg, 0.7 * kl_map[valid].mean(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(pixel_kd_loss(zs, zt, y, T), kl_map[valid].mean(), atol=1e-10, rtol=1e-10)


def test_dkd_per_pixel_against_binary_and_non_target_kl():
    zs, zt, y = _maps(1)
    valid = y != IGNORE_LABEL
    ps, pt = F.softmax(zs, 1), F.softmax(zt, 1)
    yy = y.clamp(max=zs.shape[1] - 1)
    onehot = F.one_hot(yy, zs.shape[1]).permute(0, 3, 1, 2).bool()
    bs, bt = (ps * onehot).sum(1), (pt * onehot).sum(1)
    tckd = bt * (bt / bs).log() + (1 - bt) * ((1 - bt) / (1 - bs)).log()
    qs = F.softmax(zs.masked_fill(onehot, -1e9), 1)
    qt = F.softmax(zt.masked_fill(onehot, -1e9), 1)
    nckd = (qt * (qt.clamp_min(1e-300).log() - qs.clamp_min(1e-300).log())).masked_fill(onehot, 0).sum(1)
    a, b = pixel_dkd_components(zs, zt, y, alpha=1.5, beta=3.0, warmup=0.5)
    torch.testing.assert_close(a, 0.5 * 1.5 * tckd[valid].mean(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(b, 0.5 * 3.0 * nckd[valid].mean(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("topk", [None, 2])
def test_ignored_pixels_change_nothing(topk):
    zs, zt, y = _maps(2)
    ignored = (y == IGNORE_LABEL)[:, None].expand_as(zs)
    zs2 = torch.where(ignored, torch.full_like(zs, 50.0), zs).requires_grad_(True)
    zt2 = torch.where(ignored, torch.full_like(zt, -50.0), zt)
    zs = zs.clone().requires_grad_(True)
    for fn in (lambda a, b: pixel_kd_components(a, b, y, 2.0, topk=topk),
               lambda a, b: pixel_dkd_components(a, b, y, 1.0, 2.0, topk=topk),
               lambda a, b: (pixel_cross_entropy(a, y), pixel_kd_loss(a, b, y))):
        out1, out2 = fn(zs, zt), fn(zs2, zt2)
        for u, v in zip(out1, out2):
            torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-12)
        g = torch.autograd.grad(sum(out2), zs2)[0]
        assert float(g[ignored].abs().max()) == 0.0 and float(g[~ignored].abs().max()) > 0


def test_topk_mask_per_pixel():
    zs, zt, y = _maps(3, c=6)
    full = pixel_kd_components(zs, zt, y, topk=None)
    torch.testing.assert_close(pixel_kd_components(zs, zt, y, topk=5), full)  # K = C - 1 keeps all
    masked = pixel_kd_components(zs, zt, y, topk=2)
    torch.testing.assert_close(masked[0], full[0])  # TCKD is never masked
    assert abs(float(masked[1] - full[1])) > 1e-6
    # Per pixel, the mask keeps the teacher's two highest non-target classes.
    rows_s, rows_t, rows_y = pixel_rows(zs, zt, y)
    i = 0
    order = [int(c) for c in rows_t[i].argsort(descending=True) if int(c) != int(rows_y[i])][:2]
    qt = F.softmax(rows_t[i, order], 0)
    qs = F.softmax(rows_s[i, order], 0)
    expect = float((qt * (qt / qs).log()).sum())
    got = kd_parts(rows_s[:1], rows_t[:1], rows_y[:1], topk=2, reduction="none").nckd
    assert float(got[0]) == pytest.approx(expect, rel=1e-9)


def test_a_batch_without_valid_pixels_gives_zero_losses_with_graph():
    zs, zt, y = _maps(4)
    y[:] = IGNORE_LABEL
    zs.requires_grad_(True)
    for loss in (*pixel_kd_components(zs, zt, y), *pixel_dkd_components(zs, zt, y), pixel_cross_entropy(zs, y)):
        assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_bad_shapes_are_one_error():
    zs, zt, y = _maps(5)
    with pytest.raises(ValueError, match="labels must have shape"):
        pixel_rows(zs, zt, y[:, :-1])
    with pytest.raises(ValueError, match="N x C x H x W"):
        pixel_rows(zs, zt[:, :-1], y)


def _ddim_by_hand(denoiser, x, steps=5, train_steps=1000):
    """DDIM (eta 0) written out from the formulas: linear betas 1e-4..0.02, second half of 2*steps."""
    betas = np.linspace(1e-4, 0.02, train_steps, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    stride = train_steps // (2 * steps)
    for t in [k * stride for k in range(steps - 1, -1, -1)]:
        eps = denoiser(x, torch.tensor(t))
        a_t = float(abar[t])
        a_prev = float(abar[t - stride]) if t - stride >= 0 else 1.0
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def test_diffkd_on_maps_matches_an_independent_computation():
    from deepkd_det.core.diffkd import DiffKD
    from deepkd_det.seg.config import get_seg_cfg
    from deepkd_det.seg.distill import SegDistiller
    from deepkd_det.seg.models import build_seg_model, upsample

    torch.manual_seed(0)
    c = 4
    student = build_seg_model("tiny", "deeplabv3", c, width=4, head_channels=8, aspp_rates=(1, 2, 3)).eval()
    teacher = build_seg_model("tiny", "pspnet", c, width=4, head_channels=8).eval()
    p = get_seg_cfg().DIFFKD
    p.defrost()
    p.KD_WEIGHT, p.DIFF_WEIGHT = 2.0, 0.5
    dist = SegDistiller(student, teacher, "DIFFKD", p)
    assert isinstance(dist.diffkd, DiffKD) and dist.diffkd.autoencoder is None  # C channels: no autoencoder
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, c, (2, 32, 32))
    y[:, :4] = IGNORE_LABEL
    torch.manual_seed(123)
    logits, losses = dist.forward_train(x, y, topk=None)
    # Independently: same noise draws (start noise, diffusion noise, timesteps, in that order).
    torch.manual_seed(123)
    with torch.no_grad():
        ms, mt = student.forward_maps(x), teacher.forward_maps(x)
        d = dist.diffkd
        zs = d.student_proj(ms)
        gamma = d.noise_adapter(zs)
        start = gamma.view(-1, 1, 1, 1) * zs + (1 - gamma.view(-1, 1, 1, 1)) * torch.randn(zs.shape)
        denoised = d.out_proj(_ddim_by_hand(d.denoiser, start))
        noise = torch.randn(mt.shape)
        t = torch.randint(0, 1000, (mt.shape[0],))
        abar = torch.tensor(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)), dtype=torch.float32)[t].view(-1, 1, 1, 1)
        diff = ((d.denoiser(abar.sqrt() * mt + (1 - abar).sqrt() * noise, t) - noise) ** 2).mean()
        up_s, up_t = upsample(denoised, (32, 32)), upsample(mt, (32, 32))
        kl = (F.softmax(up_t, 1) * (F.log_softmax(up_t, 1) - F.log_softmax(up_s, 1))).sum(1)
        ce = F.cross_entropy(upsample(ms, (32, 32)), y, ignore_index=IGNORE_LABEL)
    torch.testing.assert_close(losses["tcg"] + losses["ncg"], 2.0 * kl[y != IGNORE_LABEL].mean(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(losses["tog"], ce + 0.5 * diff, atol=1e-5, rtol=1e-4)
    assert logits.shape == (2, c, 32, 32)
