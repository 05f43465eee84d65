"""GPD as released: the MobileNet (V1) student, the fine-tuning start, ReviewKD with GPD and the
vision transformer (IR exact in float64, export into the plain class)."""

from __future__ import annotations

import copy

import pytest
import torch

from deepkd_det.cls.models import build_model, load_teacher_weights
from deepkd_det.cls.models.mobilenet_v1 import MobileNetV1
from deepkd_det.core.gpd import DYNAMIC_TEACHER, STUDENT, at_width, export, widen

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.1)
    return model


def _both_widths(shared, x, train):
    probe = copy.deepcopy(shared).train(train)
    with torch.no_grad():
        with at_width(probe, STUDENT):
            s = probe(x)
        with at_width(probe, DYNAMIC_TEACHER):
            t = probe(x)
    return s, t


@pytest.mark.parametrize("cbr", [False, "single", "multi"])
def test_mobilenet_v1_ir_is_exact_in_float64_and_exports_into_the_plain_class(cbr):
    torch.manual_seed(0)
    student = _randomize_bn(MobileNetV1(10, width_mult=0.25)).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    shared = widen(student, 2, cbr=bool(cbr), cbr_init=cbr or "multi", noise_std=0.0)
    for train in (False, True):
        s, t = _both_widths(shared, x, train)
        assert (t - s).abs().max().item() <= 1e-10 * s.abs().max().item(), (train, (t - s).abs().max())
    if cbr != "multi":  # the student itself is unchanged by widening (single-branch CBR keeps it)
        with torch.no_grad():
            torch.testing.assert_close(shared.eval()(x), student.eval()(x), rtol=1e-10, atol=1e-10)
    plain = export(shared)
    fresh = MobileNetV1(10, width_mult=0.25).double()
    fresh.load_state_dict(plain.state_dict())  # strict: the ordinary class's keys and shapes
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), shared.eval()(x), rtol=1e-10, atol=1e-10)


def test_mobilenet_v1_has_the_release_layout_and_loads_its_checkpoint_wrapping(tmp_path):
    model = build_model("imagenet_mobilenet_v1", 1000)
    keys = list(model.state_dict())
    assert keys[:3] == ["model.0.0.weight", "model.0.1.weight", "model.0.1.bias"]
    assert "model.13.3.weight" in keys and keys[-2:] == ["fc.weight", "fc.bias"]
    assert model.model[13][3].weight.shape == (1024, 1024, 1, 1) and model.model[1][0].groups == 32
    # the release's MobileNet checkpoints: {"state_dict": {"module." + key: ...}}
    torch.manual_seed(1)
    source = _randomize_bn(build_model("imagenet_mobilenet_v1", 1000)).eval()
    path = tmp_path / "mobilenet_sgd.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}, "epoch": 90}, path)
    loaded = load_teacher_weights(build_model("imagenet_mobilenet_v1", 1000), path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
        feats, logits = loaded.forward_stages(x)
    assert [f.shape[1:] for f in feats] == [(128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7),
                                            (1024, 1, 1)]
    torch.testing.assert_close(logits, source(x))


# ------------------------------------------------------------------ fine-tuning


def test_finetuning_starts_from_the_pretrained_students_function(tmp_path, tiny_cfg):
    """FINETUNE.STUDENT_WEIGHTS + GPD (CBR single, the release's fine-tuning init): at student width
    the trainer's model is the pretrained student exactly; the dynamic teacher is it up to the IR
    noise; export gives back the pretrained weights."""
    from deepkd_det.cls.engine import ClsTrainer

    torch.manual_seed(3)
    pretrained = _randomize_bn(build_model("resnet8", 10))
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "pretrained.pth"
    torch.save({"model": pretrained.state_dict()}, path)
    cfg = tiny_cfg(tmp_path / "run", FINETUNE__STUDENT_WEIGHTS=str(path), GPD__ENABLED=True,
                   GPD__CBR_INIT="single", EMA__ENABLED=True)
    trainer = ClsTrainer(cfg)
    x = torch.randn(4, 3, 8, 8)
    for train in (False, True):
        probe, reference = copy.deepcopy(trainer.student).train(train), copy.deepcopy(pretrained).train(train)
        with torch.no_grad():
            assert torch.equal(probe(x), reference(x)), train
            with at_width(probe, DYNAMIC_TEACHER):
                gap = (probe(x) - reference(x)).abs().max().item()
        assert gap <= 1e-3 * reference(x).abs().max().item()
    exported = export(trainer.student).state_dict()
    for key, value in pretrained.state_dict().items():
        assert torch.equal(exported[key], value), key
    ema = trainer.ema.module.eval()
    with torch.no_grad():
        assert torch.equal(ema(x), pretrained.eval()(x))  # the EMA starts from the pretrained student too
    # the released from-scratch CBR init would change the pretrained function: refused
    from deepkd_det.cls.config import ConfigError

    with pytest.raises(ConfigError, match="CBR_INIT single"):
        tiny_cfg(tmp_path / "bad", FINETUNE__STUDENT_WEIGHTS=str(path), GPD__ENABLED=True)


def test_finetuning_configs_follow_the_released_schedule():
    import os

    from deepkd_det.cls.config import load_cfg

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cls", "imagenet", "gpd")
    for name, student in (("finetune_resnet18", "imagenet_resnet18"), ("finetune_mobilenetv1", "imagenet_mobilenet_v1")):
        for suffix, gpd in (("", True), ("_baseline", False)):
            cfg = load_cfg(os.path.join(root, f"{name}{suffix}.yaml"))
            s = cfg.SOLVER
            assert (s.EPOCHS, s.LR, s.WARMUP_EPOCHS, list(s.LR_DECAY_STAGES)) == (50, 0.01, 0.0, [30])
            assert cfg.DISTILLER.STUDENT == student and cfg.DISTILLER.TYPE == "NONE" and cfg.FINETUNE.STUDENT_WEIGHTS
            assert cfg.GPD.ENABLED == gpd and cfg.EMA.ENABLED
            if gpd:
                assert cfg.GPD.CBR_INIT == "single" and cfg.GPD.CBR


# ------------------------------------------------------------------ vision transformer


def _random_vit(dtype=torch.float64, seed=0):
    from deepkd_det.cls.models.vit import vit_tiny_test

    torch.manual_seed(seed)
    model = vit_tiny_test(10).to(dtype)
    with torch.no_grad():  # arbitrary values everywhere (LayerNorm affine and tokens included)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_vit_ir_is_exact_in_float64_and_exports_into_the_plain_class():
    from deepkd_det.cls.models.vit import vit_tiny_test
    from deepkd_det.core.gpd import SlicedGELU, SlicedLayerNorm, SlicedLinear, gpd_ratio

    student = _random_vit()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    for ratio in (2, 3):
        shared = widen(student, ratio, noise_std=0.0)
        assert gpd_ratio(shared) == ratio
        assert isinstance(shared.blocks[0].norm1, SlicedLayerNorm) and isinstance(shared.blocks[0].mlp.act, SlicedGELU)
        assert isinstance(shared.blocks[0].attn.qkv, SlicedLinear) and shared.blocks[0].attn.qkv.out_blocks == 3
        assert shared.cls_token.shape[-1] == 32 * ratio and shared.pos_embed.shape == (1, 17, 32 * ratio)
        assert shared.blocks[1].attn.qkv.weight.shape == (3 * 32 * ratio, 32 * ratio)
        s, t = _both_widths(shared, x, train=False)
        with torch.no_grad():
            reference = student(x)
        torch.testing.assert_close(s, reference, rtol=1e-12, atol=1e-12)  # widening keeps the student
        assert (t - s).abs().max().item() <= 1e-10 * s.abs().max().item(), (ratio, (t - s).abs().max())
        with torch.no_grad(), at_width(shared, DYNAMIC_TEACHER):  # the teacher has ratio x the heads
            q = shared.blocks[0].attn.qkv(shared._tokens(x))
        assert q.shape[-1] == 3 * 32 * ratio
    # the released IR noise (1e-6) keeps the teacher close, and the student untouched
    noisy = widen(student, 2)
    s, t = _both_widths(noisy, x, train=False)
    torch.testing.assert_close(s, reference, rtol=1e-12, atol=1e-12)
    assert 0 < (t - s).abs().max().item() <= 1e-3 * s.abs().max().item()
    # train the shared model a step so the widths differ, then export
    opt = torch.optim.SGD(noisy.parameters(), lr=0.1)
    for width in (DYNAMIC_TEACHER, STUDENT):
        with at_width(noisy, width):
            noisy(x).logsumexp(1).mean().backward()
    opt.step()
    plain = export(noisy)
    fresh = vit_tiny_test(10).double()
    fresh.load_state_dict(plain.state_dict())  # strict: the ordinary class's keys and shapes
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), noisy(x), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(fresh(x), reference)


def test_vit_matches_timms_vision_transformer_and_loads_its_weights(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    ours = _random_vit(torch.float32).eval()
    theirs = TimmViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                     num_classes=10).eval()
    assert list(theirs.state_dict()) == list(ours.state_dict())  # timm's names, in timm's order
    path = tmp_path / "deit.pth"
    torch.save(ours.state_dict(), path)  # timm's DeiT files are plain state dicts ({"model": ...} also loads)
    theirs.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    deit = build_model("imagenet_deit_small", 1000)
    assert list(deit.state_dict()) == list(timm.create_model("deit_small_patch16_224", pretrained=False).state_dict())


def test_adamw_is_plain_training_only(tmp_path, tiny_cfg):
    from deepkd_det.cls.config import ConfigError
    from deepkd_det.cls.engine import ClsTrainer

    with pytest.raises(ConfigError, match="adamw"):
        tiny_cfg(tmp_path, SOLVER__OPTIMIZER="adamw", DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8",
                 DEEPKD__ENABLED=True)
    trainer = ClsTrainer(tiny_cfg(tmp_path, SOLVER__OPTIMIZER="adamw", SOLVER__LR=0.001, SOLVER__WEIGHT_DECAY=0.05))
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.defaults["weight_decay"] == 0.05
