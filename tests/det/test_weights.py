"""Teacher / student checkpoints: tools/make_kd_weights.py, release layouts, refusal of bad teachers."""

from __future__ import annotations

import argparse
import importlib.util
import pickle
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
import torchvision  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import deepkd_det.det.modeling  # noqa: E402,F401
from deepkd_det.det.modeling import TeacherWeightsError  # noqa: E402
from deepkd_det.det.weights.checkpoint import DeepKDCheckpointer
from deepkd_det.det.weights.layouts import mobilenetv2_to_backbone, read_checkpoint  # noqa: E402
from tests.det.tiny import STUDENT_MEAN, STUDENT_STD, get_tiny_cfg  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_kd_weights", ROOT / "tools" / "make_kd_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_kd_weights = _load_tool()


def _randomise_bn(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A torchvision ResNet-18 ImageNet-style state dict and a tiny trained-looking R-18-FPN teacher."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    _randomise_bn(tv)
    tv_state = tv.state_dict()
    torch.save(tv_state, d / "resnet18.pth")

    teacher = build_model(get_tiny_cfg(kd_type="NONE"))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))  # different from any fresh initialisation
        for name, b in teacher.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.save({"model": t_state, "iteration": 100}, d / "teacher.pth")

    out = d / "r18-r18.pth"
    rc = make_kd_weights.main(
        [
            "--teacher",
            str(d / "teacher.pth"),
            "--student",
            str(d / "resnet18.pth"),
            "--student-arch",
            "R-18",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    return {"dir": d, "tv": tv_state, "teacher": t_state, "combined": out}


def _torchvision_input(cfg):
    """The input torchvision ImageNet weights were trained with (the checkpointer checks it)."""
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = list(STUDENT_MEAN), list(STUDENT_STD)
    return cfg


def _kd_cfg(weights="", teacher_weights="", random_teacher=False):
    cfg = _torchvision_input(get_tiny_cfg(kd_type="DKD", random_teacher=random_teacher))
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.TEACHER.MODEL.WEIGHTS = str(teacher_weights)
    return cfg


def _assert_teacher_equals(model, t_state):
    own = model.teacher.state_dict()
    assert set(own) == set(t_state)
    for k, v in t_state.items():
        assert torch.equal(own[k], v), k


# Independent spelling of the torchvision -> detectron2 renaming, key by key.
TV_TO_D2 = {
    "conv1.weight": "stem.conv1.weight",
    "bn1.weight": "stem.conv1.norm.weight",
    "bn1.running_var": "stem.conv1.norm.running_var",
    "layer1.0.conv1.weight": "res2.0.conv1.weight",
    "layer1.1.bn2.bias": "res2.1.conv2.norm.bias",
    "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
    "layer2.0.downsample.1.running_mean": "res3.0.shortcut.norm.running_mean",
    "layer3.1.conv2.weight": "res4.1.conv2.weight",
    "layer4.0.bn1.running_mean": "res5.0.conv1.norm.running_mean",
    "layer4.1.bn2.weight": "res5.1.conv2.norm.weight",
}


def _tv_to_d2_full(key):
    """Full renaming written out again for the equality check over every tensor."""
    import re

    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[4:]
    layer, block, rest = re.match(r"layer(\d)\.(\d+)\.(.+)", key).groups()
    stage = f"res{int(layer) + 1}.{block}."
    if rest.startswith("downsample.0."):
        return stage + "shortcut." + rest[len("downsample.0.") :]
    if rest.startswith("downsample.1."):
        return stage + "shortcut.norm." + rest[len("downsample.1.") :]
    if rest.startswith("bn"):
        return stage + f"conv{rest[2]}.norm." + rest[4:]
    return stage + rest


def _assert_student_backbone_is_tv(model, tv_state):
    own = model.state_dict()
    for tv_key, d2_key in TV_TO_D2.items():
        assert torch.equal(own["backbone.bottom_up." + d2_key], tv_state[tv_key]), tv_key
    compared = 0
    for k, v in tv_state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(own["backbone.bottom_up." + _tv_to_d2_full(k)], v), k
        compared += 1
    bottom_up = [k for k in own if k.startswith("backbone.bottom_up.")]
    assert compared == len(bottom_up)  # every student backbone tensor came from torchvision


def test_make_kd_weights_output_loads_into_deepkd_rcnn(files):
    data = torch.load(files["combined"], weights_only=True)
    assert set(data) == {"model", "__author__"}
    keys = list(data["model"])
    assert not any(k.startswith(("backbone.bottom_up.fc", "fc.")) for k in keys)
    assert all(k.startswith(("teacher.", "backbone.bottom_up.")) for k in keys)

    # Build: the teacher comes from the teacher.* keys of MODEL.WEIGHTS, completely.
    model = build_model(_kd_cfg(weights=files["combined"]))
    _assert_teacher_equals(model, files["teacher"])

    # Load as the trainer does: no teacher key missing, student backbone = torchvision weights.
    incompatible = DeepKDCheckpointer(model)._load_model(
        DeepKDCheckpointer(model)._load_file(str(files["combined"]))
    )
    assert not [k for k in incompatible.missing_keys if k.startswith(("teacher.", "backbone.bottom_up."))]
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    _assert_student_backbone_is_tv(model, files["tv"])
    _assert_teacher_equals(model, files["teacher"])


@pytest.mark.parametrize("layout", ["torchvision-under-prefix", "torchvision-top-level", "d2-top-level"])
def test_release_layouts_load_with_no_missing_keys(files, tmp_path, layout):
    teacher = {"teacher." + k: v for k, v in files["teacher"].items()}
    tv = {k: v for k, v in files["tv"].items()}
    if layout == "torchvision-under-prefix":
        student = {"backbone.bottom_up." + k: v for k, v in tv.items()}
    elif layout == "torchvision-top-level":
        student = tv
    else:
        student = {
            _tv_to_d2_full(k): v for k, v in tv.items() if not k.startswith("fc.") and "num_batches" not in k
        }
    path = tmp_path / "release.pth"
    torch.save({**teacher, **student}, path)  # bare state dict, as some release files are

    model = build_model(_kd_cfg(weights=path))
    ckpt = DeepKDCheckpointer(model)
    incompatible = ckpt._load_model(ckpt._load_file(str(path)))
    assert not [k for k in incompatible.missing_keys if k.startswith(("teacher.", "backbone.bottom_up."))]
    _assert_student_backbone_is_tv(model, files["tv"])
    _assert_teacher_equals(model, files["teacher"])


def _write_without(state, drop, path):
    torch.save({"model": {k: v for k, v in state.items() if k != drop}}, path)


def test_missing_teacher_key_is_refused_with_its_name(files, tmp_path):
    combined = torch.load(files["combined"], weights_only=True)["model"]
    _write_without(combined, "teacher.roi_heads.box_predictor.bbox_pred.bias", tmp_path / "c.pth")
    with pytest.raises(TeacherWeightsError, match=r"missing[\s\S]*roi_heads\.box_predictor\.bbox_pred\.bias"):
        build_model(_kd_cfg(weights=tmp_path / "c.pth"))

    _write_without(files["teacher"], "backbone.bottom_up.res3.0.conv1.norm.bias", tmp_path / "t.pth")
    with pytest.raises(TeacherWeightsError, match=r"backbone\.bottom_up\.res3\.0\.conv1\.norm\.bias"):
        build_model(_kd_cfg(teacher_weights=tmp_path / "t.pth"))

    # The checkpointer refuses a file with an incomplete teacher part too.
    model = build_model(_kd_cfg(random_teacher=True))
    ckpt = DeepKDCheckpointer(model)
    with pytest.raises(TeacherWeightsError, match=r"roi_heads\.box_predictor\.bbox_pred\.bias"):
        ckpt.load(str(tmp_path / "c.pth"))


def test_unexpected_and_misshaped_teacher_keys_are_refused(files, tmp_path):
    state = dict(files["teacher"])
    state["roi_heads.mask_head.predictor.weight"] = torch.zeros(3, 3)
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(
        TeacherWeightsError, match=r"unexpected[\s\S]*roi_heads\.mask_head\.predictor\.weight"
    ):
        build_model(_kd_cfg(teacher_weights=tmp_path / "extra.pth"))

    cfg5 = get_tiny_cfg(num_classes=5, kd_type="NONE")
    torch.save({"model": build_model(cfg5).state_dict()}, tmp_path / "five.pth")
    with pytest.raises(TeacherWeightsError, match="has 5 classes but .*NUM_CLASSES=3"):
        build_model(_kd_cfg(teacher_weights=tmp_path / "five.pth"))


def test_teacher_without_weights_is_refused():
    with pytest.raises(TeacherWeightsError, match="no teacher weights"):
        build_model(_kd_cfg())


def test_model_zoo_pkl_teacher_loads(files, tmp_path):
    # detectron2 model-zoo format: numpy arrays, "__author__", and old non-state keys.
    model_state = {k: v.numpy() for k, v in files["teacher"].items()}
    model_state["pixel_mean"] = model_state["pixel_std"] = torch.zeros(3, 1, 1).numpy()
    with open(tmp_path / "model_final.pkl", "wb") as f:
        pickle.dump({"model": model_state, "__author__": "Detectron2 Model Zoo"}, f)
    model = build_model(_kd_cfg(teacher_weights=tmp_path / "model_final.pkl"))
    _assert_teacher_equals(model, files["teacher"])

    # Old files without any FrozenBN running statistic (folded into weight / bias): filled with
    # detectron2's mean 0 / var 1.
    bn = "backbone.bottom_up.res4.1.conv2.norm."
    legacy = {k: v for k, v in model_state.items() if not k.endswith(("running_mean", "running_var"))}
    with open(tmp_path / "legacy.pkl", "wb") as f:
        pickle.dump({"model": legacy, "__author__": "Detectron2 Model Zoo"}, f)
    own = build_model(_kd_cfg(teacher_weights=tmp_path / "legacy.pkl")).teacher.state_dict()
    assert torch.equal(own[bn + "running_mean"], torch.zeros(256))
    assert torch.equal(own[bn + "running_var"], torch.ones(256))
    assert torch.equal(own[bn + "weight"], files["teacher"][bn + "weight"])

    # A file that holds statistics but lacks some is refused by name: one layer, one running_var.
    for dropped in ((bn + "running_mean", bn + "running_var"), (bn + "running_var",)):
        partial = {k: v for k, v in model_state.items() if k not in dropped}
        with open(tmp_path / "partial.pkl", "wb") as f:
            pickle.dump({"model": partial, "__author__": "Detectron2 Model Zoo"}, f)
        with pytest.raises(TeacherWeightsError, match=r"missing[\s\S]*res4\.1\.conv2\.norm\.running_var"):
            build_model(_kd_cfg(teacher_weights=tmp_path / "partial.pkl"))

    out = tmp_path / "from_pkl.pth"
    assert (
        make_kd_weights.main(
            [
                "--teacher",
                str(tmp_path / "model_final.pkl"),
                "--student",
                str(files["dir"] / "resnet18.pth"),
                "--student-arch",
                "R-18",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    data = torch.load(out, weights_only=True)["model"]
    assert "teacher.pixel_mean" not in data
    for k, v in files["teacher"].items():
        assert torch.equal(data["teacher." + k], v)


# Independent spelling of torchvision -> tonylins (mdistiller MV2 student) names of a block.
TONYLINS_FROM_TV_EXPAND1 = {
    "conv.0.0": "conv.0",
    "conv.0.1": "conv.1",
    "conv.1": "conv.3",
    "conv.2": "conv.4",
}
TONYLINS_FROM_TV = {
    "conv.0.0": "conv.0",
    "conv.0.1": "conv.1",
    "conv.1.0": "conv.3",
    "conv.1.1": "conv.4",
    "conv.2": "conv.6",
    "conv.3": "conv.7",
}


def _tonylins_key(tv_key):
    """The d-li14 (tonylins) name of a torchvision MobileNetV2 key: its last 1x1 conv + BN
    (torchvision's features.18) is the top-level ``conv``, its linear layer ``classifier``."""
    if tv_key.startswith("features.18."):
        return "conv." + tv_key[len("features.18."):]
    if tv_key.startswith("classifier.1."):
        return "classifier." + tv_key[len("classifier.1."):]
    parts = tv_key.split(".")
    idx = int(parts[1])
    if idx == 0 or parts[2] != "conv":
        return tv_key
    table = TONYLINS_FROM_TV_EXPAND1 if idx == 1 else TONYLINS_FROM_TV
    for tv_mod, ty_mod in sorted(table.items(), key=lambda kv: -len(kv[0])):
        prefix = f"features.{idx}.{tv_mod}."
        if tv_key.startswith(prefix):
            return f"features.{idx}.{ty_mod}." + tv_key[len(prefix) :]
    raise AssertionError(tv_key)


def test_mobilenetv2_weights_conversion(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(weights=None)
    _randomise_bn(tv)
    tv_state = tv.state_dict()
    expected = {
        k: v
        for k, v in tv_state.items()
        if not k.startswith(("features.18.", "classifier.")) and not k.endswith("num_batches_tracked")
    }

    converted = mobilenetv2_to_backbone(tv_state)
    assert set(converted) == set(expected)
    tonylins = {_tonylins_key(k): v for k, v in tv_state.items()}
    assert "features.1.conv.3.weight" in tonylins and "features.2.conv.7.running_var" in tonylins
    assert "conv.1.running_var" in tonylins and "classifier.weight" in tonylins
    from_tonylins = mobilenetv2_to_backbone(tonylins)
    assert set(from_tonylins) == set(expected)
    for k, v in expected.items():
        assert torch.equal(converted[k], v) and torch.equal(from_tonylins[k], v), k

    # The MV2 student of a combined file gets torchvision's ImageNet weights unchanged.
    torch.save(tv_state, tmp_path / "mv2.pth")
    teacher = build_model(get_tiny_cfg(kd_type="NONE"))
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    combined = make_kd_weights.make_kd_weights(
        str(tmp_path / "teacher.pth"), str(tmp_path / "mv2.pth"), "MV2"
    )["model"]
    cfg = _torchvision_input(get_tiny_cfg(random_teacher=True))
    cfg.MODEL.BACKBONE.NAME = "build_mobilenetv2_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["m2", "m3", "m4", "m5"]
    model = build_model(cfg)
    bottom_up = model.backbone.bottom_up.state_dict()
    student = {
        k[len("backbone.bottom_up.") :]: v for k, v in combined.items() if k.startswith("backbone.bottom_up.")
    }
    assert set(student) == set(bottom_up)
    for k, v in expected.items():
        assert torch.equal(student[k], v)

    # A release-style file with the MV2 student in the tonylins layout loads into the backbone.
    release = {k: v for k, v in combined.items() if k.startswith("teacher.")}
    release.update({"backbone.bottom_up." + k: v for k, v in tonylins.items()})
    torch.save(release, tmp_path / "mv2-release.pth")
    ckpt = DeepKDCheckpointer(model)
    incompatible = ckpt._load_model(ckpt._load_file(str(tmp_path / "mv2-release.pth")))
    assert not [k for k in incompatible.missing_keys if k.startswith(("teacher.", "backbone.bottom_up."))]
    # its head (conv.*, classifier.*) is dropped as make_kd_weights drops it, not left unexpected
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys
    loaded = model.backbone.bottom_up.state_dict()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


def test_make_kd_weights_rejects_wrong_inputs(files, tmp_path):
    with pytest.raises(SystemExit, match="does not match the weights"):
        make_kd_weights.main(
            [
                "--teacher",
                str(files["dir"] / "teacher.pth"),
                "--student",
                str(files["dir"] / "resnet18.pth"),
                "--student-arch",
                "R-50",
                "--output",
                str(tmp_path / "x.pth"),
            ]
        )
    with pytest.raises(SystemExit, match="not a detectron2 detector checkpoint"):
        make_kd_weights.main(
            [
                "--teacher",
                str(files["dir"] / "resnet18.pth"),
                "--student",
                str(files["dir"] / "resnet18.pth"),
                "--student-arch",
                "R-18",
                "--output",
                str(tmp_path / "x.pth"),
            ]
        )
    assert not (tmp_path / "x.pth").exists()  # nothing half-written


def test_pth_files_are_read_weights_only(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(a=1)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights-only"):
        read_checkpoint(str(tmp_path / "pickled.pth"))


# ---------------------------------------------------------------- the trainer's full load

DEMO = ROOT / "configs" / "DEEPKD" / "demo"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from deepkd_det.det.data import generate_shapes_dataset

    root = str(tmp_path_factory.mktemp("shapes"))
    generate_shapes_dataset(root, num_train=4, num_val=2, image_size=64, seed=0)
    return root


def _demo_cfg(out, shapes_root, *opts):
    """The demo DKD student (R-18-FPN, FrozenBN in both backbones) through train_net's setup."""
    from detectron2.engine import default_argument_parser

    import train_net

    argv = ["--config-file", str(DEMO / "student-dkd.yaml"),
            "OUTPUT_DIR", str(out),
            "DATASETS.SHAPES.ROOT", shapes_root, "DATASETS.SHAPES.NUM_TRAIN", "4", "DATASETS.SHAPES.NUM_VAL", "2",
            "DATASETS.SHAPES.IMAGE_SIZE", "64", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2",
            "MODEL.RESNETS.NORM", "FrozenBN", "TEACHER.MODEL.RESNETS.NORM", "FrozenBN",
            "INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN", STUDENT_MEAN, "MODEL.PIXEL_STD", STUDENT_STD, *opts]
    return train_net.setup(default_argument_parser().parse_args([str(a) for a in argv]))


def _random_teacher_state(cfg):
    """A trained-looking teacher of cfg.TEACHER: every tensor non-trivial, FrozenBN statistics included."""
    from deepkd_det.det.config import resolve_teacher_cfg

    torch.manual_seed(1)
    teacher = build_model(resolve_teacher_cfg(cfg))
    state = {}
    for k, v in teacher.state_dict().items():
        if k.endswith("running_var"):
            v = torch.rand_like(v) + 0.5
        elif v.is_floating_point():
            v = torch.randn_like(v) * 0.1
        state[k] = v.clone()
    assert sum(k.endswith("running_var") for k in state) > 10  # FrozenBN layers, all four tensors each
    return state


def _save_zoo_pkl(state, path):
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Detectron2 Model Zoo"}, f)


@pytest.fixture(scope="module")
def separate_files(tmp_path_factory, shapes_root):
    d = tmp_path_factory.mktemp("separate")
    # Only the teacher's architecture is needed here; setup checks that a named teacher file exists.
    cfg = _demo_cfg(d / "probe", shapes_root, "TEACHER.MODEL.WEIGHTS", "")
    t_state = _random_teacher_state(cfg)
    _save_zoo_pkl(t_state, d / "model_final.pkl")
    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None)
    _randomise_bn(tv)
    torch.save(tv.state_dict(), d / "resnet18.pth")
    return {"dir": d, "teacher": t_state, "tv": tv.state_dict()}


def _trainer_load(cfg):
    from deepkd_det.det.engine import DeepKDTrainer

    trainer = DeepKDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer.model


def test_separate_teacher_file_survives_the_trainers_load(separate_files, shapes_root, tmp_path):
    """TEACHER.MODEL.WEIGHTS = a model-zoo .pkl, MODEL.WEIGHTS = a torchvision student: after the
    trainer's full load every teacher parameter and buffer (FrozenBN statistics included) is the file's."""
    d = separate_files["dir"]
    cfg = _demo_cfg(tmp_path, shapes_root, "TEACHER.MODEL.WEIGHTS", d / "model_final.pkl",
                    "MODEL.WEIGHTS", d / "resnet18.pth")
    model = _trainer_load(cfg)
    _assert_teacher_equals(model, separate_files["teacher"])
    _assert_student_backbone_is_tv(model, separate_files["tv"])


def test_two_different_teachers_are_refused_naming_both_keys(separate_files, shapes_root, tmp_path):
    d = separate_files["dir"]
    other = {k: v + 1 if v.is_floating_point() else v for k, v in separate_files["teacher"].items()}
    combined = {"teacher." + k: v for k, v in other.items()}
    combined.update({k: v for k, v in separate_files["tv"].items()})
    torch.save({"model": combined}, tmp_path / "combined.pth")
    same = {"teacher." + k: v for k, v in separate_files["teacher"].items()}
    same.update(separate_files["tv"])
    torch.save({"model": same}, tmp_path / "same.pth")

    # .pth MODEL.WEIGHTS: refused when the model is built.
    with pytest.raises(TeacherWeightsError, match=r"TEACHER\.MODEL\.WEIGHTS=.*model_final\.pkl.*combined\.pth"):
        build_model(_demo_cfg(tmp_path / "a", shapes_root, "TEACHER.MODEL.WEIGHTS", d / "model_final.pkl",
                              "MODEL.WEIGHTS", tmp_path / "combined.pth"))
    # Any file with another teacher, loaded by the checkpointer into a loaded teacher: refused too.
    model = build_model(_demo_cfg(tmp_path / "b", shapes_root, "TEACHER.MODEL.WEIGHTS", d / "model_final.pkl"))
    with pytest.raises(TeacherWeightsError, match="two different teachers"):
        DeepKDCheckpointer(model).load(str(tmp_path / "combined.pth"))
    _assert_teacher_equals(model, separate_files["teacher"])  # refused before anything was loaded
    # The same teacher in both: accepted (e.g. a checkpoint of this very run).
    cfg = _demo_cfg(tmp_path / "c", shapes_root, "TEACHER.MODEL.WEIGHTS", d / "model_final.pkl",
                    "MODEL.WEIGHTS", tmp_path / "same.pth")
    model = _trainer_load(cfg)
    _assert_teacher_equals(model, separate_files["teacher"])
    _assert_student_backbone_is_tv(model, separate_files["tv"])


def _plain_r50_student(flavour="torchvision"):
    """A tiny-head R-50-FPN student configured for one kind of ImageNet weights."""
    cfg = get_tiny_cfg(kd_type="NONE")
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    if flavour == "torchvision":
        _torchvision_input(cfg).MODEL.RESNETS.STRIDE_IN_1X1 = False
    else:  # detectron2's MSRA settings, the release's R-50 pair (configs/DEEPKD/Base-R50-R101.yaml)
        cfg.INPUT.FORMAT = "BGR"
        cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [103.53, 116.28, 123.675], [1.0, 1.0, 1.0]
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = True
    return build_model(cfg)


def test_student_side_mismatches_are_refused_by_name(files, tmp_path):
    from deepkd_det.det.weights.layouts import StudentWeightsError

    combined = torch.load(files["combined"], weights_only=True)["model"]
    model = build_model(_kd_cfg(random_teacher=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # A missing backbone key (a FrozenBN statistic: detectron2 would fill it with ones silently).
    _write_without(combined, "backbone.bottom_up.res3.1.conv2.norm.running_var", tmp_path / "m.pth")
    with pytest.raises(StudentWeightsError, match=r"missing.*res3\.1\.conv2\.norm\.running_var"):
        DeepKDCheckpointer(model).load(str(tmp_path / "m.pth"))
    _write_without(combined, "backbone.bottom_up.res5.0.conv1.weight", tmp_path / "w.pth")
    with pytest.raises(StudentWeightsError, match=r"missing.*res5\.0\.conv1\.weight"):
        DeepKDCheckpointer(model).load(str(tmp_path / "w.pth"))

    # A teacher-only file.
    torch.save({"model": {k: v for k, v in combined.items() if k.startswith("teacher.")}}, tmp_path / "t.pth")
    with pytest.raises(StudentWeightsError, match="only teacher.* keys"):
        DeepKDCheckpointer(model).load(str(tmp_path / "t.pth"))
    for k, v in model.state_dict().items():  # nothing was loaded by the refused files
        assert torch.equal(v, before[k]), k

    # The R-18 pair's file into an R-50 student: mis-shaped and missing bottleneck keys.
    with pytest.raises(StudentWeightsError, match=r"another pair[\s\S]*res2\.0\.conv3\.weight"):
        DeepKDCheckpointer(_plain_r50_student()).load(str(files["combined"]))


def test_release_reviewkd_head_keys_are_mapped(files, tmp_path):
    """The release's ``kd_trans.abfs.<j>`` (j = 0 coarsest; conv1 / conv2 / att_conv) -> ours."""
    cfg = _kd_cfg(random_teacher=True)
    cfg.KD.REVIEWKD.ENABLED = True
    cfg.KD.REVIEWKD.MID_CHANNELS = 16
    model = build_model(cfg)
    levels = len(cfg.KD.REVIEWKD.IN_FEATURES)
    torch.manual_seed(3)
    ours = {k: torch.randn_like(v) if v.is_floating_point() else v
            for k, v in model.state_dict().items() if k.startswith("reviewkd_head.")}
    part = {"lateral": "conv1", "output": "conv2", "attention": "att_conv"}
    release = {}
    for k, v in ours.items():
        _, _, i, name, rest = k.split(".", 4)  # reviewkd_head.abfs.<i>.<part>.<rest>
        release[f"kd_trans.abfs.{levels - 1 - int(i)}.{part[name]}.{rest}"] = v
    assert "kd_trans.abfs.0.att_conv.0.weight" not in release  # the release's coarsest level: no fusion
    assert "kd_trans.abfs.4.att_conv.0.weight" in release
    data = dict(torch.load(files["combined"], weights_only=True)["model"])
    data.update(release)
    torch.save({"model": data}, tmp_path / "release.pth")
    DeepKDCheckpointer(model).load(str(tmp_path / "release.pth"))
    own = model.state_dict()
    for k, v in ours.items():
        assert torch.equal(own[k], v), k


def _caffe2_name(d2_key):
    """detectron2 ResNet name -> detectron2's MSRA (Caffe2) blob name, spelled out independently."""
    import re

    if d2_key.startswith("stem.conv1."):
        return {"stem.conv1.weight": "conv1_w", "stem.conv1.norm.weight": "res_conv1_bn_s",
                "stem.conv1.norm.bias": "res_conv1_bn_b"}[d2_key]
    stage, block, layer, rest = re.match(r"(res\d)\.(\d+)\.(conv\d|shortcut)\.(.+)", d2_key).groups()
    branch = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}[layer]
    suffix = {"weight": "_w", "norm.weight": "_bn_s", "norm.bias": "_bn_b"}[rest]
    return f"{stage}_{block}_{branch}{suffix}"


def test_release_r50_pair_msra_weights(files, tmp_path):
    """The release's R-50 student is detectron2's MSRA R-50 (Caffe2, BN folded, BGR, stride in the
    1x1 conv): make_kd_weights reads it, the MSRA-configured pair loads it, a torchvision-configured
    student refuses it, and the other way round."""
    from deepkd_det.det.weights.layouts import StudentWeightsError

    msra = _plain_r50_student("caffe2")
    torch.manual_seed(4)
    d2 = {k[len("backbone.bottom_up."):]: torch.randn_like(v)
          for k, v in msra.state_dict().items()
          if k.startswith("backbone.bottom_up.") and not k.endswith(("running_mean", "running_var"))}
    blobs = {_caffe2_name(k): v.numpy() for k, v in d2.items()}
    blobs["fc1000_w"], blobs["fc1000_b"] = torch.zeros(1000, 2048).numpy(), torch.zeros(1000).numpy()
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump(blobs, f)  # the ImageNetPretrained/MSRA layout: a plain dict of blobs

    out = tmp_path / "r50-r18.pth"
    argv = ["--teacher", str(files["dir"] / "teacher.pth"), "--student", str(tmp_path / "R-50.pkl"),
            "--student-arch", "R-50", "--output", str(out)]
    assert make_kd_weights.main(argv) == 0
    combined = torch.load(out, weights_only=True)["model"]
    for k, v in d2.items():
        assert torch.equal(combined["backbone.bottom_up." + k], v), k
    assert torch.equal(combined["backbone.bottom_up.res3.0.conv2.norm.running_var"], torch.ones(128))
    assert not any("fc1000" in k for k in combined)

    DeepKDCheckpointer(msra).load(str(out))
    own = msra.state_dict()
    for k, v in d2.items():
        assert torch.equal(own["backbone.bottom_up." + k], v), k
    with pytest.raises(StudentWeightsError, match=r"caffe2 ImageNet weights[\s\S]*STRIDE_IN_1X1 False"):
        DeepKDCheckpointer(_plain_r50_student("torchvision")).load(str(out))

    # A release-style file: d2 names, no running statistics at all (folded), teacher.* beside.
    release = {"backbone.bottom_up." + k: v for k, v in d2.items()}
    release.update({k: v for k, v in combined.items() if k.startswith("teacher.")})
    torch.save(release, tmp_path / "release-r50.pth")
    fresh = _plain_r50_student("caffe2")
    DeepKDCheckpointer(fresh).load(str(tmp_path / "release-r50.pth"))
    assert torch.equal(fresh.state_dict()["backbone.bottom_up.res4.2.conv1.norm.running_mean"], torch.zeros(256))

    # torchvision R-50 weights into the MSRA-configured pair: refused, naming what to set.
    tv = torchvision.models.resnet50(weights=None)
    _randomise_bn(tv)
    torch.save(tv.state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(StudentWeightsError, match=r"torchvision ImageNet weights[\s\S]*INPUT.FORMAT BGR"):
        DeepKDCheckpointer(_plain_r50_student("caffe2")).load(str(tmp_path / "resnet50.pth"))
    DeepKDCheckpointer(_plain_r50_student("torchvision")).load(str(tmp_path / "resnet50.pth"))
