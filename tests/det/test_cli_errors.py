"""train_net.py's command line on bad input: one line naming the key or file, exit code 1, no
traceback (unless --debug / DEEPKD_DEBUG=1), and nothing already in OUTPUT_DIR changed."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import train_net  # noqa: E402
from deepkd_det.det.config import add_deepkd_config  # noqa: E402
from deepkd_det.det.data import add_data_config, generate_shapes_dataset, shapes_split_paths  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "DEEPKD" / "demo"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A generated COCO set (3 categories, 64 px): ``(train json, train images, val json, val images)``."""
    root = str(tmp_path_factory.mktemp("coco"))
    generate_shapes_dataset(root, num_train=4, num_val=2, image_size=64, seed=0)
    return (*shapes_split_paths(root, "train"), *shapes_split_paths(root, "val"))


@pytest.fixture
def out(tmp_path):
    """An OUTPUT_DIR with the files of an earlier run in it."""
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 1}, out / "model_0000001.pth")
    (out / "last_checkpoint").write_text("model_0000001.pth")
    (out / "metrics.json").write_text(json.dumps({"iteration": 1, "total_loss": 1.5}) + "\n")
    (out / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 1\n")
    (out / "log.txt").write_text("an earlier run\n")
    return out


RUN_FILES = ("model_0000001.pth", "last_checkpoint", "metrics.json")


def _digest(out: Path, names=RUN_FILES + ("config.yaml", "log.txt")):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()
            and p.name in names}


def _argv(config, out, train_json, train_dir, val_json=None, val_dir=None, *opts):
    register = [["own_train", str(train_json), str(train_dir)]]
    if val_json:
        register.append(["own_val", str(val_json), str(val_dir)])
    return ["--config-file", str(config), "OUTPUT_DIR", str(out),
            "DATASETS.REGISTER", repr(register), "DATASETS.TRAIN", "('own_train',)",
            "DATASETS.TEST", "('own_val',)" if val_json else "()",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)",
            "SOLVER.CHECKPOINT_PERIOD", "100", *[str(o) for o in opts]]


def _rebind_log_streams(stream):
    """detectron2's setup_logger caches its console handlers, bound to the sys.stdout of the
    moment: in-process runs under capsys must not leave them on a stream that gets closed.
    Only those plain console handlers: pytest's own capture handlers (StreamHandler subclasses
    that can sit on these loggers too) must keep their StringIO."""
    import logging

    for name in ("detectron2", "fvcore", "d2", "deepkd_det"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.stream = stream  # (setStream would flush the old one, maybe closed)


def _fails(capsys, argv, *expected):
    _rebind_log_streams(sys.stdout)
    try:
        rc = train_net.cli(argv)
    finally:
        _rebind_log_streams(sys.__stdout__)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1, err
    assert "Traceback" not in err, err
    # One error line, the last one (other lines: library warnings from the logger, if any).
    assert [line for line in lines if "error:" in line] == lines[-1:], err
    assert lines[-1].startswith("train_net.py: error: "), err
    for text in expected:
        assert text in lines[-1], (text, lines[-1])
    return lines[-1]


def _edited_json(tmp_path, train_json, edit, name="edited.json"):
    with open(train_json) as f:
        data = json.load(f)
    data = copy.deepcopy(data)
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_config_errors_are_one_line_naming_the_key(tmp_path, coco, out, capsys):
    before = _digest(out)
    t = DEMO / "teacher.yaml"
    _fails(capsys, _argv(t, out, *coco[:2], None, None, "FOO.BAR", "1"), "command line", "FOO.BAR")
    _fails(capsys, _argv(t, out, *coco[:2], None, None, "SOLVER.MAX_ITER", "abc"), "SOLVER.MAX_ITER")
    _fails(capsys, _argv(t, out, *coco[:2], None, None, "SOLVER.GAMMA"), "'SOLVER.GAMMA' has no value")
    _fails(capsys, _argv(t, out, *coco[:2], None, None, "SOLVER.STEPS", "(4,)"), "SOLVER.STEPS", "SOLVER.MAX_ITER=4")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"_BASE_: {t}\nSOLVER:\n  NOT_A_KEY: 1\n")
    _fails(capsys, _argv(bad_yaml, out, *coco[:2]), "bad.yaml", "SOLVER.NOT_A_KEY")
    _fails(capsys, _argv(tmp_path / "absent.yaml", out, *coco[:2]), "--config-file", "absent.yaml")
    # The top-k schedule never asks for K = 1 when there are 2 or more non-target classes.
    _fails(capsys, _argv(DEMO / "student-deepkd-dkd.yaml", out, *coco[:2], None, None, "DEEPKD.TOPK.K_START", "1"),
           "DEEPKD.TOPK K_START = 1", "always zero")
    assert _digest(out) == before


def test_weight_files_are_checked_before_the_build(tmp_path, coco, out, capsys):
    before = _digest(out)
    s = DEMO / "student-dkd.yaml"
    _fails(capsys, _argv(s, out, *coco[:2], None, None, "TEACHER.MODEL.WEIGHTS", tmp_path / "gone.pth"),
           "TEACHER.MODEL.WEIGHTS", "gone.pth", "does not exist", "--resume")
    text = tmp_path / "teacher.txt"
    text.write_text("not a model\n")
    _fails(capsys, _argv(s, out, *coco[:2], None, None, "TEACHER.MODEL.WEIGHTS", text),
           "TEACHER.MODEL.WEIGHTS", "teacher.txt", "not a checkpoint")
    _fails(capsys, _argv(DEMO / "teacher.yaml", out, *coco[:2], None, None, "MODEL.WEIGHTS", tmp_path / "w.pth"),
           "MODEL.WEIGHTS", "w.pth")
    assert _digest(out) == before


def test_dataset_errors_name_the_json(tmp_path, coco, out, capsys):
    before = _digest(out)
    t = DEMO / "teacher.yaml"
    train_json, train_dir, val_json, val_dir = coco
    # Class count against the json's 3 categories, both sides, in training and evaluation.
    _fails(capsys, _argv(t, out, *coco, "MODEL.ROI_HEADS.NUM_CLASSES", "2"),
           "MODEL.ROI_HEADS.NUM_CLASSES=2", "3 categories", os.path.basename(train_json))
    _fails(capsys, _argv(t, out, *coco, "MODEL.ROI_HEADS.NUM_CLASSES", "5", "--eval-only"),
           "MODEL.ROI_HEADS.NUM_CLASSES=5", "'own_val'", "3 categories")

    def negative_width(d):
        d["annotations"][0]["bbox"] = [40, 30, -14, 14]

    def outside(d):
        d["annotations"][1]["bbox"] = [50, 10, 40, 20]  # 64 px wide images

    def lost_image(d):
        d["images"][0]["file_name"] = "not_there.png"

    for edit, texts in ((negative_width, ["non-positive width", "[40, 30, -14, 14]"]),
                        (outside, ["outside the 64x64 image"]), (lost_image, ["not_there.png", "image folder"])):
        path = _edited_json(tmp_path, train_json, edit)
        _fails(capsys, _argv(t, out, path, train_dir), "edited.json", *texts)
    broken = tmp_path / "broken.json"
    broken.write_text(Path(train_json).read_text()[:-20])
    _fails(capsys, _argv(t, out, broken, train_dir), "broken.json", "not valid JSON")

    # Masks: a malformed polygon always; a missing segmentation when the detector has a mask head.
    def short_polygon(d):
        d["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]

    def unsegmented(d):
        del d["annotations"][1]["segmentation"]

    _fails(capsys, _argv(t, out, _edited_json(tmp_path, train_json, short_polygon, "poly.json"), train_dir),
           "poly.json", "at least 3 points")
    no_mask = _edited_json(tmp_path, train_json, unsegmented, "nomask.json")
    _fails(capsys, _argv(t, out, no_mask, train_dir, None, None, "MODEL.MASK_ON", "True"),
           "MODEL.MASK_ON", "nomask.json", "without a 'segmentation'")
    # RetinaNet counts its classes in MODEL.RETINANET.NUM_CLASSES (ROI_HEADS plays no part).
    _fails(capsys, _argv(t, out, *coco, "MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.RETINANET.NUM_CLASSES", "2"),
           "MODEL.RETINANET.NUM_CLASSES=2", "3 categories")
    assert _digest(out) == before


def test_inputs_a_new_user_met_are_refused_at_start_up(tmp_path, coco, out, capsys):
    """A yaml that does not parse or is a list; a training json without annotations; a truncated
    image or one of another size than its json entry; MODEL.WEIGHTS a folder; OUTPUT_DIR under a
    file. Each: one line naming the file or key, before OUTPUT_DIR is touched."""
    before = _digest(out)
    t = DEMO / "teacher.yaml"
    train_json, train_dir, val_json, val_dir = coco
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text(f"_BASE_: {t}\nSOLVER:\n  BASE_LR: [0.01\n")
    _fails(capsys, _argv(syntax, out, *coco[:2]), "syntax.yaml:4:", "not valid YAML")
    listed = tmp_path / "listed.yaml"
    listed.write_text("- SOLVER.BASE_LR\n- 0.01\n")
    _fails(capsys, _argv(listed, out, *coco[:2]), "listed.yaml", "top level is a list")

    def no_annotations(d):
        d["annotations"] = []

    _fails(capsys, _argv(t, out, _edited_json(tmp_path, train_json, no_annotations, "empty.json"), train_dir),
           "'own_train'", "empty.json", "no image has an annotation")

    def other_size(d):
        d["images"][1]["width"] = 80

    _fails(capsys, _argv(t, out, _edited_json(tmp_path, train_json, other_size, "sized.json"), train_dir),
           "sized.json", "64x64 pixels, the json says 80x64")
    images = tmp_path / "images"
    images.mkdir()
    for name in os.listdir(train_dir):
        (images / name).write_bytes((Path(train_dir) / name).read_bytes())
    first = sorted(os.listdir(images))[0]
    whole = (images / first).read_bytes()
    (images / first).write_bytes(whole[: len(whole) * 2 // 3])
    _fails(capsys, _argv(t, out, train_json, images), first, "truncated")
    _fails(capsys, _argv(t, out, *coco[:2], None, None, "MODEL.WEIGHTS", tmp_path), "MODEL.WEIGHTS", "is a directory")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _fails(capsys, _argv(t, a_file / "run", *coco[:2]), "OUTPUT_DIR", "a_file", "not a folder")
    assert _digest(out) == before


def test_eval_only_refuses_a_checkpoint_of_another_class_count(tmp_path, coco, out, capsys):
    # A whole detector of the demo teacher's architecture, trained for 5 classes: with its backbone
    # (a file of the heads alone is refused earlier, by the student backbone check).
    cfg = get_cfg()
    add_deepkd_config(cfg)
    add_data_config(cfg)
    cfg.merge_from_file(str(DEMO / "teacher.yaml"))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    cfg.MODEL.DEVICE = "cpu"
    weights = tmp_path / "five_classes.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    # (a check after the model is built: the evaluation's config.yaml and log.txt are written by then)
    before = _digest(out, RUN_FILES)
    _fails(capsys, _argv(DEMO / "teacher.yaml", out, *coco, "MODEL.WEIGHTS", weights, "--eval-only"),
           "MODEL.WEIGHTS does not fit", "trained for 5 classes", "cls_score.weight")
    assert _digest(out, RUN_FILES) == before


def test_options_after_the_overrides_still_count(tmp_path, coco):
    args = train_net.parse_args(_argv(DEMO / "teacher.yaml", tmp_path / "o", *coco[:2], None, None,
                                      "SOLVER.MAX_ITER", "6", "--resume"))
    cfg = train_net.setup(args)
    assert args.resume and cfg.SOLVER.MAX_ITER == 6


def test_debug_shows_the_traceback(coco, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="FOO.BAR"):
        train_net.cli(_argv(DEMO / "teacher.yaml", tmp_path / "o", *coco[:2], None, None, "FOO.BAR", "1", "--debug"))


def test_command_line_process_prints_one_line(tmp_path, coco):
    """The real process, on an error found after the model is built (a damaged checkpoint named by
    last_checkpoint, --resume typed after the overrides): exit code 1, one line, no traceback."""
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {"w": torch.ones(100)}, "iteration": 1}, out / "model_0000001.pth")
    with open(out / "model_0000001.pth", "r+b") as f:
        f.truncate(80)  # a file cut short (copied while written, disk full)
    (out / "last_checkpoint").write_text("model_0000001.pth")
    (out / "metrics.json").write_text(json.dumps({"iteration": 1, "total_loss": 1.5}) + "\n")
    before = _digest(out, RUN_FILES)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("DEEPKD_DEBUG", None)
    argv = [sys.executable, str(REPO / "train_net.py"), *_argv(DEMO / "teacher.yaml", out, *coco[:2], None, None,
                                                              "--resume")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train_net.py: error: --resume"), proc.stderr
    assert "last_checkpoint" in last and "model_0000001.pth" in last and "damaged" in last
    assert _digest(out, RUN_FILES) == before


def test_a_shrunk_batch_at_the_files_learning_rate_is_warned_about():
    from deepkd_det.det.config import get_deepkd_cfg, lr_batch_warning

    cfg = get_deepkd_cfg()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR = 2, 0.02  # the file said 16 images at lr 0.02
    note = lr_batch_warning(cfg, 16, 0.02)
    assert "SOLVER.IMS_PER_BATCH is 2" in note and "SOLVER.BASE_LR 0.0025" in note
    assert lr_batch_warning(cfg, 16, 0.04) is None  # the lr was set as well: the user's choice
    assert lr_batch_warning(cfg, 2, 0.02) is None
