"""Mask R-CNN and RetinaNet students through train_net.py on generated shapes with polygon masks:
each trains a few iterations from a teacher file, resumes bit-exactly after a kill, and is
evaluated by detectron2's COCOEvaluator (bbox, and segm for a mask student) with --eval-only.

The polygons are written here: each shape's box rectangle (the shapes generator's own polygons
are not needed to exercise the mask head, the evaluator and the distillation parts).
"""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import train_net  # noqa: E402
from deepkd_det.det.config import resolve_teacher_cfg  # noqa: E402
from deepkd_det.det.data import generate_shapes_dataset, shapes_split_paths  # noqa: E402
from deepkd_det.det.engine import DeepKDTrainer  # noqa: E402
from tests.det.test_cli_errors import _fails  # noqa: E402
from tests.det.test_engine import _Crash  # noqa: E402
from tests.det.tiny import get_tiny_cfg, get_tiny_mask_cfg, get_tiny_retinanet_cfg  # noqa: E402

K = 3


@pytest.fixture(scope="module")
def mask_data(tmp_path_factory):
    """``DATASETS.REGISTER`` entries of the shapes splits with one rectangle polygon per object."""
    root = tmp_path_factory.mktemp("shapes_masks")
    generate_shapes_dataset(str(root), num_train=8, num_val=2, image_size=64, seed=0)
    entries = []
    for split in ("train", "val"):
        json_file, image_dir = shapes_split_paths(str(root), split)
        with open(json_file) as f:
            coco = json.load(f)
        assert coco["annotations"]
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            ann["area"] = w * h
        out = root / f"{split}_polygons.json"
        out.write_text(json.dumps(coco))
        entries.append([f"h5_polygons_{split}", str(out), image_dir])
    return entries


def _retinanet():
    """RetinaNet student distilled by sigmoid DeepKD-DKD and DiffKD (FPN and head outputs)."""
    cfg = get_tiny_retinanet_cfg(num_classes=K, dense="DKD", deepkd=True, diffkd_outputs=("cls", "reg"))
    cfg.MODEL.RESNETS.NORM = "BN"  # trained from scratch
    cfg.KD.DIFFKD.IN_FEATURES = ["p5", "p6"]  # (and every head level's outputs)
    return cfg


def _mask_student():
    """Mask R-CNN student distilled by DeepKD-DKD on the box head from a Mask R-CNN teacher."""
    cfg = get_tiny_mask_cfg(num_classes=K, kd_type="DKD", deepkd=True)
    cfg.MODEL.RESNETS.NORM = "BN"
    return cfg


def _faster_student_of_mask_teacher():
    """Faster R-CNN student of a Mask R-CNN teacher: DeepKD-DKD, DiffKD and box-regression KD."""
    cfg = get_tiny_mask_cfg(num_classes=K, kd_type="DKD", deepkd=True, student_mask=False)
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.KD.DIFFKD.ENABLED, cfg.KD.DIFFKD.IN_FEATURES, cfg.KD.DIFFKD.INFERENCE_STEPS = True, ["p5"], 2
    return cfg


def _write_config_and_teacher(make, tmp_path):
    cfg = make()
    cfg.TEACHER.MODEL.RESNETS.NORM = "GN"  # a random teacher's maps at a trained one's scale
    cfg.DEEPKD.TOPK.MODE, cfg.DEEPKD.TOPK.K_START = "linear", 2  # the schedule's K moves during the run
    torch.manual_seed(1)
    teacher = build_model(resolve_teacher_cfg(cfg))
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    cfg.TEACHER.ALLOW_RANDOM_INIT = False
    cfg.TEACHER.MODEL.WEIGHTS = str(tmp_path / "teacher.pth")
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    return path


def _args(config, out, data, *opts, resume=False, eval_only=False):
    argv = ["--config-file", str(config)] + (["--resume"] if resume else []) + (["--eval-only"] if eval_only else [])
    tiny = [
        "OUTPUT_DIR", str(out), "SEED", "0",
        "DATASETS.REGISTER", json.dumps(data).replace('"', "'"),
        "DATASETS.TRAIN", "('h5_polygons_train',)", "DATASETS.TEST", "('h5_polygons_val',)" if eval_only else "()",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.CHECKPOINT_PERIOD", "1",
        "TEST.EVAL_PERIOD", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
    ]
    return train_net.parse_args(argv + tiny + [str(o) for o in opts])


def _trainer(args):
    trainer = DeepKDTrainer(train_net.setup(args))
    trainer.resume_or_load(resume=args.resume)
    return trainer


CASES = {
    "retinanet-diffkd-deepkd": (_retinanet, ("bbox",), {"loss_dense_tckd", "loss_dense_nckd", "loss_diffkd_dense_kd"}),
    "mask-rcnn-deepkd-dkd": (_mask_student, ("bbox", "segm"), {"loss_tckd", "loss_nckd", "loss_mask"}),
    "faster-rcnn-of-mask-teacher": (_faster_student_of_mask_teacher, ("bbox",), {"loss_tckd", "loss_regkd"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_trains_resumes_exactly_and_is_evaluated(case, tmp_path, mask_data, capsys):
    make, tasks, losses = CASES[case]
    config = _write_config_and_teacher(make, tmp_path)

    whole = tmp_path / "whole"
    train_net.main(_args(config, whole, mask_data, "SOLVER.CHECKPOINT_PERIOD", "100"))  # the final weights only
    with open(whole / "metrics.json") as f:
        logged = [json.loads(line) for line in f if line.strip()]
    assert losses <= set(logged[-1]) and logged[-1]["iteration"] == 1

    parts = tmp_path / "parts"
    first = _trainer(_args(config, parts, mask_data))
    first.register_hooks([_Crash(1)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (parts / "last_checkpoint").read_text() == "model_0000000.pth"
    resumed = _trainer(_args(config, parts, mask_data, resume=True))
    assert resumed.start_iter == 1
    resumed.train()
    a = torch.load(whole / "model_final.pth", weights_only=True)
    b = torch.load(parts / "model_final.pth", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert not any(k.startswith("teacher.") for k in a["model"])  # the teacher is read from its file
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    mid = torch.load(parts / "model_0000000.pth", weights_only=True)["model"]
    assert any(not torch.equal(mid[k], b["model"][k]) for k in b["model"])  # the last step moved weights

    capsys.readouterr()
    results = train_net.main(_args(config, tmp_path / "eval", mask_data, "MODEL.WEIGHTS", whole / "model_final.pth",
                                   eval_only=True))
    assert set(results) == set(tasks)
    for task in tasks:
        ap = results[task]["AP"]
        assert math.isfinite(ap) and 0.0 <= ap <= 100.0, (task, ap)
    assert f"bbox AP {results['bbox']['AP']:.2f}" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "eval" / "inference" / "coco_instances_results.json")


@pytest.mark.parametrize("make", [_retinanet, _faster_student_of_mask_teacher])
def test_a_missing_teacher_file_of_any_part_is_named_before_anything_is_written(make, tmp_path, mask_data):
    cfg = make()
    cfg.KD.TYPE = "NONE"  # dense parts / DiffKD alone: the teacher is still built from its file
    cfg.DEEPKD.ENABLED = False
    cfg.KD.DIFFKD.ENABLED, cfg.KD.DIFFKD.REG_WEIGHT = True, 0.0
    cfg.KD.DIFFKD.IN_FEATURES = ["p5"]
    cfg.TEACHER.ALLOW_RANDOM_INIT = False
    cfg.TEACHER.MODEL.WEIGHTS = str(tmp_path / "lost_teacher.pth")
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    with pytest.raises(FileNotFoundError, match=r"TEACHER.MODEL.WEIGHTS '.*lost_teacher\.pth' does not exist"):
        train_net.setup(_args(config, tmp_path / "out", mask_data))
    assert not (tmp_path / "out").exists()


def test_unpairable_heads_end_the_command_line_with_one_line(tmp_path, mask_data, capsys):
    cfg = get_tiny_cfg(num_classes=K, kd_type="DKD")  # logits of the R-CNN box head ...
    cfg.TEACHER.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"  # ... of a teacher with three
    cfg.TEACHER.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    argv = ["--config-file", str(config)] + [str(a) for a in vars(_args(config, tmp_path / "out", mask_data))["opts"]]
    _fails(capsys, argv, "KD.TYPE 'DKD'", "GeneralizedRCNN with StandardROIHeads",
           "GeneralizedRCNN with CascadeROIHeads", "cascade stage")
    assert not list((tmp_path / "out").glob("*.pth"))
