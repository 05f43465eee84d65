"""Teachers of every family the ReviewKD pipeline uses: model-zoo Mask R-CNN, Cascade Mask R-CNN
and RetinaNet checkpoints through tools/make_kd_weights.py, and the release layouts of the Mask
pairs (no teacher mask head) and of the RetinaNet pair (``r50-rt101.pth``: the teacher's
backbone only) through DeepKDCheckpointer.

The fake checkpoints are detectron2 models built from the model-zoo configs themselves (widths
shrunk, every key name and the file format of the model zoo kept: ``{"model": numpy arrays,
"__author__": "Detectron2 Model Zoo"}`` with the cell anchors the real files carry)."""

from __future__ import annotations

import importlib.util
import logging
import pickle
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
import torchvision  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from torch import nn  # noqa: E402

from deepkd_det.det.checkpoint import DeepKDCheckpointer  # noqa: E402
from deepkd_det.det.config import model_zoo_config_file  # noqa: E402
from deepkd_det.det.modeling import TeacherWeightsError  # noqa: E402
from deepkd_det.det.modeling.weights import absent_teacher_modules, detector_kind  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

MASK_R101 = "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml"
MASK_R50 = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
RETINA_R101 = "COCO-Detection/retinanet_R_101_FPN_3x.yaml"
RETINA_R50 = "COCO-Detection/retinanet_R_50_FPN_3x.yaml"
CASCADE_R50 = "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml"


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_kd_weights", ROOT / "tools" / "make_kd_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_kd_weights = _load_tool()


def _zoo_cfg(name, **model):
    """The model-zoo config ``name`` with tiny widths (the key names do not depend on them)."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config_file(name))
    cfg.MODEL.DEVICE = "cpu"
    r = cfg.MODEL.RESNETS
    r.WIDTH_PER_GROUP, r.RES2_OUT_CHANNELS, r.STEM_OUT_CHANNELS = 4, 16, 8
    cfg.MODEL.FPN.OUT_CHANNELS = 8
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 8
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    for dotted, value in model.items():
        node = cfg.MODEL
        *path, last = dotted.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def _trained_looking(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model


def _write_zoo_pkl(path, model):
    """A detectron2 model-zoo file: numpy arrays, the zoo's author tag, the anchors it carries."""
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    anchors = model.proposal_generator.anchor_generator if hasattr(model, "proposal_generator") else \
        model.anchor_generator
    prefix = "proposal_generator.anchor_generator." if hasattr(model, "proposal_generator") else "anchor_generator."
    for i, cell in enumerate(anchors.cell_anchors):
        state[f"{prefix}cell_anchors.{i}"] = cell.numpy().copy()
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    return {k: torch.from_numpy(v) for k, v in state.items() if ".cell_anchors." not in k}


class _Teacher(nn.Module):
    """A frozen teacher detector as the distillation wrapper holds it: its own keys under
    ``teacher.``, loaded from MODEL.WEIGHTS (``weights_source`` None until then)."""

    def __init__(self, detector):
        super().__init__()
        for name, child in detector.named_children():
            self.add_module(name, child)
        self.weights_source = None


class _Distill(nn.Module):
    """A student detector's children at the top level (its plain keys) plus ``teacher``, and the
    teacher heads the parts need (``teacher_needs``)."""

    def __init__(self, student, teacher, needs=None):
        super().__init__()
        for name, child in student.named_children():
            self.add_module(name, child)
        self.teacher = _Teacher(teacher)
        if needs is not None:
            self.teacher_needs = set(needs)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Fake model-zoo teachers (.pkl) and a torchvision ResNet-18 ImageNet file."""
    d = tmp_path_factory.mktemp("zoo")
    out = {"dir": d}
    for i, name in enumerate((MASK_R101, MASK_R50, RETINA_R101, RETINA_R50, CASCADE_R50)):
        path = d / (name.split("/")[1].replace(".yaml", ".pkl"))
        out[name] = (path, _write_zoo_pkl(path, _trained_looking(build_model(_zoo_cfg(name)), i)))
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), d / "resnet18.pth")
    out["tv"] = tv.state_dict()
    return out


@pytest.mark.parametrize("name, kind", [(MASK_R101, "Mask R-CNN"), (MASK_R50, "Mask R-CNN"),
                                        (RETINA_R101, "RetinaNet"), (RETINA_R50, "RetinaNet"),
                                        (CASCADE_R50, "Cascade Mask R-CNN")])
def test_make_kd_weights_takes_mask_cascade_and_retinanet_teachers(zoo, tmp_path, capsys, name, kind):
    path, state = zoo[name]
    assert detector_kind(state) == kind
    out = tmp_path / "combined.pth"
    assert make_kd_weights.main(["--teacher", str(path), "--student", str(zoo["dir"] / "resnet18.pth"),
                                 "--student-arch", "R-18", "--output", str(out)]) == 0
    assert f"a {kind})" in capsys.readouterr().out
    model = torch.load(out, weights_only=True)["model"]
    teacher = {k[len("teacher."):]: v for k, v in model.items() if k.startswith("teacher.")}
    # Every tensor of the zoo file, under teacher., unchanged (the anchors, not model state, dropped).
    assert set(teacher) == set(state)
    assert all(torch.equal(teacher[k], v) for k, v in state.items())
    heads = ("roi_heads.mask_head.", "head.cls_score.")
    assert any(k.startswith(heads) for k in teacher)
    assert all(k.startswith(("teacher.", "backbone.bottom_up.")) for k in model)


def test_make_kd_weights_refuses_what_is_no_detector(zoo, tmp_path):
    _, state = zoo[RETINA_R50]
    backbone_only = tmp_path / "backbone.pth"
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone.")}}, backbone_only)
    with pytest.raises(SystemExit, match=r"backbone\.pth is not a detectron2 detector checkpoint.*RetinaNet"):
        make_kd_weights.main(["--teacher", str(backbone_only), "--student", str(zoo["dir"] / "resnet18.pth"),
                              "--student-arch", "R-18", "--output", str(tmp_path / "x.pth")])
    assert not (tmp_path / "x.pth").exists()


def _r18_student(name):
    # The student of the R-18 pairs: detectron2's R-18 with torchvision's layout (stride in the 3x3).
    return build_model(_zoo_cfg(name, **{"RESNETS.DEPTH": 18, "RESNETS.RES2_OUT_CHANNELS": 64,
                                         "RESNETS.STEM_OUT_CHANNELS": 64, "RESNETS.WIDTH_PER_GROUP": 64,
                                         "RESNETS.STRIDE_IN_1X1": False, "RESNETS.NORM": "BN"}))


def test_mask_teacher_file_of_the_tool_loads_completely(zoo, tmp_path):
    """Mask R-CNN R-101 teacher + ImageNet R-18 into a Mask R-CNN R-18 student: the teacher equals
    the zoo file in every tensor (mask head included), the student backbone is torchvision's."""
    path, state = zoo[MASK_R101]
    out = tmp_path / "r18-r101mask.pth"
    make_kd_weights.main(["--teacher", str(path), "--student", str(zoo["dir"] / "resnet18.pth"),
                          "--student-arch", "R-18", "--output", str(out)])
    model = _Distill(_r18_student(MASK_R50), build_model(_zoo_cfg(MASK_R101)))
    DeepKDCheckpointer(model).load(str(out))
    own = model.teacher.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], v) for k, v in state.items())
    assert torch.equal(model.state_dict()["backbone.bottom_up.res3.0.conv1.weight"], zoo["tv"]["layer2.0.conv1.weight"])


def test_release_mask_file_without_the_teachers_mask_head_loads(zoo, tmp_path, caplog):
    """The ReviewKD release builds its teachers with TEACHER.MODEL.MASK_ON False: a Mask pair file
    may hold no teacher.roi_heads.mask_head.*. No part runs the teacher's mask head: it keeps its
    initialisation (one log line); everything else must be there, and half a mask head is refused."""
    path, state = zoo[MASK_R101]
    tv = torch.load(zoo["dir"] / "resnet18.pth", weights_only=True)
    combined = {"teacher." + k: v for k, v in state.items() if not k.startswith("roi_heads.mask_head.")}
    combined.update({k: v for k, v in tv.items() if not k.startswith("fc.")})  # torchvision names, renamed on load
    release = tmp_path / "release.pth"
    torch.save(combined, release)
    model = _Distill(_r18_student(MASK_R50), build_model(_zoo_cfg(MASK_R101)), needs={"features", "box_head"})
    mask_head = {k: v.clone() for k, v in model.teacher.state_dict().items() if k.startswith("roi_heads.mask_head.")}
    with caplog.at_level(logging.INFO, logger="deepkd_det"):
        DeepKDCheckpointer(model).load(str(release))
    assert "holds no teacher roi_heads.mask_head.*" in caplog.text
    own = model.teacher.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("roi_heads.mask_head."))
    assert all(torch.equal(own[k], v) for k, v in mask_head.items())
    # Half a mask head: a damaged file, refused with the missing key's name.
    partial = dict(combined)
    partial["teacher.roi_heads.mask_head.predictor.weight"] = state["roi_heads.mask_head.predictor.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    fresh = _Distill(_r18_student(MASK_R50), build_model(_zoo_cfg(MASK_R101)), needs={"features", "box_head"})
    with pytest.raises(TeacherWeightsError, match=r"(?s)missing.*roi_heads\.mask_head\.mask_fcn1\.weight"):
        DeepKDCheckpointer(fresh).load(str(tmp_path / "partial.pth"))


@pytest.fixture(scope="module")
def rt_release(zoo, tmp_path_factory):
    """A file in the layout of the ReviewKD release's ``pretrained/r50-rt101.pth``: the teacher
    of ReviewKDRetinaNet is its backbone alone (Detection/model/teacher/teacher.py builds no
    proposal generator or ROI heads for a RetinaNet teacher and the RetinaNet wrapper keeps no
    teacher head), so ``teacher.backbone.*`` (bottom_up, FPN, top_block p6/p7) of the model-zoo
    RetinaNet R-101, next to the MSRA ImageNet R-50 student in detectron2 names
    (``backbone.bottom_up.*``, BN folded: mean 0, variance 1)."""
    _, t_state = zoo[RETINA_R101]
    student = build_model(_zoo_cfg(RETINA_R50))
    torch.manual_seed(5)
    s_state = {}
    for k, v in student.state_dict().items():
        if k.startswith("backbone.bottom_up."):
            if k.endswith(("running_mean", "running_var")):  # folded statistics: 0 / 1, as the MSRA files
                s_state[k] = torch.zeros_like(v) if k.endswith("running_mean") else torch.ones_like(v)
            else:
                s_state[k] = v + 0.1 * torch.randn_like(v)
    combined = {"teacher." + k: v for k, v in t_state.items() if k.startswith("backbone.")}
    combined.update(s_state)
    path = tmp_path_factory.mktemp("rt") / "r50-rt101.pth"
    torch.save(combined, path)
    return path, t_state, s_state


def test_release_retinanet_file_loads_for_feature_parts(rt_release):
    """ReviewKD (features only) with a RetinaNet R-101 teacher and R-50 student: the release file
    fills the teacher's backbone and the student's; the teacher's dense head, which no part runs,
    keeps its initialisation."""
    path, t_state, s_state = rt_release
    assert all(k.startswith(("teacher.backbone.fpn", "teacher.backbone.bottom_up.", "teacher.backbone.top_block.",
                             "backbone.bottom_up.")) for k in torch.load(path, weights_only=True))
    model = _Distill(build_model(_zoo_cfg(RETINA_R50)), build_model(_zoo_cfg(RETINA_R101)), needs={"features"})
    head = {k: v.clone() for k, v in model.teacher.state_dict().items() if k.startswith("head.")}
    assert head
    DeepKDCheckpointer(model).load(str(path))
    own_t, own = model.teacher.state_dict(), model.state_dict()
    assert all(torch.equal(own_t[k], v) for k, v in t_state.items() if k.startswith("backbone."))
    assert all(torch.equal(own_t[k], v) for k, v in head.items())
    assert all(torch.equal(own[k], v) for k, v in s_state.items())


@pytest.mark.parametrize("needs", [{"features", "dense_head"}, None])
def test_release_retinanet_file_is_refused_where_the_teacher_head_is_needed(rt_release, needs):
    """Dense-head distillation (or a model that does not say what its parts need) needs the
    teacher's head: the file lacks it, and the refusal names its keys."""
    path, _, _ = rt_release
    model = _Distill(build_model(_zoo_cfg(RETINA_R50)), build_model(_zoo_cfg(RETINA_R101)), needs=needs)
    with pytest.raises(TeacherWeightsError, match=r"(?s)teacher keys missing.*head\.cls_score\.weight"):
        DeepKDCheckpointer(model).load(str(path))


def test_retinanet_teacher_of_the_tool_loads_with_its_head(zoo, tmp_path):
    """The tool's RetinaNet file (the whole zoo detector) serves dense-head distillation: the
    teacher's head comes from it too."""
    path, state = zoo[RETINA_R101]
    out = tmp_path / "r18-rt101.pth"
    make_kd_weights.main(["--teacher", str(path), "--student", str(zoo["dir"] / "resnet18.pth"),
                          "--student-arch", "R-18", "--output", str(out)])
    model = _Distill(_r18_student(RETINA_R50), build_model(_zoo_cfg(RETINA_R101)), needs={"features", "dense_head"})
    DeepKDCheckpointer(model).load(str(out))
    own = model.teacher.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], v) for k, v in state.items())


def test_absent_teacher_modules_rule():
    own = ["backbone.a", "proposal_generator.b", "roi_heads.box_predictor.c", "roi_heads.mask_head.d",
           "head.cls_score.e"]
    file = ["backbone.a", "proposal_generator.b", "roi_heads.box_predictor.c"]
    assert absent_teacher_modules(own, file) == {"roi_heads.mask_head.": ["roi_heads.mask_head.d"]}
    assert absent_teacher_modules(own, file, {"features", "box_head"}) == {
        "roi_heads.mask_head.": ["roi_heads.mask_head.d"], "head.": ["head.cls_score.e"]}
    # No part needs the box head: the whole R-CNN part may be absent (reported once, outermost).
    assert absent_teacher_modules(own, ["backbone.a"], {"features"}) == {
        "proposal_generator.": ["proposal_generator.b"],
        "roi_heads.": ["roi_heads.box_predictor.c", "roi_heads.mask_head.d"], "head.": ["head.cls_score.e"]}
    # A module the file holds part of is never excused.
    assert "roi_heads." not in absent_teacher_modules(own, ["backbone.a", "roi_heads.mask_head.d"], {"features"})
