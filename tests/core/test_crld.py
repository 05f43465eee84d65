"""CRLD (core.crld) against direct computations from its formulas, thresholds included."""

import math

import pytest
import torch

from deepkd_det.core.crld import (
    CRLD_TAU_STRONG,
    CRLD_TAU_WEAK,
    crld_components,
    crld_confidence_masks,
    crld_loss,
)

C = 10
# Teacher rows with known top probabilities (C = 10):
#   "high": logit 10 on one class  -> p_max = e^10 / (e^10 + 9) ~ 0.9996  (>= 0.9 and >= 0.2)
#   "mid":  logit 2 on one class   -> p_max = e^2 / (e^2 + 9)   ~ 0.451   (< 0.9, >= 0.2)
#   "flat": all logits equal       -> p_max = 0.1                        (< 0.9, < 0.2)
KINDS = {"high": 10.0, "mid": 2.0, "flat": 0.0}


def _teacher(kinds, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(len(kinds), C, dtype=torch.float64)
    for i, kind in enumerate(kinds):
        z[i, int(torch.randint(0, C, (1,), generator=g))] = KINDS[kind]
    return z


WEAK_KINDS = ["high", "mid", "flat", "high", "mid", "flat", "high"]
STRONG_KINDS = ["mid", "flat", "high", "flat", "high", "mid", "mid"]
KEEP_W = [k == "high" for k in WEAK_KINDS]  # >= 0.9
KEEP_S = [k != "flat" for k in STRONG_KINDS]  # >= 0.2


def _views(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(WEAK_KINDS)
    zs_w = torch.randn(n, C, generator=g, dtype=torch.float64) * 2
    zs_s = torch.randn(n, C, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (n,), generator=g)
    return zs_w, _teacher(WEAK_KINDS, seed + 1), zs_s, _teacher(STRONG_KINDS, seed + 2), y


def _softmax_row(z, T):
    e = [math.exp(float(v) / T) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _kd(zs, zt, i, T):
    return T * T * _kl(_softmax_row(zt[i], T), _softmax_row(zs[i], T))


def _parts(zs, zt, y, i, T):
    ps, pt, yi = _softmax_row(zs[i], T), _softmax_row(zt[i], T), int(y[i])
    tckd = T * T * _kl([pt[yi], 1 - pt[yi]], [ps[yi], 1 - ps[yi]])
    idx = [j for j in range(len(ps)) if j != yi]
    qs = [ps[j] / sum(ps[k] for k in idx) for j in idx]
    qt = [pt[j] / sum(pt[k] for k in idx) for j in idx]
    return tckd, T * T * _kl(qt, qs), pt[yi]


def test_thresholds_mask_the_right_rows():
    _, zt_w, _, zt_s, _ = _views()
    keep_w, keep_s = crld_confidence_masks(zt_w, zt_s)
    assert (CRLD_TAU_WEAK, CRLD_TAU_STRONG) == (0.9, 0.2)
    assert keep_w.tolist() == KEEP_W and keep_s.tolist() == KEEP_S
    # Thresholds are inclusive lower bounds on the teacher's top probability.
    keep_w, keep_s = crld_confidence_masks(zt_w, zt_s, tau_weak=0.45, tau_strong=0.0)
    assert keep_w.tolist() == [k != "flat" for k in WEAK_KINDS] and bool(keep_s.all())
    # A flat row's top probability is exactly 1/10 (= the float 0.1): kept at tau = 0.1 (>=, not >).
    _, keep_s = crld_confidence_masks(zt_w, zt_s, tau_strong=0.1)
    assert bool(keep_s.all())
    _, keep_s = crld_confidence_masks(zt_w, zt_s, tau_strong=0.1000001)
    assert keep_s.tolist() == KEEP_S


def test_plain_crld_against_formula():
    zs_w, zt_w, zs_s, zt_s, y = _views(seed=3)
    T, n = 4.0, len(WEAK_KINDS)
    out = crld_loss(zs_w, zt_w, zs_s, zt_s, y, temperature=T)
    wv = sum(_kd(zs_w, zt_w, i, T) + _kd(zs_s, zt_s, i, T) for i in range(n) if KEEP_W[i]) / n
    cv = sum(_kd(zs_s, zt_w, i, T) + _kd(zs_w, zt_s, i, T) for i in range(n) if KEEP_S[i]) / n
    ce = sum(-math.log(_softmax_row(z[i], 1.0)[int(y[i])]) for z in (zs_w, zs_s) for i in range(n)) / n
    assert out["loss_kd_wv"].item() == pytest.approx(2.0 * wv, abs=1e-10)
    assert out["loss_kd_cv"].item() == pytest.approx(0.5 * cv, abs=1e-10)
    assert out["loss_ce"].item() == pytest.approx(1.0 * ce, abs=1e-10)


def test_masked_rows_get_no_gradient():
    zs_w, zt_w, zs_s, zt_s, y = _views(seed=4)
    zs_w.requires_grad_(True)
    zs_s.requires_grad_(True)
    wv = crld_loss(zs_w, zt_w, zs_s, zt_s, y)["loss_kd_wv"]
    gw, gs = torch.autograd.grad(wv, (zs_w, zs_s))
    keep = torch.tensor(KEEP_W)
    for g in (gw, gs):
        assert torch.all(g[~keep] == 0) and torch.all(g[keep].abs().sum(1) > 0)


def test_kd_split_sums_to_plain_kd_terms():
    zs_w, zt_w, zs_s, zt_s, y = _views(seed=5)
    for T in (1.0, 4.0):
        plain = crld_loss(zs_w, zt_w, zs_s, zt_s, y, temperature=T)
        parts = crld_components(zs_w, zt_w, zs_s, zt_s, y, temperature=T, split="kd")
        assert torch.allclose(parts["tcg"] + parts["ncg"], plain["loss_kd_wv"] + plain["loss_kd_cv"],
                              atol=1e-10, rtol=0)
        assert torch.equal(parts["tog"], plain["loss_ce"])


@pytest.mark.parametrize("mode", ["row", "release"])
def test_dkd_split_against_formula(mode):
    zs_w, zt_w, zs_s, zt_s, y = _views(seed=6)
    T, n, alpha, beta, w = 4.0, len(WEAK_KINDS), 1.0, 2.0, 0.5
    parts = crld_components(zs_w, zt_w, zs_s, zt_s, y, temperature=T, split="dkd", alpha=alpha, beta=beta,
                            warmup=w, confidence_mask=mode)
    tcg = ncg = 0.0
    for pairs, keep, weight in ((((zs_w, zt_w), (zs_s, zt_s)), KEEP_W, 2.0),
                                (((zs_s, zt_w), (zs_w, zt_s)), KEEP_S, 0.5)):
        rows = [[_parts(zs, zt, y, i, T) for zs, zt in pairs] for i in range(n)]
        tc = [alpha * sum(p[0] for p in r) for r in rows]
        nc = [beta * sum(p[1] for p in r) for r in rows]
        if mode == "row":
            tcg += weight * sum(v for v, k in zip(tc, keep) if k) / n
            ncg += weight * sum(v for v, k in zip(nc, keep) if k) / n
        else:  # the DeepKD release: batch means times the kept fraction
            tcg += weight * sum(tc) / n * sum(keep) / n
            ncg += weight * sum(nc) / n * sum(keep) / n
    assert parts["tcg"].item() == pytest.approx(w * tcg, abs=1e-10)
    assert parts["ncg"].item() == pytest.approx(w * ncg, abs=1e-10)


def test_topk_full_equals_no_mask_and_leaves_tckd():
    zs_w, zt_w, zs_s, zt_s, y = _views(seed=7)
    # A random teacher so the top-k ranking is not full of ties.
    zt_w = zt_w + 0.3 * torch.randn(zt_w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    args = (zs_w, zt_w, zs_s, zt_s, y)
    free = crld_components(*args)
    full = crld_components(*args, topk=C - 1)
    k3 = crld_components(*args, topk=3)
    assert torch.equal(free["tcg"], full["tcg"]) and torch.allclose(free["ncg"], full["ncg"], atol=1e-12)
    assert torch.equal(k3["tcg"], free["tcg"]) and not torch.allclose(k3["ncg"], free["ncg"])


def test_bad_input_is_refused():
    zs_w, zt_w, zs_s, zt_s, y = _views()
    with pytest.raises(ValueError, match="same N x C"):
        crld_loss(zs_w, zt_w[:3], zs_s, zt_s, y)
    with pytest.raises(ValueError, match="tau_weak"):
        crld_loss(zs_w, zt_w, zs_s, zt_s, y, tau_weak=1.5)
    with pytest.raises(ValueError, match="confidence_mask"):
        crld_components(zs_w, zt_w, zs_s, zt_s, y, confidence_mask="soft")
    with pytest.raises(ValueError, match="split"):
        crld_components(zs_w, zt_w, zs_s, zt_s, y, split="tckd")
