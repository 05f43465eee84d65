"""The distilled detector leaves the project (tools/export_student.py, deepkd_det/det/export.py):

- ``--eval-only`` of a ReviewKD and a DiffKD student with no teacher file anywhere: exit 0, the
  training run's last evaluation exactly (AP line and every detection);
- the exported folder loads in a process where ``import deepkd_det`` raises, through stock
  detectron2's ``DefaultPredictor``, with outputs identical to the project's evaluation model;
  TorchScript equal to eager; ONNX within 1e-4 (skipped, with the reason, without onnxruntime);
- a MobileNetV2-FPN student through the one shipped module; the config is stock detectron2's;
- without onnx the ONNX export is refused with one line, before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402

import train_net  # noqa: E402
from deepkd_det.core.deploy import ONNX_TOLERANCE, largest_difference, worst  # noqa: E402
from deepkd_det.det.config import get_deepkd_cfg, student_only_cfg  # noqa: E402
from deepkd_det.det.data import generate_shapes_dataset, shapes_split_paths  # noqa: E402
from deepkd_det.det.engine import DeepKDTrainer  # noqa: E402
from deepkd_det.det.export import preprocess, stock_config  # noqa: E402
from deepkd_det.det.modeling.mobilenetv2_fpn import (  # noqa: E402
    MOBILENETV2_DEFAULTS,
    add_mobilenetv2_config,
)
from deepkd_det.det.weights.checkpoint import EvalCheckpointer  # noqa: E402
from tests.no_deepkd import load_tool, run_without_deepkd  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "DEEPKD" / "demo"
HAS_ONNX = all(__import__("importlib").util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))

# Tiny runs on 64 px shapes. FrozenBN and a per-channel PIXEL_STD keep a 3-iteration detector's
# activations moderate, and SCORE_THRESH_TEST 0 keeps its detections: the checks compare real boxes.
TINY = [
    "DATASETS.SHAPES.NUM_TRAIN", "8", "DATASETS.SHAPES.NUM_VAL", "2", "DATASETS.SHAPES.IMAGE_SIZE", "64",
    "DATASETS.TEST", "('deepkd_shapes_val',)",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.STEPS", "(2,)", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "3",
]
STUDENTS = {"reviewkd": "student-reviewkd-deepkd.yaml", "diffkd": "student-diffkd.yaml"}


def _argv(config, out, shapes_root, *opts):
    return ["--config-file", str(config), *TINY, "DATASETS.SHAPES.ROOT", shapes_root, "OUTPUT_DIR", str(out),
            *[str(o) for o in opts]]


def _train(argv):
    """Train; the results of the run's last evaluation (its EvalHook at MAX_ITER)."""
    trainer = DeepKDTrainer(train_net.setup(default_argument_parser().parse_args(argv)))
    trainer.resume_or_load(resume=False)
    trainer.train()
    return getattr(trainer, "_last_eval_results", None)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    generate_shapes_dataset(root, num_train=8, num_val=2, image_size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_root):
    """The ReviewKD and DiffKD demo students, 3 iterations each from a 2-iteration teacher, with
    their last evaluation; then the teacher's folder is deleted: no teacher file exists any more."""
    base = tmp_path_factory.mktemp("runs")
    teacher_dir = base / "teacher"
    _train(_argv(DEMO / "teacher.yaml", teacher_dir, shapes_root, "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)",
                "TEST.EVAL_PERIOD", "0"))
    teacher = teacher_dir / "model_final.pth"
    out = {}
    for name, config in STUDENTS.items():
        results = _train(_argv(DEMO / config, base / name, shapes_root, "TEACHER.MODEL.WEIGHTS", teacher))
        assert results and "bbox" in results
        out[name] = {"dir": base / name, "config": DEMO / config, "results": results, "teacher": teacher}
    shutil.rmtree(teacher_dir)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_eval_only_needs_no_teacher_and_matches_the_last_evaluation(runs, name, shapes_root, tmp_path, capsys):
    run = runs[name]
    assert not run["teacher"].exists()
    # The config still names the (now absent) teacher file and turns ReviewKD / DiffKD on.
    argv = _argv(run["config"], tmp_path / "eval", shapes_root, "TEACHER.MODEL.WEIGHTS", run["teacher"],
                 "MODEL.WEIGHTS", run["dir"] / "model_final.pth", "--eval-only")
    assert train_net.cli(argv) == 0
    printed = capsys.readouterr().out
    assert train_net.format_bbox_ap(run["results"]) in printed
    trained = json.loads((run["dir"] / "inference" / "coco_instances_results.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "inference" / "coco_instances_results.json").read_text())
    assert len(trained) > 0 and evaluated == trained  # every detection, box and score


def _project_outputs(config_yaml, weights, image_bgr):
    """What ``train_net.py --eval-only`` evaluates: the student alone, loaded by EvalCheckpointer,
    on DefaultPredictor's input (the image resized, at its original size out)."""
    cfg = get_deepkd_cfg()
    from deepkd_det.det.data import add_data_config

    add_data_config(cfg)
    cfg.merge_from_file(str(config_yaml))
    cfg = student_only_cfg(cfg)
    model = DeepKDTrainer.build_model(cfg).eval()
    EvalCheckpointer(model).load(str(weights))
    h, w = image_bgr.shape[:2]
    with torch.no_grad():
        inst = model([{"image": preprocess(cfg, image_bgr), "height": h, "width": w}])[0]["instances"]
    return [inst.pred_boxes.tensor, inst.scores, inst.pred_classes]


# Run in the process without deepkd_det: stock detectron2's DefaultPredictor on config.yaml +
# model.pth, the same model's eager inference on DefaultPredictor's resized input, TorchScript and
# (when installed) onnxruntime on that input.
DEPLOYER = """
import sys
import torch, torchvision  # torchvision registers the nms / roi_align ops TorchScript calls
from detectron2.config import get_cfg
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
folder, sample, out = sys.argv[1:4]
sys.path.insert(0, folder)
if len(sys.argv) > 4:
    import mobilenetv2_fpn  # noqa: F401  (the shipped backbone registration)
cfg = get_cfg()
cfg.merge_from_file(folder + "/config.yaml")
cfg.MODEL.WEIGHTS = folder + "/model.pth"
predictor = DefaultPredictor(cfg)
image = read_image(sample, format="BGR")
inst = predictor(image)["instances"]
rgb_or_bgr = image[:, :, ::-1] if predictor.input_format == "RGB" else image
resized = predictor.aug.get_transform(rgb_or_bgr).apply_image(rgb_or_bgr)
x = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
with torch.no_grad():
    eager = predictor.model.inference([{"image": x}], do_postprocess=False)[0]
    traced = torch.jit.load(folder + "/model.ts")(x)
res = {"predictor": [inst.pred_boxes.tensor, inst.scores, inst.pred_classes],
       "eager": [eager.pred_boxes.tensor, eager.scores, eager.pred_classes], "torchscript": list(traced)}
import os
try:
    import onnxruntime
except ImportError:
    onnxruntime = None
res["onnx"] = None
if onnxruntime is not None and os.path.exists(folder + "/model.onnx"):
    session = onnxruntime.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
    res["onnx"] = [torch.from_numpy(o) for o in session.run(None, {"image": x.numpy()})]
torch.save(res, out)
"""


def _sample_file(shapes_root):
    _, image_dir = shapes_split_paths(shapes_root, "val")
    return os.path.join(image_dir, sorted(os.listdir(image_dir))[0])


@pytest.fixture(scope="module")
def exported(runs, shapes_root, tmp_path_factory):
    """The ReviewKD student exported (--run), then loaded without deepkd_det."""
    tool = load_tool("export_student")
    out = tmp_path_factory.mktemp("export") / "reviewkd"
    sample = _sample_file(shapes_root)
    formats = "torchscript,onnx" if HAS_ONNX else "torchscript"
    assert tool.main(["--run", str(runs["reviewkd"]["dir"]), "--output", str(out), "--sample", sample,
                      "--formats", formats]) == 0
    result = out / "deployer.pt"
    run_without_deepkd(DEPLOYER, out, sample, result, cwd=out)
    return {"dir": out, "sample": sample, "got": torch.load(result, weights_only=True), "run": runs["reviewkd"]}


@pytest.mark.slow
def test_exported_detector_loads_in_stock_detectron2_without_deepkd(exported):
    out, run = exported["dir"], exported["run"]
    info = json.loads((out / "deploy.json").read_text())
    assert info["parity"]["ok"] and info["parity"]["detections"] > 0
    assert info["class_names"] == ["circle", "square", "triangle"]
    assert {"TEACHER", "KD", "DEEPKD", "DATASETS.REGISTER", "DATASETS.SHAPES", "SOLVER.AMP.DTYPE"} <= set(
        info["source"]["dropped_config_keys"])
    assert info["source"]["left_behind"]["model_parts"] == ["reviewkd_head"]
    # Weights only: the student's tensors, no head, no trainer state; a quarter of the checkpoint or less.
    saved = torch.load(out / "model.pth", weights_only=True)
    assert list(saved) == ["model"]
    assert not [k for k in saved["model"] if k.startswith(("teacher.", "reviewkd_head.", "diffkd."))]
    assert os.path.getsize(out / "model.pth") < 0.3 * os.path.getsize(run["dir"] / "model_final.pth")
    stock = get_cfg()
    stock.merge_from_file(str(out / "config.yaml"))  # stock detectron2, nothing added
    assert stock.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"

    got = exported["got"]
    image = read_image(exported["sample"], format="BGR")
    project = _project_outputs(run["dir"] / "config.yaml", run["dir"] / "model_final.pth", image)
    assert project[1].numel() > 0
    for a, b in zip(project, got["predictor"]):  # DefaultPredictor == the project's evaluation, bit for bit
        assert torch.equal(a, b)
    for a, b in zip(got["eager"], got["torchscript"]):  # TorchScript == eager, bit for bit
        assert torch.equal(a, b)


@pytest.mark.slow
def test_exported_detector_onnx_within_tolerance(exported):
    if not HAS_ONNX:
        pytest.skip("onnx / onnxruntime are not installed (optional extra: pip install -e '.[export]')")
    onnx_out = exported["got"]["onnx"]
    assert onnx_out is not None, "onnxruntime importable here but not in the deployer's process"
    figures = largest_difference(exported["got"]["eager"], onnx_out, ("boxes", "scores", "classes"))
    assert exported["got"]["eager"][1].numel() > 0
    assert worst(figures) <= ONNX_TOLERANCE, figures
    assert torch.equal(exported["got"]["eager"][2], onnx_out[2])


MV2_CONFIG = """_BASE_: "{base}"
MODEL:
  BACKBONE:
    NAME: "build_mobilenetv2_fpn_backbone"
  FPN:
    IN_FEATURES: ["m2", "m3", "m4", "m5"]
  PIXEL_STD: [57.375, 57.12, 58.395]
  ROI_HEADS:
    SCORE_THRESH_TEST: 0.0
INPUT:
  MIN_SIZE_TEST: 64
  MAX_SIZE_TEST: 96
"""


@pytest.mark.slow
def test_mobilenetv2_student_deploys_with_the_one_shipped_module(tmp_path, shapes_root):
    config = tmp_path / "mv2.yaml"
    config.write_text(MV2_CONFIG.format(base=DEMO / "Base-Shapes.yaml"))
    cfg = get_deepkd_cfg()
    from deepkd_det.det.data import add_data_config

    add_data_config(cfg)
    cfg.merge_from_file(str(config))
    torch.manual_seed(0)
    weights = tmp_path / "mv2.pth"
    torch.save({"model": DeepKDTrainer.build_model(cfg).state_dict()}, weights)

    out = tmp_path / "export"
    sample = _sample_file(shapes_root)
    tool = load_tool("export_student")
    formats = "torchscript,onnx" if HAS_ONNX else "torchscript"
    assert tool.main(["--config-file", str(config), "--weights", str(weights), "--output", str(out),
                      "--sample", sample, "--formats", formats]) == 0
    assert (out / "mobilenetv2_fpn.py").is_file()
    assert "MOBILENETV2" not in (out / "config.yaml").read_text()  # defaults: a stock config
    result = out / "deployer.pt"
    run_without_deepkd(DEPLOYER, out, sample, result, "mv2", cwd=out)
    got = torch.load(result, weights_only=True)
    project = _project_outputs(config, weights, read_image(sample, format="BGR"))
    assert project[1].numel() > 0
    for a, b in zip(project, got["predictor"]):
        assert torch.equal(a, b)
    for a, b in zip(got["eager"], got["torchscript"]):
        assert torch.equal(a, b)
    if HAS_ONNX:
        assert worst(largest_difference(got["eager"], got["onnx"], ("boxes", "scores", "classes"))) <= ONNX_TOLERANCE


def test_stock_config_of_the_coco_pairs_and_mobilenetv2_settings():
    tool = load_tool("export_student")
    for name in ("DKD-R18-R101.yaml", "ReviewKD-MV2-R50.yaml", "DiffKD-DKD-R50-R101.yaml"):
        cfg = tool._det_cfg(str(REPO / "configs" / "DEEPKD" / name), [])
        plain, dropped = stock_config(cfg)
        assert plain.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        assert {"TEACHER", "KD", "DEEPKD", "DATASETS.REGISTER", "DATASETS.SHAPES", "SOLVER.AMP.DTYPE",
                "MODEL.MOBILENETV2"} <= set(dropped)
        stock = get_cfg()
        stock.merge_from_other_cfg(type(stock).load_cfg(plain.dump()))  # what merge_from_file does
        assert stock.MODEL.BACKBONE.NAME == cfg.MODEL.BACKBONE.NAME
        assert stock.MODEL.PIXEL_STD == cfg.MODEL.PIXEL_STD and stock.INPUT.FORMAT == cfg.INPUT.FORMAT
    # The shipped module's fallback equals the project's MODEL.MOBILENETV2 defaults ...
    project = get_deepkd_cfg().MODEL.MOBILENETV2
    assert {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in project.items()} == MOBILENETV2_DEFAULTS
    # ... and other settings are kept, for add_mobilenetv2_config + merge_from_file.
    cfg = tool._det_cfg(str(REPO / "configs" / "DEEPKD" / "ReviewKD-MV2-R50.yaml"), ["MODEL.MOBILENETV2.WIDTH_MULT", "0.5"])
    plain, dropped = stock_config(cfg)
    assert "MODEL.MOBILENETV2" not in dropped and plain.MODEL.MOBILENETV2.WIDTH_MULT == 0.5
    stock = get_cfg()
    add_mobilenetv2_config(stock)
    stock.merge_from_other_cfg(type(stock).load_cfg(plain.dump()))
    assert stock.MODEL.MOBILENETV2.WIDTH_MULT == 0.5


def test_onnx_export_without_onnx_is_refused_in_one_line(tmp_path):
    out = tmp_path / "export"
    code = ("import runpy, sys; sys.modules['onnx'] = None; "
            f"sys.argv = ['export_student.py', '--config-file', {str(DEMO / 'student-dkd.yaml')!r}, "
            f"'--weights', {str(tmp_path / 'w.pth')!r}, '--output', {str(out)!r}]; "
            f"runpy.run_path({str(REPO / 'tools' / 'export_student.py')!r}, run_name='__main__')")
    (tmp_path / "w.pth").write_bytes(b"PK")  # never read: the refusal comes first
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_student.py: error: the ONNX export needs onnx"), lines
    assert ".[export]" in lines[0] and "--formats torchscript" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("case", ["no_run", "run_and_config", "bad_format", "weights_of_another_model"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    out = tmp_path / "export"
    weights = tmp_path / "w.pth"
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(3, 3, 3, 3)}}, weights)
    config = str(DEMO / "student-dkd.yaml")
    argv, expected = {
        "no_run": (["--run", str(tmp_path / "nothing")], "is not a folder"),
        "run_and_config": (["--run", str(tmp_path), "--config-file", config], "exactly one of --run"),
        "bad_format": (["--config-file", config, "--weights", str(weights), "--formats", "tflite"], "--formats"),
        "weights_of_another_model": (["--config-file", config, "--weights", str(weights), "--formats", "torchscript"],
                                     "MODEL.WEIGHTS"),
    }[case]
    assert load_tool("export_student").main([*argv, "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # (Loggers an earlier in-process training set up may print "--- Logging error ---" blocks about
    # pytest's closed capture streams; the command's own output is its one last line.)
    ours = [line for line in err if line.startswith("export_student.py")]
    assert len(ours) == 1 and err[-1] == ours[0], err[-5:]
    assert ours[0].startswith("export_student.py: error: ") and expected in ours[0], ours
    assert not out.exists()
