"""Model EMA of the classifier (timm's ModelEmaV2, cls/ema.py): the trainer's EMA equals an EMA
computed independently from the model after every step, survives a resume exactly, and is evaluated
and saved."""

from __future__ import annotations

import json

import pytest
import torch

from deepkd_det.cls.engine import ClsTrainer
from deepkd_det.core.io import load_weights_only

DECAY = 0.8


def _record_steps(trainer):
    """Wrap train_step to keep a float64 copy of the student's state after every optimizer step."""
    states = []
    step = trainer.train_step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        states.append({k: v.detach().clone() for k, v in trainer.student.state_dict().items()})
        return out

    trainer.train_step = recording
    return states


def _independent_ema(start, states, decay):
    """ema <- decay * ema + (1 - decay) * model over the recorded states, in float64; integer
    buffers (BN counters) in float32 and truncated back to integers, which is what copy_ does."""
    ema = {k: v.double() if v.is_floating_point() else v.clone() for k, v in start.items()}
    for state in states:
        for k, v in ema.items():
            if v.is_floating_point():
                ema[k] = decay * v + (1 - decay) * state[k].double()
            else:
                ema[k] = (decay * v.float() + (1 - decay) * state[k].float()).to(v.dtype)
    return {k: v.double() for k, v in ema.items()}


@pytest.mark.parametrize("method", ["NONE", "DKD", "GPD"])
def test_ema_equals_an_independent_ema_of_every_step(method, tmp_path, teacher_ckpt, tiny_cfg):
    opts = dict(EMA__ENABLED=True, EMA__DECAY=DECAY, SOLVER__EPOCHS=2, DATASET__DIGITS__TRAIN_LIMIT=96)
    if method != "NONE":
        opts.update(DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt)
    if method == "GPD":
        opts.update(GPD__ENABLED=True, GPD__CBR=False)
    trainer = ClsTrainer(tiny_cfg(tmp_path, **opts))
    start = {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}
    states = _record_steps(trainer)
    summary = trainer.train()
    assert len(states) == 2 * 3  # 96 images, batch 32, two epochs
    expected = _independent_ema(start, states, DECAY)
    got = trainer.ema.module.state_dict()
    assert got.keys() == expected.keys()
    for key, value in got.items():
        tol = 1e-5 * (1 + expected[key].abs().max().item())
        assert (value.double() - expected[key]).abs().max().item() <= tol, key
    # it moved, and is not the model itself
    moved = max((got[k].double() - start[k].double()).abs().max().item() for k in got if got[k].is_floating_point())
    assert moved > 1e-4
    differ = max((got[k].double() - states[-1][k].double()).abs().max().item() for k in got
                 if got[k].is_floating_point())
    assert differ > 1e-4
    # the EMA only watches: the model trains exactly as without it
    plain = {k: v for k, v in opts.items() if not k.startswith("EMA")}
    without = ClsTrainer(tiny_cfg(tmp_path / "without", **plain))
    without.train()
    for key, value in without.student.state_dict().items():
        assert torch.equal(value, trainer.student.state_dict()[key]), key
    row = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")][-1]
    assert "val/ema_top1" in row and row["val/ema_top1"] == summary["last_ema_top1"]
    if method == "GPD":
        assert "val/ema_dt_top1" in row


def test_ema_is_exact_across_a_resume(tmp_path, teacher_ckpt, tiny_cfg):
    opts = dict(EMA__ENABLED=True, EMA__DECAY=DECAY, DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8",
                TEACHER__CKPT=teacher_ckpt, SOLVER__EPOCHS=2, DATASET__DIGITS__TRAIN_LIMIT=96)
    full = ClsTrainer(tiny_cfg(tmp_path / "full", **opts))
    full.train()
    ClsTrainer(tiny_cfg(tmp_path / "split", **opts)).train(stop_after=1)
    torch.manual_seed(123)
    resumed = ClsTrainer(tiny_cfg(tmp_path / "split", **opts), resume=True)
    resumed.train()
    a, b = full.ema.module.state_dict(), resumed.ema.module.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(x)["val/ema_top1"] for x in open(tmp_path / "full" / "metrics.jsonl")]
    assert log == [json.loads(x)["val/ema_top1"] for x in open(tmp_path / "split" / "metrics.jsonl")]
    saved = load_weights_only(str(tmp_path / "full" / "latest.pth"))["ema"]
    assert all(torch.equal(saved[k], a[k]) for k in a)
    # a checkpoint without an EMA cannot resume a run that has one
    plain = {k: v for k, v in opts.items() if not k.startswith("EMA")}
    ClsTrainer(tiny_cfg(tmp_path / "noema", **plain)).train(stop_after=1)
    with pytest.raises(ValueError, match="EMA"):
        ClsTrainer(tiny_cfg(tmp_path / "noema", **opts), resume=True)


def test_student_best_holds_the_ema_when_it_scores_best(tmp_path, tiny_cfg):
    """The best epoch is that of max(model top-1, EMA top-1) (the release's rule); student_best.pth
    then holds the weights that scored it. In this run (seed 0) the EMA wins the last epoch."""
    cfg = tiny_cfg(tmp_path, EMA__ENABLED=True, EMA__DECAY=DECAY, SOLVER__EPOCHS=2, DATASET__DIGITS__TRAIN_LIMIT=96)
    trainer = ClsTrainer(cfg)
    summary = trainer.train()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    last = rows[-1]
    assert last["val/ema_top1"] > last["val/top1"], "the setting no longer exercises an EMA win"
    assert summary["best_top1"] == max(max(r["val/top1"], r["val/ema_top1"]) for r in rows)
    best = load_weights_only(str(tmp_path / "student_best.pth"))
    assert best["source"] == "ema" and best["top1"] == last["val/ema_top1"]
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(best["model"][k], ema[k]) for k in ema)
