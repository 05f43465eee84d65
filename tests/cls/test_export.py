"""The distilled classifier leaves the project (tools/export_student.py, deepkd_det/cls/export.py):
a briefly trained GPD student is exported (the plain student out of the shared model) and loaded in
a process where ``import deepkd_det`` raises, through the shipped single-file model definition,
with logits identical to the project's evaluation model (tools/eval_cls.py's exported student);
TorchScript equal to eager; ONNX within 1e-4 (skipped, with the reason, without onnxruntime)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from deepkd_det.cls.distillers.gpd import plain_student, widen_student
from deepkd_det.cls.engine import ClsTrainer
from deepkd_det.cls.models import build_model, read_state_dict
from deepkd_det.core.deploy import ONNX_TOLERANCE, largest_difference, worst
from tests.no_deepkd import load_tool, run_without_deepkd

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))

DEPLOYER = """
import importlib.util, json, os, sys
import torch
torch.set_num_threads(1)  # as the test process
folder, images, out = sys.argv[1:4]
info = json.load(open(os.path.join(folder, "deploy.json")))
definition = info["model_definition"]
spec = importlib.util.spec_from_file_location("student_definition", os.path.join(folder, definition["python_file"]))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = getattr(module, definition["constructor"])(info["num_classes"])
model.load_state_dict(torch.load(os.path.join(folder, "model.pth"), weights_only=True))  # strict
model.eval()
x = torch.load(images, weights_only=True)
with torch.no_grad():
    res = {"eager": model(x), "torchscript": torch.jit.load(os.path.join(folder, "model.ts"))(x), "onnx": None}
try:
    import onnxruntime
except ImportError:
    onnxruntime = None
if onnxruntime is not None and os.path.exists(os.path.join(folder, "model.onnx")):
    session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
    res["onnx"] = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
torch.save(res, out)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tests.cls.conftest import _tiny_cfg

    run = tmp_path_factory.mktemp("gpd_run")
    cfg = _tiny_cfg(run, DISTILLER__TYPE="NONE", GPD__ENABLED=True, SOLVER__EPOCHS=2, SOLVER__LR_DECAY_STAGES=[1],
                    LOG__SAVE_EVERY=100)
    trainer = ClsTrainer(cfg)
    trainer.train()
    images = torch.stack([trainer.val_loader.dataset[i][0] for i in range(16)])
    out = run / "export"
    formats = "torchscript,onnx" if HAS_ONNX else "torchscript"
    assert load_tool("export_student").main(["--run", str(run), "--output", str(out), "--formats", formats]) == 0
    torch.save(images, run / "images.pt")
    run_without_deepkd(DEPLOYER, out, run / "images.pt", run / "deployer.pt", cwd=out)
    return {"run": run, "cfg": cfg, "dir": out, "images": images,
            "got": torch.load(run / "deployer.pt", weights_only=True)}


def test_exported_gpd_student_loads_without_deepkd(exported):
    out, run, cfg = exported["dir"], exported["run"], exported["cfg"]
    info = json.loads((out / "deploy.json").read_text())
    assert info["parity"]["ok"] and info["source"]["gpd_export"]
    assert info["model_definition"]["python_file"] == "cifar_resnet.py" and info["num_classes"] == 10
    assert info["class_names"] == [str(i) for i in range(10)]
    assert info["input"]["size"] == [8, 8] and len(info["input"]["mean"]) == 3
    # The plain student's state dict: the ordinary resnet8's keys, far smaller than the GPD run state.
    state = torch.load(out / "model.pth", weights_only=True)
    assert list(state) == list(build_model("resnet8", 10).state_dict())
    assert os.path.getsize(out / "model.pth") < 0.5 * os.path.getsize(run / "latest.pth")

    # The project's evaluation model (tools/eval_cls.py on a GPD file): the plain student exported
    # from the shared model.
    shared = widen_student(cfg, build_model("resnet8", 10), check=False)
    shared.load_state_dict(read_state_dict(run / "latest.pth"))
    project = plain_student(shared).eval()
    with torch.no_grad():
        expected = project(exported["images"])
    got = exported["got"]
    assert torch.equal(got["eager"], expected)
    assert torch.equal(got["torchscript"], got["eager"])
    assert expected.abs().max() > 0.1  # a trained head, not all zeros


def test_exported_classifier_onnx_within_tolerance(exported):
    if not HAS_ONNX:
        pytest.skip("onnx / onnxruntime are not installed (optional extra: pip install -e '.[export]')")
    got = exported["got"]
    assert got["onnx"] is not None, "onnxruntime importable here but not in the deployer's process"
    assert worst(largest_difference([got["eager"]], [got["onnx"]], ("logits",))) <= ONNX_TOLERANCE
