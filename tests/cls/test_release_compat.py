"""DEEPKD.COMPAT official in classification: the released code's losses, mask and DOT, from the configs."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from deepkd_det.cls.config import load_cfg
from deepkd_det.cls.deepkd import build_optimizer
from deepkd_det.cls.distillers import StepContext, build_distiller
from deepkd_det.core.losses import kd_loss
from deepkd_det.core.optim import DOTOptimizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs", "cls", "cifar100")

# KD minimal case (T = 4): released DeepKD-KD gives TCG 0.903652, NCG 0.066565 (no KD_WEIGHT,
# NCG = mean_i(1 - p_t[y]_i) * mean_i NCKD_i); with KD_WEIGHT 0.5 they halve.
KD_ZS = torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 1]])
KD_ZT = torch.tensor([[3.0, 1, 0, 0], [0, 1, 3, 0]])
KD_Y = torch.tensor([0, 2])
# Top-k minimal case (T = 1): NCKD paper K=2 0.462117, K=1 0; release K=2 0, K=1 0.818731.
TK_ZS = torch.tensor([[0.0, 0, 1, 0, 0]])
TK_ZT = torch.tensor([[5.0, 4, 3, 2, 1]])
TK_Y = torch.tensor([0])


def _cfg(path, *opts):
    return load_cfg(os.path.join(CONFIGS, path), list(opts), validate=False)


def _distiller(cfg):
    return build_distiller(cfg, nn.Linear(1, 1), nn.Linear(1, 1))


def _losses(distiller, zs, zt, y, k):
    out = distiller.component_losses(zs, zt, y, StepContext(epoch=1, topk=k))
    return float(out["tcg"]), float(out["ncg"])


def test_deepkd_kd_official_drops_kd_weight_couples_by_batch_and_never_masks():
    paper = _distiller(_cfg("kd/resnet32x4_resnet8x4.yaml"))
    official = _distiller(_cfg("kd/resnet32x4_resnet8x4.yaml", "DEEPKD.COMPAT", "official"))
    assert _losses(official, KD_ZS, KD_ZT, KD_Y, None) == pytest.approx((0.903652, 0.066565), abs=2e-6)
    # The release's KD path never receives its top-k (keyword typo): a K changes nothing.
    assert _losses(official, KD_ZS, KD_ZT, KD_Y, 1) == pytest.approx((0.903652, 0.066565), abs=2e-6)
    # Paper: KD_WEIGHT 0.5, per-row coupling, so TCG + NCG is exactly 0.5 * KD without a mask.
    tcg, ncg = _losses(paper, KD_ZS, KD_ZT, KD_Y, None)
    assert tcg == pytest.approx(0.451826, abs=2e-6)
    assert tcg + ncg == pytest.approx(0.5 * float(kd_loss(KD_ZS, KD_ZT, temperature=4.0)), abs=1e-6)
    assert _losses(paper, KD_ZS, KD_ZT, KD_Y, 1) != pytest.approx((tcg, ncg), abs=1e-4)  # paper masks


@pytest.mark.parametrize("k, paper_nckd, release_nckd", [(2, 0.462117, 0.0), (1, 0.0, 0.818731)])
def test_deepkd_dkd_official_ranks_over_all_classes(k, paper_nckd, release_nckd):
    t1 = ("DKD.T", "1.0")  # the minimal case's temperature
    cfg = _cfg("dkd/resnet32x4_resnet8x4.yaml", *t1)
    weight = min(1 / cfg.DKD.WARMUP, 1.0) * cfg.DKD.BETA  # epoch 1 of the warm-up, times beta
    paper = _distiller(cfg)
    official = _distiller(_cfg("dkd/resnet32x4_resnet8x4.yaml", *t1, "DEEPKD.COMPAT", "official"))
    explicit = _distiller(_cfg("dkd/resnet32x4_resnet8x4.yaml", *t1, "DEEPKD.TOPK.RANK", "all"))
    paper_ranked = _distiller(_cfg("dkd/resnet32x4_resnet8x4.yaml", *t1, "DEEPKD.COMPAT", "official",
                                   "DEEPKD.TOPK.RANK", "nontarget"))
    assert _losses(paper, TK_ZS, TK_ZT, TK_Y, k)[1] == pytest.approx(weight * paper_nckd, abs=1e-6)
    assert _losses(official, TK_ZS, TK_ZT, TK_Y, k)[1] == pytest.approx(weight * release_nckd, abs=1e-6)
    assert _losses(explicit, TK_ZS, TK_ZT, TK_Y, k)[1] == pytest.approx(weight * release_nckd, abs=1e-6)
    assert _losses(paper_ranked, TK_ZS, TK_ZT, TK_Y, k)[1] == pytest.approx(weight * paper_nckd, abs=1e-6)


def test_two_view_methods_follow_the_release_mask():
    crld = _distiller(_cfg("crld/resnet32x4_resnet8x4.yaml", "DEEPKD.COMPAT", "official"))
    mlkd = _distiller(_cfg("mlkd/resnet32x4_resnet8x4.yaml", "DEEPKD.COMPAT", "official"))
    assert (crld.apply_topk, crld.topk_rank) == (True, "all")  # the release passes its K to CRLD
    assert mlkd.apply_topk is False  # ... and none to MLKD
    paper = _distiller(_cfg("mlkd/resnet32x4_resnet8x4.yaml"))
    assert (paper.apply_topk, paper.topk_rank) == (True, "nontarget")
    # CRLD's NCKD with the release ranking, through the distiller: weak/strong views alike.
    zs = (TK_ZS.repeat(2, 1), TK_ZS.repeat(2, 1))
    zt = (TK_ZT.repeat(2, 1) * 3, TK_ZT.repeat(2, 1) * 3)  # confident teacher: every gate open
    y = TK_Y.repeat(2)
    k2 = crld.component_losses(zs, zt, y, StepContext(epoch=100, topk=2))["ncg"]
    assert float(k2) == pytest.approx(0.0, abs=1e-6)  # one class kept in every NCKD term


def test_dot_official_builds_mdistillers_dot_and_the_plain_losses():
    cfg = _cfg("kd/resnet32x4_resnet8x4.yaml", "DEEPKD.COMPAT", "official", "DEEPKD.OPTIMIZER", "dot")
    load_cfg(os.path.join(CONFIGS, "kd/resnet32x4_resnet8x4.yaml"),
             ["DEEPKD.COMPAT", "official", "DEEPKD.OPTIMIZER", "dot"])  # valid (it used to be refused)
    opt = build_optimizer(cfg, nn.Linear(2, 2).parameters(), decoupled=True)
    assert isinstance(opt, DOTOptimizer) and opt.compat == "official"
    # mdistiller's DOT trainer trains the plain KD loss: KD_WEIGHT * KD, never masked.
    kd = _distiller(cfg)
    for k in (None, 1):
        tcg, ncg = _losses(kd, KD_ZS, KD_ZT, KD_Y, k)
        assert tcg + ncg == pytest.approx(0.5 * float(kd_loss(KD_ZS, KD_ZT, temperature=4.0)), abs=1e-6)
    dkd = _distiller(_cfg("dkd/resnet32x4_resnet8x4.yaml", "DEEPKD.COMPAT", "official", "DEEPKD.OPTIMIZER", "dot"))
    assert dkd.apply_topk is False
