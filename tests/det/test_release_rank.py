"""Detection: DEEPKD.COMPAT official implies the released code's top-k ranking (DEEPKD.TOPK.RANK auto)."""

from __future__ import annotations

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import deepkd_det.det.modeling  # noqa: E402,F401  (registers DeepKDRCNN)
from deepkd_det.core.losses import dkd_components, warmup_factor  # noqa: E402
from tests.det.tiny import get_tiny_cfg, make_batch  # noqa: E402


def _model(compat="paper", rank="auto"):
    torch.manual_seed(0)
    cfg = get_tiny_cfg(num_classes=3, kd_type="DKD", deepkd=True)
    cfg.DEEPKD.COMPAT = compat
    cfg.DEEPKD.TOPK.RANK = rank
    cfg.DEEPKD.TOPK.MODE = "constant"
    cfg.DEEPKD.TOPK.K_START = 2  # of 3 non-target classes (background included)
    cfg.KD.WARMUP_ITERS = 0
    return build_model(cfg).train()


@pytest.mark.parametrize("compat, rank, expected", [("paper", "auto", "nontarget"), ("official", "nontarget", "nontarget")])
def test_rank_setting_reaches_the_model(compat, rank, expected):
    cfg = get_tiny_cfg(num_classes=3, kd_type="DKD", deepkd=True)
    cfg.DEEPKD.COMPAT, cfg.DEEPKD.TOPK.RANK = compat, rank
    torch.manual_seed(0)
    assert build_model(cfg).part("logits").topk_rank == expected


def test_official_box_head_losses_use_the_release_ranking():
    model = _model("official")
    assert model.part("logits").topk_rank == "all"
    rec = {}
    handles = [
        model.roi_heads.box_predictor.register_forward_hook(lambda m, a, o: rec.__setitem__("zs", o[0])),
        model.teacher.roi_heads.box_predictor.register_forward_hook(lambda m, a, o: rec.__setitem__("zt", o[0])),
        model.roi_heads.register_forward_hook(
            lambda m, a, o: rec.__setitem__("y", torch.cat([p.gt_classes for p in o[0]]))),
    ]
    try:
        with EventStorage(0):
            losses = model(make_batch(seed=2))
    finally:
        for h in handles:
            h.remove()
    zs, zt, y = rec["zs"].detach(), rec["zt"].detach(), rec["y"]
    part = model.part("logits")
    kw = dict(alpha=part.alpha, beta=part.beta, temperature=part.temperature, warmup=warmup_factor(0, 0), topk=2)
    release = dkd_components(zs, zt, y, topk_rank="all", **kw)
    paper = dkd_components(zs, zt, y, topk_rank="nontarget", **kw)
    torch.testing.assert_close(losses["loss_nckd"].detach(), release[1], rtol=1e-5, atol=1e-7)
    assert abs(float(release[1]) - float(paper[1])) > 1e-4  # the two rankings differ on this batch
