"""The detectron2 installer (tools/install_detectron2.py) and ``python -m deepkd_det.env``."""

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def installer(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("install_detectron2", ROOT / "tools" / "install_detectron2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []
    monkeypatch.setattr(mod, "pip", lambda *a, **k: calls.append(a) or subprocess.CompletedProcess(a, 0))
    monkeypatch.setattr(mod, "route_file", lambda: tmp_path / "route.json")
    mod.pip_calls = calls
    return mod


def _fake_sdist(path: Path, transform_src: str, model_zoo_src: str) -> Path:
    """A tar.gz laid out like the pb1-detectron2 sdist, with the files the installer patches."""
    files = {
        "pb1-detectron2-0.6/detectron2/__init__.py": '__version__ = "0.6"\n',
        "pb1-detectron2-0.6/detectron2/data/transforms/transform.py": transform_src,
        "pb1-detectron2-0.6/detectron2/model_zoo/model_zoo.py": model_zoo_src,
        "pb1-detectron2-0.6/detectron2/model_zoo/configs/Base-RCNN-FPN.yaml": "MODEL: {}\n",
        "pb1-detectron2-0.6/LICENSE": "Apache-2.0\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


TRANSFORM_SRC = "class ExtentTransform:\n    def __init__(self, src_rect, output_size, interp=Image.LINEAR, fill=0):\n        pass\n"
MODEL_ZOO_SRC = (
    "import os\nimport pkg_resources\n\n\ndef get_config_file(config_path):\n"
    '    cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )\n'
    "    return cfg_file\n"
)


def test_tampered_archive_is_refused_and_nothing_installed(installer, tmp_path, capsys):
    archive = _fake_sdist(tmp_path / "pb1-detectron2-0.6.tar.gz", TRANSFORM_SRC, MODEL_ZOO_SRC)
    code = installer.main(["--route", "pypi-fallback", "--force", "--archive", str(archive)])
    out = capsys.readouterr().out
    assert code == 1
    assert "refusing pb1-detectron2-0.6.tar.gz" in out and "sha256" in out and "nothing was installed" in out
    assert installer.pip_calls == [], "pip must not run for a refused archive"
    assert not (tmp_path / "route.json").exists()


def test_verified_archive_is_staged_with_shim_and_fixes(installer, tmp_path, monkeypatch):
    archive = _fake_sdist(tmp_path / "pb1-detectron2-0.6.tar.gz", TRANSFORM_SRC, MODEL_ZOO_SRC)
    monkeypatch.setattr(installer, "FALLBACK_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    installer.verify_archive(archive, installer.FALLBACK_SHA256)
    stage = installer.stage_fallback(archive, tmp_path / "unpack")
    transform = (stage / "detectron2/data/transforms/transform.py").read_text()
    assert "Image.LINEAR" not in transform and "interp=Image.BILINEAR," in transform
    zoo = (stage / "detectron2/model_zoo/model_zoo.py").read_text()
    assert "pkg_resources" not in zoo
    # the rewritten lookup still finds the packaged config file
    ns = {"__file__": str(stage / "detectron2/model_zoo/model_zoo.py")}
    exec(compile(zoo, "model_zoo.py", "exec"), ns)
    assert Path(ns["get_config_file"]("Base-RCNN-FPN.yaml")).read_text() == "MODEL: {}\n"
    assert "__deepkd_shim__ = True" in (stage / "detectron2/_C.py").read_text()
    assert 'name = "detectron2"' in (stage / "pyproject.toml").read_text()


def test_unexpected_source_is_refused(installer, tmp_path):
    archive = _fake_sdist(tmp_path / "x.tar.gz", "nothing to patch here\n", MODEL_ZOO_SRC)
    with pytest.raises(installer.InstallError, match="not the verified v0.6 source"):
        installer.stage_fallback(archive, tmp_path / "unpack")


def test_git_route_gives_up_quickly_without_network(installer, monkeypatch):
    monkeypatch.setattr(installer, "network_reachable", lambda *a, **k: False)
    with pytest.raises(installer.InstallError, match="not reachable"):
        installer.install_from_git()
    assert installer.pip_calls == []


def test_network_probe_times_out_fast(installer):
    import time

    t0 = time.monotonic()
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never routed; the probe must give up, not hang.
    assert installer.network_reachable(("192.0.2.1", 9), timeout=0.5) is False
    assert time.monotonic() - t0 < 5


def _shim_module(installer):
    mod = types.ModuleType("fake_C")
    exec(installer.SHIM_SOURCE, mod.__dict__)
    return mod


def test_shim_source_raises_clear_error(installer):
    shim = _shim_module(installer)
    with pytest.raises(ImportError, match=r"detectron2\._C\.box_iou_rotated is a compiled C\+\+ op"):
        _ = shim.box_iou_rotated
    with pytest.raises(ImportError, match="--route git"):
        _ = shim.deform_conv_forward
    assert not hasattr(shim, "__wrapped__")  # dunder look-ups stay ordinary AttributeErrors
    assert shim.has_cuda() is False and "not built" in shim.get_compiler_version()


def test_installed_shim_rotated_box_op_raises():
    torch = pytest.importorskip("torch")
    import detectron2._C as compiled

    if not getattr(compiled, "__deepkd_shim__", False):
        pytest.skip("detectron2 has its compiled ops here")
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[10.0, 10.0, 4.0, 4.0, 30.0]])
    with pytest.raises(ImportError, match="box_iou_rotated.*pure-Python v0.6"):
        pairwise_iou_rotated(boxes, boxes)


def test_env_reports_route():
    res = subprocess.run([sys.executable, "-m", "deepkd_det.env"], capture_output=True, text=True, check=True)
    lines = dict(line.split(None, 1) for line in res.stdout.splitlines() if line.strip())
    assert "torch" in lines and "detectron2" in lines
    import sysconfig

    import detectron2._C as compiled

    record = Path(sysconfig.get_paths()["purelib"]) / "deepkd_det_detectron2_route.json"
    if record.exists():
        assert lines["detectron2_route"].strip() == json.loads(record.read_text())["route"]
    else:
        assert lines["detectron2_route"].startswith("unrecorded")
    expected = "shim" if getattr(compiled, "__deepkd_shim__", False) else "built"
    assert lines["detectron2_compiled_ops"].startswith(expected)


def test_fallback_fetches_from_the_index_when_pip_refuses(installer, tmp_path, monkeypatch):
    # Current pip refuses to download this sdist (a direct-URL extra in its metadata); the
    # installer then reads the index's PEP 503 page itself. A local file:// index stands in.
    files = tmp_path / "index" / "files"
    files.mkdir(parents=True)
    archive = _fake_sdist(files / "pb1-detectron2-0.6.tar.gz", TRANSFORM_SRC, MODEL_ZOO_SRC)
    page = tmp_path / "index" / "simple" / "pb1-detectron2"
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        '<a href="../../files/pb1-detectron2-0.6.tar.gz#sha256=00">pb1-detectron2-0.6.tar.gz</a>'
    )
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "index" / "simple").as_uri())
    monkeypatch.setattr(installer, "pip", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    got = installer.download_fallback(tmp_path / "dl")
    assert got.read_bytes() == archive.read_bytes()
    # ...and what comes from the index is still refused unless its sha256 is the verified one.
    with pytest.raises(installer.InstallError, match="refusing"):
        installer.verify_archive(got)
