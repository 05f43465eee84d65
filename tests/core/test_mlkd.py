"""MLKD (core.mlkd) against direct computations from its formulas (loops over probabilities)."""

import math

import pytest
import torch

from deepkd_det.core.losses import kd_loss
from deepkd_det.core.mlkd import (
    MLKD_TEMPERATURES,
    batch_correlation_rows,
    class_correlation_rows,
    mlkd_components,
    mlkd_confidence_masks,
    mlkd_loss,
)


def _views(n=7, c=5, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    zs_w, zt_w, zs_s, zt_s = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale for _ in range(4))
    y = torch.randint(0, c, (n,), generator=g)
    return zs_w, zt_w, zs_s, zt_s, y


def _softmax_row(z, T):
    e = [math.exp(float(v) / T) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _ref_kd_rows(zs, zt, T):
    return [T * T * _kl(_softmax_row(zt[i], T), _softmax_row(zs[i], T)) for i in range(zs.shape[0])]


def _ref_parts(zs, zt, y, T, keep=None):
    """TCKD_i, NCKD_i (times T^2) and p_t[y]_i straight from the definitions."""
    tckd, nckd, pty = [], [], []
    for i in range(zs.shape[0]):
        ps, pt, yi = _softmax_row(zs[i], T), _softmax_row(zt[i], T), int(y[i])
        tckd.append(T * T * _kl([pt[yi], 1 - pt[yi]], [ps[yi], 1 - ps[yi]]))
        idx = [j for j in range(len(ps)) if j != yi and (keep is None or j in keep[i])]
        qs = [ps[j] / sum(ps[k] for k in idx) for j in idx]
        qt = [pt[j] / sum(pt[k] for k in idx) for j in idx]
        nckd.append(T * T * _kl(qt, qs))
        pty.append(pt[yi])
    return tckd, nckd, pty


def _ref_batch_corr(zs, zt, T):
    """||G_t - G_s||_F^2 / N with G_ij = sum_c p_ic p_jc, by loops."""
    n = zs.shape[0]
    ps = [_softmax_row(zs[i], T) for i in range(n)]
    pt = [_softmax_row(zt[i], T) for i in range(n)]
    rows = []
    for i in range(n):
        r = 0.0
        for j in range(n):
            gs = sum(a * b for a, b in zip(ps[i], ps[j]))
            gt = sum(a * b for a, b in zip(pt[i], pt[j]))
            r += (gt - gs) ** 2
        rows.append(r / n)
    return rows


def _ref_class_corr(zs, zt, T):
    """||M_t - M_s||_F^2 / C with M_kj = sum_i p_ik p_ij, by loops."""
    n, c = zs.shape
    ps = [_softmax_row(zs[i], T) for i in range(n)]
    pt = [_softmax_row(zt[i], T) for i in range(n)]
    rows = []
    for k in range(c):
        r = 0.0
        for j in range(c):
            ms = sum(ps[i][k] * ps[i][j] for i in range(n))
            mt = sum(pt[i][k] * pt[i][j] for i in range(n))
            r += (mt - ms) ** 2
        rows.append(r / c)
    return rows


def _median(values):
    v = sorted(values)
    m = len(v) // 2
    return v[m] if len(v) % 2 else 0.5 * (v[m - 1] + v[m])


def _ref_masks(zt_w):
    probs = [_softmax_row(zt_w[i], 1.0) for i in range(zt_w.shape[0])]
    conf = [max(p) for p in probs]
    cls = [sum(p[k] for p in probs) for k in range(zt_w.shape[1])]
    return [c <= _median(conf) for c in conf], [a <= _median(cls) for a in cls]


def _gate(rows, keep, mode, mean):
    n = len(rows)
    div = n if mean else 1
    if mode == "none":
        return sum(rows) / div
    if mode == "release":
        return sum(rows) / div * (sum(keep) / n)
    return sum(r for r, k in zip(rows, keep) if k) / div


def test_confidence_masks_are_median_splits():
    for n in (6, 7):  # even and odd batch sizes (interpolated and exact median)
        zs_w, zt_w, *_ = _views(n=n, c=5, seed=n)
        sample_keep, class_keep = mlkd_confidence_masks(zt_w)
        ref_s, ref_c = _ref_masks(zt_w)
        assert sample_keep.tolist() == ref_s and class_keep.tolist() == ref_c
        assert sample_keep.sum() == (n + 1) // 2  # distinct confidences: the lower half, median included


def test_correlation_rows_match_loops():
    zs, zt, *_ = _views(n=6, c=4, seed=3)
    for T in (1.0, 4.0):
        assert torch.allclose(batch_correlation_rows(zs, zt, T), torch.tensor(_ref_batch_corr(zs, zt, T),
                                                                              dtype=torch.float64), atol=1e-12)
        assert torch.allclose(class_correlation_rows(zs, zt, T), torch.tensor(_ref_class_corr(zs, zt, T),
                                                                              dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("mode", ["release", "row", "none"])
def test_plain_mlkd_against_formula(mode):
    zs_w, zt_w, zs_s, zt_s, y = _views(n=7, c=5, seed=11)
    temps = (1.0, 4.0, 6.0)
    out = mlkd_loss(zs_w, zt_w, zs_s, zt_s, y, temperatures=temps, ce_weight=0.3, kd_weight=0.7,
                    confidence_mask=mode)
    keep_s, keep_c = _ref_masks(zt_w)
    kd = bc = cc = 0.0
    for T in temps:
        kd += _gate(_ref_kd_rows(zs_w, zt_w, T), keep_s, mode, mean=True)
        kd += sum(_ref_kd_rows(zs_s, zt_s, T)) / 7
        bc += _gate(_ref_batch_corr(zs_w, zt_w, T), keep_s, mode, mean=False)
        cc += _gate(_ref_class_corr(zs_w, zt_w, T), keep_c, mode, mean=False)
    ce = 0.0
    for z in (zs_w, zs_s):
        ce += sum(-math.log(_softmax_row(z[i], 1.0)[int(y[i])]) for i in range(7)) / 7
    assert out["loss_kd"].item() == pytest.approx(0.7 * kd, abs=1e-10)
    assert out["loss_bc"].item() == pytest.approx(0.7 * bc, abs=1e-12)
    assert out["loss_cc"].item() == pytest.approx(0.7 * cc, abs=1e-12)
    assert out["loss_ce"].item() == pytest.approx(0.3 * ce, abs=1e-10)


def test_masks_change_the_loss_the_right_way():
    zs_w, zt_w, zs_s, zt_s, y = _views(n=8, c=6, seed=5)
    kw = dict(temperatures=(4.0,))
    none = mlkd_loss(zs_w, zt_w, zs_s, zt_s, y, confidence_mask="none", **kw)
    release = mlkd_loss(zs_w, zt_w, zs_s, zt_s, y, confidence_mask="release", **kw)
    strong_kd = 0.9 * kd_loss(zs_s, zt_s, 4.0)
    # Even N with distinct confidences: exactly half the rows/classes kept -> weak terms halved.
    assert release["loss_kd"].item() == pytest.approx(0.5 * (none["loss_kd"] - strong_kd).item()
                                                      + strong_kd.item(), abs=1e-12)
    assert release["loss_bc"].item() == pytest.approx(0.5 * none["loss_bc"].item(), abs=1e-14)
    assert release["loss_cc"].item() == pytest.approx(0.5 * none["loss_cc"].item(), abs=1e-14)
    # Row mode: a masked (confident) sample's student logits do not enter the weak KD term.
    keep, _ = mlkd_confidence_masks(zt_w)
    zs = zs_w.clone().requires_grad_(True)
    mlkd_loss(zs, zt_w, zs_s, zt_s, y, confidence_mask="row", ce_weight=0.0, **kw)["loss_kd"].backward()
    assert torch.all(zs.grad[~keep] == 0) and torch.all(zs.grad[keep].abs().sum(1) > 0)


def test_kd_split_sums_to_plain_instance_term():
    zs_w, zt_w, zs_s, zt_s, y = _views(n=9, c=6, seed=21)
    for mode in ("release", "row", "none"):
        plain = mlkd_loss(zs_w, zt_w, zs_s, zt_s, y, ce_weight=0.5, kd_weight=0.5, confidence_mask=mode)
        parts = mlkd_components(zs_w, zt_w, zs_s, zt_s, y, ce_weight=0.5, kd_weight=0.5, split="kd",
                                confidence_mask=mode)
        assert torch.allclose(parts["tcg"] + parts["ncg"], plain["loss_kd"], atol=1e-10, rtol=0)
        assert torch.allclose(parts["tog"], plain["loss_ce"] + plain["loss_bc"] + plain["loss_cc"],
                              atol=1e-12, rtol=0)


def test_dkd_split_against_formula():
    zs_w, zt_w, zs_s, zt_s, y = _views(n=6, c=5, seed=8)
    temps, alpha, beta, kw, w = (2.0, 5.0), 1.5, 2.0, 0.5, 0.25
    parts = mlkd_components(zs_w, zt_w, zs_s, zt_s, y, temperatures=temps, kd_weight=kw, alpha=alpha,
                            beta=beta, warmup=w, split="dkd", confidence_mask="release")
    keep_s, _ = _ref_masks(zt_w)
    tcg = ncg = 0.0
    for T in temps:
        tw, nw, _ = _ref_parts(zs_w, zt_w, y, T)
        ts, ns, _ = _ref_parts(zs_s, zt_s, y, T)
        tcg += _gate([alpha * v for v in tw], keep_s, "release", True) + alpha * sum(ts) / 6
        ncg += _gate([beta * v for v in nw], keep_s, "release", True) + beta * sum(ns) / 6
    assert parts["tcg"].item() == pytest.approx(w * kw * tcg, abs=1e-10)
    assert parts["ncg"].item() == pytest.approx(w * kw * ncg, abs=1e-10)


def test_topk_mask_on_nckd():
    zs_w, zt_w, zs_s, zt_s, y = _views(n=6, c=6, seed=30)
    args = (zs_w, zt_w, zs_s, zt_s, y)
    args = (*args, (4.0,), 0.5, 0.5, "dkd", 1.0, 2.0)  # temperatures, CE and KD weights, split, alpha, beta
    free = mlkd_components(*args)
    full = mlkd_components(*args, topk=5)  # K = C - 1: nothing removed
    assert torch.equal(free["tcg"], full["tcg"]) and torch.allclose(free["ncg"], full["ncg"], atol=1e-12)
    free = mlkd_components(*args, confidence_mask="none")
    k2 = mlkd_components(*args, topk=2, confidence_mask="none")
    assert torch.equal(k2["tcg"], free["tcg"])  # TCKD is never masked
    assert not torch.allclose(k2["ncg"], free["ncg"])

    def top2(zt):  # the two non-target classes the teacher ranks highest, per row
        return [sorted((j for j in range(6) if j != int(y[i])), key=lambda j: -float(zt[i, j]))[:2]
                for i in range(6)]

    ref = sum(_ref_parts(zs, zt, y, 4.0, keep=top2(zt))[1][i] for zs, zt in ((zs_w, zt_w), (zs_s, zt_s))
              for i in range(6)) / 6
    assert k2["ncg"].item() == pytest.approx(0.5 * 2.0 * ref, abs=1e-10)


def test_gradients_reach_both_student_views_only():
    zs_w, zt_w, zs_s, zt_s, y = _views(n=6, c=5, seed=2)
    zs_w.requires_grad_(True)
    zs_s.requires_grad_(True)
    zt_w.requires_grad_(True)
    parts = mlkd_components(zs_w, zt_w, zs_s, zt_s, y, confidence_mask="none")
    for key in ("tcg", "ncg", "tog"):
        gw, gs = torch.autograd.grad(parts[key], (zs_w, zs_s), retain_graph=True)
        assert gw.abs().sum() > 0 and gs.abs().sum() > 0
    (parts["tcg"] + parts["ncg"] + parts["tog"]).backward()
    assert zt_w.grad is None


def test_float32_and_defaults():
    zs_w, zt_w, zs_s, zt_s, y = (t.float() if t.is_floating_point() else t for t in _views(n=16, c=10, seed=4))
    out = mlkd_loss(zs_w, zt_w, zs_s, zt_s, y)
    assert len(MLKD_TEMPERATURES) == 5 and all(torch.isfinite(v) for v in out.values())


def test_bad_input_is_refused():
    zs_w, zt_w, zs_s, zt_s, y = _views()
    with pytest.raises(ValueError, match="same N x C"):
        mlkd_loss(zs_w, zt_w, zs_s[:, :4], zt_s, y)
    with pytest.raises(ValueError, match="target"):
        mlkd_loss(zs_w, zt_w, zs_s, zt_s, y[:3])
    with pytest.raises(ValueError, match="temperature"):
        mlkd_loss(zs_w, zt_w, zs_s, zt_s, y, temperatures=())
    with pytest.raises(ValueError, match="temperature"):
        mlkd_loss(zs_w, zt_w, zs_s, zt_s, y, temperatures=(4.0, 0.0))
    with pytest.raises(ValueError, match="confidence_mask"):
        mlkd_loss(zs_w, zt_w, zs_s, zt_s, y, confidence_mask="median")
    with pytest.raises(ValueError, match="split"):
        mlkd_components(zs_w, zt_w, zs_s, zt_s, y, split="dot")
