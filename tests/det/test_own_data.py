"""The own-data recipe of docs/own_data.md, run as written (plus tiny sizes) on a generated COCO set:
teacher, its evaluation, a student distilled from it, the student's evaluation."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402

import train_net  # noqa: E402
from deepkd_det.det.data import generate_shapes_dataset, shapes_split_paths  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def own_data_recipe():
    """The ``python train_net.py --config-file configs/DEEPKD/custom/...`` lines of docs/own_data.md."""
    text = (REPO / "docs" / "own_data.md").read_text()
    return re.findall(r"^python train_net\.py --config-file configs/DEEPKD/custom/.*$", text, flags=re.M)


def _tiny():
    """Sizes for a test on 64 px images; the architecture keys of both models alike."""
    opts = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005", "SOLVER.WARMUP_ITERS", "0",
            "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)", "SOLVER.CHECKPOINT_PERIOD", "100",
            "KD.WARMUP_ITERS", "0", "TEST.DETECTIONS_PER_IMAGE", "20"]
    for model in ("MODEL", "TEACHER.MODEL"):
        opts += [f"{model}.FPN.OUT_CHANNELS", "64", f"{model}.ROI_BOX_HEAD.FC_DIM", "128",
                 f"{model}.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]",
                 f"{model}.RPN.PRE_NMS_TOPK_TRAIN", "256", f"{model}.RPN.POST_NMS_TOPK_TRAIN", "64",
                 f"{model}.RPN.PRE_NMS_TOPK_TEST", "128", f"{model}.RPN.POST_NMS_TOPK_TEST", "32",
                 f"{model}.RPN.BATCH_SIZE_PER_IMAGE", "64", f"{model}.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"]
    return opts


def test_own_data_recipe_teacher_eval_student_eval(tmp_path, monkeypatch, capsys):
    commands = own_data_recipe()
    assert len(commands) == 4, commands
    # The data layout the page names: data/{train,val}.json and data/{train,val}/.
    generated = tmp_path / "generated"
    generate_shapes_dataset(str(generated), num_train=6, num_val=2, image_size=64, seed=0)
    for split in ("train", "val"):
        json_file, image_dir = shapes_split_paths(str(generated), split)
        shutil.copytree(image_dir, tmp_path / "data" / split)
        shutil.copy(json_file, tmp_path / "data" / f"{split}.json")
    monkeypatch.chdir(tmp_path)

    results = []
    for command in commands:
        argv = shlex.split(command)[2:]
        argv[argv.index("--config-file") + 1] = str(REPO / argv[argv.index("--config-file") + 1])
        results.append(train_net.main(train_net.parse_args(argv + _tiny())))

    teacher = tmp_path / "output" / "custom" / "teacher" / "model_final.pth"
    student = tmp_path / "output" / "custom" / "student" / "model_final.pth"
    assert teacher.is_file() and student.is_file()
    # Class count from the json (3 shapes): 3 classes + background in both detectors.
    t_state = torch.load(teacher, weights_only=True)["model"]
    s_state = torch.load(student, weights_only=True)["model"]
    assert t_state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    assert s_state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    # The student checkpoint holds the student alone (R-18: basic blocks), not the R-50 teacher.
    assert not [k for k in s_state if k.startswith("teacher.")]
    assert "backbone.bottom_up.res2.0.conv1.weight" in s_state and "backbone.bottom_up.res2.0.conv3.weight" in t_state
    assert "backbone.bottom_up.res2.0.conv3.weight" not in s_state
    for evaluated in (results[1], results[3]):
        assert set(evaluated["bbox"]) >= {"AP", "AP50", "AP75"}
    out = capsys.readouterr().out
    assert out.count("bbox AP ") >= 2
    assert os.path.isfile(tmp_path / "output" / "custom" / "student" / "inference" / "coco_instances_results.json")
