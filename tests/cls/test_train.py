"""Classification trainer: configs, distillers plain and with DeepKD, resume, bad input, tools."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import pytest
import torch

from deepkd_det.cls.config import ConfigError, load_cfg
from deepkd_det.cls.engine import ClsTrainer, NonFiniteLossError, evaluate, lr_at
from deepkd_det.cls.models import build_model
from tests.toolload import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




# ----------------------------------------------------------------------------- configs
DKD_BETA = {"resnet56": 2.0, "resnet110": 2.0, "wrn_40_2": 6.0, "vgg13": 6.0, "ResNet50": 8.0, "resnet32x4": 8.0}
PAIRS = {("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
         ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"), ("wrn_40_2", "ShuffleV1"),
         ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV2")}


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_cifar100_configs_follow_the_published_settings(method):
    files = sorted(glob.glob(os.path.join(ROOT, "configs/cls/cifar100", method, "[!_]*.yaml")))
    seen = set()
    for path in files:
        cfg = load_cfg(path)
        t, s = cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT
        seen.add((t, s))
        assert cfg.DISTILLER.TYPE == method.upper() and cfg.DEEPKD.ENABLED
        assert (cfg.SOLVER.EPOCHS, cfg.SOLVER.BATCH_SIZE, list(cfg.SOLVER.LR_DECAY_STAGES)) == (240, 64, [150, 180, 210])
        assert cfg.SOLVER.LR == (0.01 if s in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05), path
        assert (cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.MOMENTUM) == (5e-4, 0.9)
        assert (cfg.DEEPKD.DELTA_TOG, cfg.DEEPKD.DELTA_TCG) == (0.075, -0.075)
        if method == "dkd":
            assert (cfg.DKD.ALPHA, cfg.DKD.BETA, cfg.DKD.T, cfg.DKD.WARMUP) == (1.0, DKD_BETA[t], 4.0, 20.0), path
            assert cfg.DEEPKD.DELTA_NCG == 0.05
        else:
            assert (cfg.KD.CE_WEIGHT, cfg.KD.KD_WEIGHT, cfg.KD.TEMPERATURE) == (0.5, 0.5, 4.0)
            assert cfg.DEEPKD.DELTA_NCG == 0.075
    assert seen == PAIRS


def test_all_shipped_configs_load():
    files = [f for f in glob.glob(os.path.join(ROOT, "configs/cls/**/*.yaml"), recursive=True) if "_base_" not in f]
    assert len(files) >= 30
    for path in files:
        load_cfg(path)
    imagenet = load_cfg(os.path.join(ROOT, "configs/cls/imagenet/dkd/resnet50_mobilenetv2.yaml"))
    assert (imagenet.DKD.ALPHA, imagenet.DKD.BETA, imagenet.DKD.T, imagenet.SOLVER.LR) == (0.5, 2.0, 1.0, 0.2)
    assert (imagenet.SOLVER.BATCH_SIZE, imagenet.SOLVER.WEIGHT_DECAY, imagenet.SOLVER.EPOCHS) == (512, 1e-4, 100)


def test_base_chain_overrides_and_number_coercion(tmp_path):
    (tmp_path / "base.yaml").write_text("SOLVER:\n  LR: 0.1\n  EPOCHS: 7\nDKD:\n  BETA: 3\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  EPOCHS: 9\n  WEIGHT_DECAY: 1e-4\n")
    cfg = load_cfg(str(tmp_path / "child.yaml"), ["SOLVER.LR", "0.2", "DKD.ALPHA", "2"])
    assert (cfg.SOLVER.LR, cfg.SOLVER.EPOCHS, cfg.SOLVER.WEIGHT_DECAY, cfg.DKD.BETA, cfg.DKD.ALPHA) == (
        0.2, 9, 1e-4, 3.0, 2.0)
    (tmp_path / "loop.yaml").write_text("_BASE_: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_cfg(str(tmp_path / "loop.yaml"))


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER.LRR", "0.1"], "unknown config key SOLVER.LRR \\(did you mean SOLVER.LR\\?\\)"),
        (["DISTILLER.TYPE", "NONE", "DEEPKD.ENABLED", "True"], "DEEPKD.ENABLED needs a distillation method"),
        (["DISTILLER.TYPE", "DKD", "DISTILLER.TEACHER", "resnet8", "DEEPKD.ENABLED", "True",
          "DEEPKD.DELTA_TOG", "0.15"], "TOG momentum .* outside \\[0, 1\\)"),
        (["SOLVER.MOMENTUM", "1.0"], "SOLVER.MOMENTUM must lie in \\[0, 1\\)"),
        (["DISTILLER.TYPE", "DKD", "DISTILLER.TEACHER", "resnet8", "DEEPKD.ENABLED", "True",
          "DEEPKD.TOPK.K_START", "12"], "K must lie in \\[1, C-1\\] = \\[1, 9\\]"),
        (["DISTILLER.TYPE", "KD"], "needs a teacher"),
        (["DISTILLER.STUDENT", "resnet9"], "unknown model 'resnet9'"),
        (["SOLVER.LR", "fast"], "SOLVER.LR must be a number"),
        (["SOLVER.LR_DECAY_STAGES", "[10, 5]"], "strictly increasing"),
    ],
)
def test_bad_configs_are_refused_at_start(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_cfg(None, opts)


def test_lr_schedules():
    cfg = load_cfg(None, ["SOLVER.LR", "0.05"])
    assert [lr_at(cfg, e) for e in (0, 149.9, 150, 180, 210.5)] == pytest.approx([0.05, 0.05, 5e-3, 5e-4, 5e-5])
    cos = load_cfg(None, ["SOLVER.LR_SCHEDULER", "cosine", "SOLVER.EPOCHS", "10", "SOLVER.WARMUP_EPOCHS", "1"])
    assert lr_at(cos, 0.5) == pytest.approx(0.5 * 0.05 * 0.5 * (1 + torch.cos(torch.tensor(0.05 * torch.pi)).item()))
    assert lr_at(cos, 5) == pytest.approx(0.025) and lr_at(cos, 10) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- training
METHODS = {
    "vanilla": dict(DISTILLER__TYPE="NONE"),
    "kd": dict(DISTILLER__TYPE="KD"),
    "deepkd_kd": dict(DISTILLER__TYPE="KD", DEEPKD__ENABLED=True, DEEPKD__DELTA_NCG=0.075),
    "dkd": dict(DISTILLER__TYPE="DKD"),
    # One epoch more: NCKD acts from the first step (the first K is >= 2; K = 1 would make it zero),
    # and on top of the 0.975 TOG momentum the 4-epoch run still swings (seed 0: 33.8 top-1).
    "deepkd_dkd": dict(DISTILLER__TYPE="DKD", DEEPKD__ENABLED=True, SOLVER__EPOCHS=5, SOLVER__LR_DECAY_STAGES=[4]),
    "deepkd_kd_official": dict(DISTILLER__TYPE="KD", DEEPKD__ENABLED=True, DEEPKD__COMPAT="official"),
    "dkd_topk_mask_only": dict(DISTILLER__TYPE="DKD", DEEPKD__ENABLED=True, DEEPKD__DECOUPLE=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_distiller_learns(method, tmp_path, teacher_ckpt, tiny_cfg):
    settings = {"SOLVER__EPOCHS": 4, "SOLVER__LR": 0.02, "SOLVER__LR_DECAY_STAGES": [3], **METHODS[method]}
    cfg = tiny_cfg(tmp_path, DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt, **settings)
    trainer = ClsTrainer(cfg)
    before = evaluate(trainer.student, trainer.val_loader, trainer.device)["top1"]
    summary = trainer.train()
    assert summary["last_top1"] > before + 25.0, (before, summary)
    epochs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    if cfg.DEEPKD.ENABLED and cfg.DEEPKD.DECOUPLE:
        # every trainable parameter holds its three momentum buffers (TOG and NCG share one when their
        # momenta are equal), none of them all zero
        names = ("tcg", "tog+ncg") if method == "deepkd_kd" else ("tog", "tcg", "ncg")
        assert trainer.optimizer.fold_names == names
        for p in trainer.student.parameters():
            for component in names:
                assert float(trainer.optimizer.momentum_buffer(p, component).abs().sum()) > 0
    else:
        assert isinstance(trainer.optimizer, torch.optim.SGD)
    if cfg.DEEPKD.ENABLED:
        # the dynamic top-k mask grows to all 9 non-target classes
        assert epochs[0]["topk/K"] < epochs[-1]["topk/K"] == 9


@pytest.mark.slow
def test_deepkd_with_equal_momenta_and_no_mask_is_plain_sgd(tmp_path, teacher_ckpt, tiny_cfg):
    """Three buffers with one momentum sum to torch SGD's single buffer: the wiring adds nothing else.

    Four steps only: float32 rounding differences (~1e-7) between one backward of the sum and
    three backwards grow chaotically once a ReLU flips, which takes a few more steps here.
    """
    common = dict(DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt, SOLVER__EPOCHS=1,
                  SOLVER__WEIGHT_DECAY=5e-3, DATASET__DIGITS__TRAIN_LIMIT=128)
    plain = ClsTrainer(tiny_cfg(tmp_path / "plain", **common))
    plain.train()
    deep = ClsTrainer(tiny_cfg(tmp_path / "deep", DEEPKD__ENABLED=True, DEEPKD__DELTA_TOG=0.0, DEEPKD__DELTA_TCG=0.0,
                               DEEPKD__DELTA_NCG=0.0, DEEPKD__TOPK__MODE="off", **common))
    deep.train()
    assert type(deep.optimizer).__name__ == "DeepKDOptimizer"
    for (name, a), b in zip(plain.student.state_dict().items(), deep.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # ... and a real DeepKD run (deltas, mask) does move elsewhere
    other = ClsTrainer(tiny_cfg(tmp_path / "other", DEEPKD__ENABLED=True, **common))
    other.train()
    diff = max((a - b).abs().max().item() for a, b in zip(plain.student.parameters(), other.student.parameters()))
    assert diff > 1e-3


def _state(trainer):
    out = {f"model.{k}": v.clone() for k, v in trainer.student.state_dict().items()}
    for i, p in enumerate(trainer.student.parameters()):
        for c in ("tog", "tcg", "ncg"):
            out[f"buf{i}.{c}"] = trainer.optimizer.momentum_buffer(p, c)
    return out


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, teacher_ckpt, tiny_cfg):
    opts = dict(DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt, DEEPKD__ENABLED=True,
                SOLVER__EPOCHS=3, DKD__WARMUP=2.0, DEEPKD__TOPK__END=1.0)
    full = ClsTrainer(tiny_cfg(tmp_path / "full", **opts))
    full.train()
    first = ClsTrainer(tiny_cfg(tmp_path / "split", **opts))
    first.train(stop_after=2)
    assert json.loads(open(tmp_path / "split" / "metrics.jsonl").readlines()[-1])["epoch"] == 2
    torch.manual_seed(999)  # whatever the process did in between must not matter
    resumed = ClsTrainer(tiny_cfg(tmp_path / "split", **opts), resume=True)
    assert resumed.start_epoch == 2
    resumed.train()
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert full.topk_schedule.state_dict() == resumed.topk_schedule.state_dict()
    log_full = [json.loads(x)["val/top1"] for x in open(tmp_path / "full" / "metrics.jsonl")]
    log_split = [json.loads(x)["val/top1"] for x in open(tmp_path / "split" / "metrics.jsonl")]
    assert log_full == log_split


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_cfg):
    with pytest.raises(FileNotFoundError, match="latest.pth"):
        ClsTrainer(tiny_cfg(tmp_path), resume=True)


def test_non_finite_loss_stops_without_touching_checkpoints(tmp_path, teacher_ckpt, tiny_cfg):
    cfg = tiny_cfg(tmp_path, DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt,
                   DEEPKD__ENABLED=True, SOLVER__EPOCHS=2)
    trainer = ClsTrainer(cfg)
    original = trainer.distiller.component_losses

    def poisoned(zs, zt, y, ctx):
        losses = original(zs, zt, y, ctx)
        if ctx.epoch == 2:
            losses["ncg"] = losses["ncg"] * float("nan")
        return losses

    trainer.distiller.component_losses = poisoned
    before = {}
    trainer.train(stop_after=1)
    for name in ("latest.pth", "ckpt_epoch_1.pth", "student_best.pth"):
        path = tmp_path / name
        before[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    assert before["latest.pth"]
    with pytest.raises(NonFiniteLossError, match="ncg=nan"):
        trainer.train()
    for name, digest in before.items():
        path = tmp_path / name
        assert (hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None) == digest
    assert "ERROR non-finite loss at epoch 2" in (tmp_path / "worklog.txt").read_text()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]


@pytest.mark.slow
def test_cifar100_and_imagefolder_runs_end_to_end(tmp_path, tiny_cfg, write_cifar100, write_image_folder):
    """The real loaders through the whole trainer (teacher from a checkpoint, DeepKD, eval, resume)."""
    write_cifar100(str(tmp_path / "cifar"), n_train=64, n_test=16)
    teacher = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    teacher.parent.mkdir()
    torch.save({"model": build_model("resnet8", 100).state_dict()}, teacher)
    opts = dict(DATASET__TYPE="cifar100", DATASET__ROOT=str(tmp_path / "cifar"), DISTILLER__TYPE="DKD",
                DISTILLER__TEACHER="resnet8", TEACHER__ROOT=str(tmp_path), DEEPKD__ENABLED=True, SOLVER__EPOCHS=2)
    first = ClsTrainer(tiny_cfg(tmp_path / "run", **opts))
    assert first.num_classes == 100 and len(first.train_loader) == 2
    first.train(stop_after=1)
    summary = ClsTrainer(tiny_cfg(tmp_path / "run", **opts), resume=True).train()
    assert summary["best_epoch"] in (1, 2)
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readlines()[-1])
    assert row["epoch"] == 2 and 1 <= row["topk/K"] <= 99

    write_image_folder(str(tmp_path / "imagenet"), ["a", "b", "c"], per_class=4)
    cfg = tiny_cfg(tmp_path / "im", DATASET__TYPE="imagenet", DATASET__ROOT=str(tmp_path / "imagenet"),
                   DISTILLER__STUDENT="imagenet_resnet18", SOLVER__BATCH_SIZE=4, SOLVER__EPOCHS=1,
                   DATASET__TEST_BATCH_SIZE=12)
    summary = ClsTrainer(cfg).train()
    assert summary["last_top5"] == 100.0  # three classes: the top-5 always holds the target


# ----------------------------------------------------------------------------- teacher
def test_teacher_in_mdistiller_layout_is_loaded_frozen_and_exact(tmp_path, tiny_cfg):
    reference = build_model("resnet14", 10)
    for m in reference.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    reference.eval()
    folder = tmp_path / "teachers" / "resnet14_vanilla"
    folder.mkdir(parents=True)
    torch.save({"model": reference.state_dict(), "best_acc": 0.0}, folder / "ckpt_epoch_240.pth")
    cfg = tiny_cfg(tmp_path / "run", DISTILLER__TYPE="KD", DISTILLER__TEACHER="resnet14",
                   TEACHER__ROOT=str(tmp_path / "teachers"))
    trainer = ClsTrainer(cfg)
    teacher = trainer.distiller.teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    trainer.distiller.train()
    assert not teacher.training
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x), atol=1e-4, rtol=1e-4)
    assert not any(k.startswith("teacher") for k in trainer.distiller.state_dict())


def test_mismatched_teacher_checkpoints_are_refused(tmp_path, tiny_cfg):
    wrong_arch = tmp_path / "wrong_arch.pth"
    torch.save({"model": build_model("resnet14", 10).state_dict()}, wrong_arch)
    with pytest.raises(ValueError, match="missing keys|unexpected keys"):
        ClsTrainer(tiny_cfg(tmp_path / "a", DISTILLER__TYPE="KD", DISTILLER__TEACHER="resnet8",
                            TEACHER__CKPT=str(wrong_arch)))
    wrong_classes = tmp_path / "wrong_classes.pth"
    torch.save({"model": build_model("resnet8", 100).state_dict()}, wrong_classes)
    with pytest.raises(ValueError, match="fc.weight: checkpoint \\(100, 64\\) vs model \\(10, 64\\)"):
        ClsTrainer(tiny_cfg(tmp_path / "b", DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8",
                            TEACHER__CKPT=str(wrong_classes)))
    with pytest.raises(FileNotFoundError, match="resnet8_vanilla"):
        ClsTrainer(tiny_cfg(tmp_path / "c", DISTILLER__TYPE="KD", DISTILLER__TEACHER="resnet8",
                            TEACHER__ROOT=str(tmp_path / "none")))


# ----------------------------------------------------------------------------- tools
def test_train_tool_reports_config_errors(capsys):
    train_cls = load_tool("train_cls")

    assert train_cls.main(["--cfg", os.path.join(ROOT, "configs/cls/digits/dkd.yaml"), "DKD.BETTA", "2"]) == 1
    assert "unknown config key DKD.BETTA (did you mean DKD.BETA?)" in capsys.readouterr().err


@pytest.mark.slow
def test_outputs_eval_tool_and_gsnr_plot(tmp_path, teacher_ckpt, capsys, tiny_cfg):
    eval_cls, plot_gsnr = load_tool("eval_cls"), load_tool("plot_gsnr")

    opts = dict(DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt,
                DEEPKD__ENABLED=True, SOLVER__EPOCHS=2, DEEPKD__GSNR__ENABLED=True, DEEPKD__GSNR__WINDOW=3, DEEPKD__GSNR__PERIOD=4,
                LOG__TENSORBOARD=True)
    summary = ClsTrainer(tiny_cfg(tmp_path, **opts)).train()
    for name in ("config.yaml", "worklog.txt", "latest.pth", "best.pth", "student_best.pth", "ckpt_epoch_2.pth"):
        assert (tmp_path / name).is_file(), name
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    gsnr = [r for r in rows if r["type"] == "gsnr"]
    assert [r["iter"] for r in gsnr] == [2, 6, 10, 14]
    for r in gsnr:
        for key in ("gsnr/tog", "gsnr/tcg", "gsnr/ncg", "bsnr/tog", "bsnr/tcg", "bsnr/ncg"):
            assert 0.0 < r[key] < float("inf"), (key, r)

    cfg_file = tmp_path / "config.yaml"
    assert eval_cls.main(["--cfg", str(cfg_file), "--ckpt", str(tmp_path / "ckpt_epoch_2.pth")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(summary["last_top1"])
    assert eval_cls.main(["--cfg", str(cfg_file), "--teacher"]) == 0
    teacher_top1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"]
    assert teacher_top1 > 50.0

    out = tmp_path / "gsnr.png"
    assert plot_gsnr.main(["--run", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    os.remove(tmp_path / "metrics.jsonl")  # falls back to the TensorBoard events
    series = plot_gsnr.load_series(str(tmp_path))
    assert [p[0] for p in sorted(series["gsnr/ncg"])] == [2, 6, 10, 14]


def test_gsnr_of_plain_training_measures_each_component(tmp_path, teacher_ckpt, tiny_cfg):
    cfg = tiny_cfg(tmp_path, DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt,
                   SOLVER__EPOCHS=1, DEEPKD__GSNR__ENABLED=True, DEEPKD__GSNR__WINDOW=3, DEEPKD__GSNR__PERIOD=4)
    ClsTrainer(cfg).train()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    gsnr = [r for r in rows if r["type"] == "gsnr"]
    assert [r["iter"] for r in gsnr] == [2, 6]
    for r in gsnr:
        assert all(0.0 < r[f"gsnr/{c}"] < float("inf") for c in ("tog", "tcg", "ncg"))
        assert not any(k.startswith("bsnr/") for k in r)  # torch SGD keeps one buffer, not three
