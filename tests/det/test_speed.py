"""The teacher's cheapest exact forward (FrozenBN folded, channels-last, autocast) and bf16 DeepKD training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.structures import Boxes  # noqa: E402

import train_net  # noqa: E402
from deepkd_det.det.data import generate_shapes_dataset  # noqa: E402
from deepkd_det.det.engine import DeepKDTrainer  # noqa: E402
from deepkd_det.det.modeling.teacher import build_teacher  # noqa: E402
from tests.det.tiny import get_tiny_cfg, make_batch  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "configs" / "DEEPKD" / "demo"


def _teacher(**teacher_opts):
    cfg = get_tiny_cfg()
    for key, value in teacher_opts.items():
        cfg.TEACHER[key] = value
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    # Non-trivial frozen statistics, so that a wrong fold cannot pass.
    gen = torch.Generator().manual_seed(1)
    for m in teacher.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(0.5 + torch.rand(c, generator=gen))
            m.bias.copy_(0.2 * torch.randn(c, generator=gen))
            m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return teacher


def _logits(teacher, seed=0):
    device = teacher.pixel_mean.device
    batch = make_batch(n=2, h=96, w=128, seed=seed)
    images = [b["image"].to(device) for b in batch]
    box = torch.tensor([[4.0, 6.0, 60.0, 70.0], [30.0, 10.0, 120.0, 90.0], [0.0, 0.0, 128.0, 96.0]], device=device)
    boxes = [Boxes(box)] * 2
    feats = teacher.features(images, "BGR")
    return teacher.box_logits(None, "BGR", boxes, features=feats), feats


def test_folded_teacher_gives_the_logits_of_the_original():
    teacher = _teacher()
    keys = set(teacher.state_dict())
    teacher.fold_norm = False
    want, want_feats = _logits(teacher)
    teacher.fold_norm = True
    got, got_feats = _logits(teacher)
    backbone = teacher._fast_module("backbone")
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())  # really folded ...
    assert any(isinstance(m, FrozenBatchNorm2d) for m in teacher.backbone.modules())  # ... in a copy only
    assert set(teacher.state_dict()) == keys
    # float32 rounding of the folded weights: 1e-5 relative to the largest logit
    tol = 1e-5 * (1.0 + want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    for k in want_feats:
        torch.testing.assert_close(got_feats[k], want_feats[k], rtol=0, atol=1e-5 * (1 + want_feats[k].abs().max()))
    # New weights (a checkpoint load) rebuild the folded copy.
    state = {k: v * 1.1 if k.endswith("running_var") else v for k, v in teacher.state_dict().items()}
    teacher.load_state_dict(state)
    again, _ = _logits(teacher)
    teacher.fold_norm = False
    plain, _ = _logits(teacher)
    assert not torch.allclose(again, got)
    torch.testing.assert_close(again, plain, rtol=0, atol=1e-5 * (1.0 + plain.abs().max().item()))


def test_channels_last_and_bf16_teacher_keep_float32_logits():
    reference, _ = _logits(_teacher(FOLD_NORM=False))
    cl, _ = _logits(_teacher(CHANNELS_LAST=True))
    torch.testing.assert_close(cl, reference, rtol=0, atol=1e-5 * (1.0 + reference.abs().max().item()))
    low, feats = _logits(_teacher(AMP_DTYPE="bf16"))
    assert low.dtype is torch.float32 and all(f.dtype is torch.float32 for f in feats.values())
    # bf16 keeps 8 bits of mantissa: a few per cent of the logit range
    assert (low - reference).abs().max() < 0.05 * (1.0 + reference.abs().max()) and not torch.equal(low, reference)


def test_bad_teacher_amp_dtype_is_refused():
    cfg = get_tiny_cfg()
    cfg.TEACHER.AMP_DTYPE = "fp8"
    with pytest.raises(ValueError, match="TEACHER.AMP_DTYPE"):
        from deepkd_det.det.config import validate_deepkd_config

        validate_deepkd_config(cfg)


@pytest.mark.parametrize("config", ["student-deepkd-dkd.yaml"])
def test_bf16_deepkd_detector_trains(tmp_path, config):
    root = str(tmp_path / "shapes")
    generate_shapes_dataset(root, num_train=4, num_val=2, image_size=64, seed=0)
    argv = ["--config-file", str(DEMO / config),
            "OUTPUT_DIR", str(tmp_path / "run"), "DATASETS.SHAPES.ROOT", root, "DATASETS.SHAPES.NUM_TRAIN", "4",
            "DATASETS.SHAPES.NUM_VAL", "2", "DATASETS.SHAPES.IMAGE_SIZE", "64",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "(2,)", "SOLVER.MAX_ITER", "3",
            "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
            "TEACHER.MODEL.WEIGHTS", "", "TEACHER.ALLOW_RANDOM_INIT", "True",
            "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bf16", "DEEPKD.GRAD_STRATEGY", "streaming",
            "TEACHER.AMP_DTYPE", "bf16"]
    cfg = train_net.setup(default_argument_parser().parse_args(argv))
    trainer = DeepKDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    before = {k: v.clone() for k, v in trainer.model.roi_heads.state_dict().items()}
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.json") if line.strip()]
    for key in ("loss_tckd", "loss_nckd", "loss_cls", "total_loss"):
        assert math.isfinite(rows[-1][key]), key
    moved = [k for k, v in trainer.model.roi_heads.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and trainer._trainer.amp_dtype is torch.bfloat16
    assert trainer._trainer.decoupled_step.scaler is None  # bf16: no loss scale


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["", "bf16", "fp16"])
def test_cuda_folded_teacher_logits(amp):
    teacher = _teacher().cuda()
    teacher.fold_norm = False
    reference, _ = _logits(teacher)
    teacher.fold_norm, teacher.amp_dtype = True, {"": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    got, _ = _logits(teacher)
    tol = (1e-4 if not amp else 0.05) * (1.0 + reference.abs().max().item())
    assert got.dtype is torch.float32 and (got - reference).abs().max().item() < tol


def test_hooks_on_the_teacher_backbone_see_the_folded_forward():
    teacher = _teacher()
    _logits(teacher)  # the folded copy exists before the hook
    calls = []
    handle = teacher.backbone.register_forward_hook(lambda *a: calls.append(1))
    _logits(teacher)
    handle.remove()
    _logits(teacher)
    assert calls == [1]
