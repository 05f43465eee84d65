"""Mixed precision in the classifier with DeepKD: bf16 autocast trains; fp16 keeps its scale on resume."""

import json
import math

import torch

from deepkd_det.cls.engine import ClsTrainer


def test_bf16_deepkd_kd_trains_with_the_merged_buffer(tmp_path, teacher_ckpt, tiny_cfg):
    cfg = tiny_cfg(tmp_path, DISTILLER__TYPE="KD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt,
                   DEEPKD__ENABLED=True, DEEPKD__DELTA_NCG=0.075, AMP__ENABLED=True, AMP__DTYPE="bf16",
                   SOLVER__EPOCHS=1, DATASET__DIGITS__TRAIN_LIMIT=96)
    trainer = ClsTrainer(cfg)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(math.isfinite(rows[-1][k]) for k in ("train/tog", "train/tcg", "train/ncg", "train/loss"))
    assert trainer.amp_dtype is torch.bfloat16 and trainer.scaler is None
    assert trainer.optimizer.fold_names == ("tcg", "tog+ncg")  # two backward passes, not three
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))


def test_fp16_scaler_state_is_checkpointed_and_resumed(tmp_path, teacher_ckpt, tiny_cfg):
    opts = dict(DISTILLER__TYPE="DKD", DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt,
                DEEPKD__ENABLED=True, AMP__ENABLED=True, AMP__DTYPE="fp16", SOLVER__EPOCHS=1,
                DATASET__DIGITS__TRAIN_LIMIT=64)
    trainer = ClsTrainer(tiny_cfg(tmp_path, **opts))
    trainer.scaler.scale = 2.0**40  # far too large for fp16 gradients: the first steps overflow and back off
    trainer.train()
    assert trainer.scaler.skipped_steps >= 1 and trainer.scaler.scale < 2.0**40
    resumed = ClsTrainer(tiny_cfg(tmp_path, **opts), resume=True)
    assert resumed.scaler.state_dict() == trainer.scaler.state_dict()
