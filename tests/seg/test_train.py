"""The segmentation trainer: every method trains a tiny student, exact resume after a kill, one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from deepkd_det.seg.config import load_seg_cfg
from deepkd_det.seg.engine import SegTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs", "seg", "synthetic")
TINY = ["DATASET.SYNTHETIC.SIZE", "32", "DATASET.SYNTHETIC.TRAIN_IMAGES", "16", "DATASET.SYNTHETIC.VAL_IMAGES", "8",
        "INPUT.CROP_SIZE", "[32, 32]", "MODEL.WIDTH", "4", "MODEL.HEAD_CHANNELS", "8", "TEACHER.WIDTH", "4",
        "TEACHER.HEAD_CHANNELS", "8", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "12", "TEST.EVAL_PERIOD", "12",
        "LOG.PERIOD", "2", "SOLVER.BASE_LR", "0.05", "SOLVER.CHECKPOINT_PERIOD", "5"]
METHODS = ("kd", "dkd", "diffkd", "deepkd_kd", "deepkd_dkd", "deepkd_diffkd")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(method, out, *extra):
    return load_seg_cfg(os.path.join(CONFIGS, f"{method}.yaml"), TINY + ["OUTPUT_DIR", str(out)] + list(extra))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_teacher")
    SegTrainer(load_seg_cfg(os.path.join(CONFIGS, "vanilla.yaml"), TINY + ["OUTPUT_DIR", str(out)])).train()
    return str(out / "student_final.pth")


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_vanilla")
    trainer = SegTrainer(load_seg_cfg(os.path.join(CONFIGS, "vanilla.yaml"), TINY + ["OUTPUT_DIR", str(out)]))
    before = trainer.evaluate()["mIoU"]
    summary = trainer.train()
    return before, summary, {k: v.clone() for k, v in trainer.student.state_dict().items()}


def test_vanilla_student_learns(vanilla):
    before, summary, _ = vanilla
    # From a random net's scattered classes to the scenes' layout (12 steps: mostly the background prior).
    assert summary["iteration"] == 12 and summary["mIoU"] > before + 5


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_its_mioU_moves(tmp_path, teacher, vanilla, method):
    trainer = SegTrainer(_cfg(method, tmp_path, "TEACHER.CKPT", teacher))
    before = trainer.evaluate()["mIoU"]
    summary = trainer.train()
    assert summary["mIoU"] > before + 5
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert all(r["tcg"] > 0 and r["ncg"] > 0 for r in train_rows)  # the distillation terms are live
    assert train_rows[-1]["tog"] < train_rows[0]["tog"]
    if method.startswith("deepkd"):
        assert trainer.decoupled and all("K" in r for r in train_rows)
        assert train_rows[0]["K"] < train_rows[-1]["K"] <= 3  # the dynamic top-k grows to all non-target classes
    if "diffkd" in method:
        assert any(k.startswith("diffkd.") for k in trainer.distiller.extra_state_dict())
    # The same seed as the vanilla student: only the teacher's terms can make the weights differ.
    diff = max(float((trainer.student.state_dict()[k].float() - v.float()).abs().max()) for k, v in vanilla[2].items())
    assert diff > 1e-4


class _Killed(KeyboardInterrupt):
    pass


def test_resume_after_a_kill_is_exact(tmp_path, teacher, monkeypatch):
    opts = ("TEACHER.CKPT", teacher)
    full = SegTrainer(_cfg("deepkd_diffkd", tmp_path / "full", *opts))
    full.train()

    killed = SegTrainer(_cfg("deepkd_diffkd", tmp_path / "split", *opts))
    step = killed.train_step

    def dies_at_8(image, label):
        if killed.iteration == 8:  # after the checkpoint of iteration 5 and the rows of 6..8
            raise _Killed("simulated kill")
        return step(image, label)

    monkeypatch.setattr(killed, "train_step", dies_at_8)
    with pytest.raises(_Killed):
        killed.train()
    assert torch.load(tmp_path / "split" / "latest.pth", weights_only=True)["iteration"] == 5
    resumed = SegTrainer(_cfg("deepkd_diffkd", tmp_path / "split", *opts), resume=True)
    assert resumed.iteration == 5
    resumed.train()
    a, b = full.state_dict(), resumed.state_dict()
    for part in ("model", "distiller"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    ob, rb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert ob.keys() == rb.keys() and all(
        torch.equal(ob[i][n], rb[i][n]) for i in ob for n in ob[i] if torch.is_tensor(ob[i][n]))

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(tmp_path / run / "metrics.jsonl")]

    assert rows("full") == rows("split")  # the killed run's rows after its checkpoint are not kept twice


def _cli(argv, capsys):
    # Loaded from its file: detectron2's source build installs a top-level "tools" package.
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_seg", os.path.join(ROOT, "tools", "train_seg.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_bad_input_is_one_line(tmp_path, teacher, capsys):
    cfg = os.path.join(CONFIGS, "kd.yaml")
    base = ["--cfg", cfg] + TINY + ["OUTPUT_DIR", str(tmp_path / "run")]
    cases = [
        (base + ["TEACHER.CKPT", teacher, "DATASET.SYNTHETIC.NUM_SHAPES", "4"],
         "the teacher predicts 4 classes, the data has 5: teacher and student class counts must agree"),
        (base + ["TEACHER.CKPT", str(tmp_path / "nope.pth")], "checkpoint file not found"),
        (base + ["TEACHER.CKPT", teacher, "TEACHER.WIDTH", "8"], "does not fit TEACHER tiny/deeplabv3"),
        (base + ["TEACHER.CKPT", teacher, "SOLVER.MAX_ITR", "3"], "unknown config key SOLVER.MAX_ITR (did you mean"),
        (base + ["TEACHER.CKPT", teacher, "--resume"], "--resume: no checkpoint at"),
        (base + ["TEACHER.CKPT", teacher, "DATASET.TYPE", "folder", "DATASET.ROOT", str(tmp_path),
                 "DATASET.CLASSES", "[a, b]"], "folder not found"),
    ]
    for argv, message in cases:
        rc, err = _cli(argv, capsys)
        assert rc == 1 and len(err.splitlines()) == 1 and message in err, (argv[-4:], err)
        assert err.startswith("train_seg.py: error:")
