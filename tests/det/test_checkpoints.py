"""Checkpoints of a student with a teacher read from its file: the student only, exact resume
without the teacher, no duplicate metrics rows, leftover temporary files removed; divergence
stops before anything diverged is saved, naming the file to resume from."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.engine import HookBase, default_argument_parser  # noqa: E402

import train_net  # noqa: E402
from deepkd_det.det.data import generate_shapes_dataset  # noqa: E402
from deepkd_det.det.engine import DeepKDTrainer  # noqa: E402
from tests.det.test_engine import DEMO  # noqa: E402


def _args(config, out, shapes_root, *opts, resume=False):
    argv = ["--config-file", str(config)] + (["--resume"] if resume else [])
    tiny = [
        "OUTPUT_DIR", str(out),
        "DATASETS.SHAPES.ROOT", shapes_root, "DATASETS.SHAPES.NUM_TRAIN", "8", "DATASETS.SHAPES.NUM_VAL", "2",
        "DATASETS.SHAPES.IMAGE_SIZE", "64", "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "(3,)", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0",
    ]
    return default_argument_parser().parse_args(argv + tiny + [str(o) for o in opts])


def _trainer(args):
    trainer = DeepKDTrainer(train_net.setup(args))
    trainer.resume_or_load(resume=args.resume)
    return trainer


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    generate_shapes_dataset(root, num_train=8, num_val=2, image_size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory, shapes_root):
    out = tmp_path_factory.mktemp("teacher")
    train_net.main(_args(DEMO / "teacher.yaml", out, shapes_root, "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)"))
    return str(out / "model_final.pth")


class _Crash(HookBase):
    def before_step(self):
        if self.trainer.iter == 3:
            raise KeyboardInterrupt("simulated kill at iteration 3")


def _rows(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_student_checkpoints_leave_the_teacher_out_and_resume_exactly(tmp_path, shapes_root, teacher_file, capsys):
    config = DEMO / "student-deepkd-dkd.yaml"
    opts = ["TEACHER.MODEL.WEIGHTS", teacher_file]
    whole = tmp_path / "whole"
    _trainer(_args(config, whole, shapes_root, *opts)).train()

    parts = tmp_path / "parts"
    first = _trainer(_args(config, parts, shapes_root, *opts))
    first.register_hooks([_Crash()])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (parts / "last_checkpoint").read_text() == "model_0000001.pth"
    leftover = parts / ".model_0000003.pth.abcd1234.tmp"  # what a kill -9 during a save leaves
    leftover.write_bytes(b"partial")
    resumed = _trainer(_args(config, parts, shapes_root, *opts, resume=True))
    assert not leftover.exists()
    assert resumed.start_iter == 2
    resumed.train()

    a = torch.load(whole / "model_final.pth", weights_only=True)
    b = torch.load(parts / "model_final.pth", weights_only=True)
    for ckpt in (a, b, torch.load(parts / "model_0000001.pth", weights_only=True)):
        keys = list(ckpt["model"])
        assert not [k for k in keys if k.startswith("teacher.")] and "roi_heads.box_predictor.cls_score.weight" in keys
        assert any("running_mean" in k for k in keys)  # the student's buffers are kept
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a, opt_b = a["trainer"]["_trainer"]["optimizer"], b["trainer"]["_trainer"]["optimizer"]
    assert any("scaled_buffer_ncg" in s for s in opt_a["state"].values())  # NCG momentum (core/optim)
    for idx, state in opt_a["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt_b["state"][idx][name]), (idx, name)
    # The rows of the uninterrupted run: the killed run's row after its checkpoint is not kept twice.
    assert [r["iteration"] for r in _rows(parts)] == [r["iteration"] for r in _rows(whole)] == [3]

    # The final student checkpoint evaluates as it is (no teacher needed; --eval-only after the pairs).
    results = train_net.main(_args(config, tmp_path / "eval", shapes_root, "MODEL.WEIGHTS", parts / "model_final.pth",
                                   "DATASETS.TEST", "('deepkd_shapes_val',)", *opts, "--eval-only"))
    assert "AP" in results["bbox"]


class _Poison(HookBase):
    """NaN weights after the step of iteration ``at`` (as a diverging update would leave them)."""

    def __init__(self, at, in_step=False):
        self.at, self.in_step = at, in_step

    def _poison(self):
        with torch.no_grad():
            self.trainer.model.backbone.bottom_up.stem.conv1.weight.fill_(float("nan"))

    def before_train(self):
        if self.in_step:  # inside the optimizer step: before the checkpoint hooks see the model
            opt, step = self.trainer.optimizer, self.trainer.optimizer.step

            def poisoned_step(*a, **k):
                out = step(*a, **k)
                if self.trainer.iter == self.at:
                    self._poison()
                return out

            opt.step = poisoned_step

    def after_step(self):
        if not self.in_step and self.trainer.iter == self.at:
            self._poison()


@pytest.mark.parametrize("at,in_step,expected", [
    (2, False, r"iteration 3 \(in the forward pass: Predicted boxes or scores contain Inf/NaN"),
    (3, True, r"after iteration 3 .* weights are NaN/inf"),
])
def test_divergence_stops_before_a_diverged_checkpoint(tmp_path, shapes_root, at, in_step, expected):
    out = tmp_path / "nan"
    trainer = _trainer(_args(DEMO / "teacher.yaml", out, shapes_root))
    trainer.register_hooks([_Poison(at, in_step)])
    with pytest.raises(FloatingPointError, match=expected) as info:
        trainer.train()
    assert "SOLVER.BASE_LR" in str(info.value)
    assert f"{out / 'model_0000001.pth'} (finite): --resume continues from it" in str(info.value)
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_final.pth").exists() and not (out / "model_0000003.pth").exists()
