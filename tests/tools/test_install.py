"""The detectron2 installer (tools/install_detectron2.py) and ``python -m deepkd_det.env``."""

import hashlib
import importlib.util
import io
import json
import shutil
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


def _fake_sdist(path: Path, transform_src: str, model_zoo_src: str, extra=None) -> Path:
    """A tar.gz laid out like the pb1-detectron2 sdist, with the files the installer patches."""
    files = {**(extra or {}),
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


# --------------------------------------------------------------------------------------------
# The import check, the existing route and the fall-through, on fake detectron2 trees put on
# a temporary PYTHONPATH (each check is a fresh interpreter, as in the installer).
# --------------------------------------------------------------------------------------------
# Pillow >= 10 has no Image.LINEAR; a stand-in Image keeps the failure independent of the
# Pillow installed here.
LINEAR_TRANSFORM_SRC = (
    "from types import SimpleNamespace\n\nImage = SimpleNamespace(BILINEAR=2, NEAREST=0)\n\n\n" + TRANSFORM_SRC
)
# current detectron2 main's model_zoo.py header and get_config_file (02b5c4e2), less the torch
# and detectron2 imports the fake tree does not have.
MAIN_MODEL_ZOO_SRC = '''# Copyright (c) Facebook, Inc. and its affiliates.
import os
from typing import Optional
import pkg_resources


def get_config_file(config_path):
    """
    Returns path to a builtin config file.

    Args:
        config_path (str): config file name relative to detectron2's "configs/"
            directory, e.g., "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"

    Returns:
        str: the real path to the config file.
    """
    cfg_file = pkg_resources.resource_filename(
        "detectron2.model_zoo", os.path.join("configs", config_path)
    )
    if not os.path.exists(cfg_file):
        raise RuntimeError("{} not available in Model Zoo!".format(config_path))
    return cfg_file
'''
# setuptools >= 81 ships no pkg_resources; this shadows whatever setuptools is installed here.
NO_PKG_RESOURCES = "raise ModuleNotFoundError(\"No module named 'pkg_resources'\")\n"


def _write_tree(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _fake_detectron2(root: Path, transform=LINEAR_TRANSFORM_SRC, model_zoo=MAIN_MODEL_ZOO_SRC, **extra) -> Path:
    """A detectron2 package with every module the import check imports, under ``root``."""
    files = {f"detectron2/{m}/__init__.py": "" for m in ("config", "modeling", "checkpoint", "engine", "evaluation")}
    files.update(
        {
            "detectron2/__init__.py": '__version__ = "0.6"\n',
            "detectron2/data/__init__.py": "from .transforms import transform  # noqa\n",
            "detectron2/data/transforms/__init__.py": "",
            "detectron2/data/transforms/transform.py": transform,
            "detectron2/model_zoo/__init__.py": "from .model_zoo import get_config_file  # noqa\n",
            "detectron2/model_zoo/model_zoo.py": model_zoo,
            "detectron2/model_zoo/configs/Base-RCNN-FPN.yaml": "MODEL: {}\n",
        }
    )
    files.update(extra)
    return _write_tree(root, files)


@pytest.fixture()
def fake_site(tmp_path, monkeypatch):
    """A folder first on PYTHONPATH (so it shadows the venv's detectron2), without pkg_resources."""
    site = tmp_path / "site"
    _write_tree(site, {"pkg_resources.py": NO_PKG_RESOURCES})
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


def test_import_check_refuses_detectron2_whose_data_does_not_import(installer, fake_site, capsys):
    _fake_detectron2(fake_site)
    report = installer.import_check()
    assert report["failed"] == "detectron2.data"
    assert report["error"].startswith("AttributeError") and "LINEAR" in report["error"]
    assert Path(report["file"]) == fake_site / "detectron2" / "__init__.py"

    assert installer.main(["--route", "existing"]) == 1
    out = capsys.readouterr().out
    assert not (fake_site.parent / "route.json").exists(), "a route that fails the check must not be recorded"
    (why,) = [line for line in out.splitlines() if "not taken" in line]  # one line says why
    assert "import detectron2.data failed: AttributeError" in why and "--fix-source" in why and "LINEAR" in why


def test_import_check_passes_a_working_tree_and_names_model_zoo(installer, fake_site):
    fixed = 'interp=Image.BILINEAR,'
    _fake_detectron2(fake_site, transform=LINEAR_TRANSFORM_SRC.replace("interp=Image.LINEAR,", fixed))
    report = installer.import_check()
    assert report["failed"] == "detectron2.model_zoo" and "pkg_resources" in report["error"]
    assert installer.import_check(installer.IMPORT_CHECK_MODULES[:4])["failed"] is None  # up to modeling
    assert report["compiled_ops"].startswith("missing")  # the fake has no detectron2._C


def test_existing_route_fix_source_fixes_in_place_and_records(installer, fake_site, tmp_path, capsys):
    _fake_detectron2(fake_site)
    assert installer.main(["--route", "existing"]) == 1
    assert installer.main(["--route", "existing", "--fix-source"]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "route.json").read_text())
    assert record["route"] == "existing" and Path(record["location"]) == fake_site
    assert record["patches"] == [fix.why for fix in installer.SOURCE_FIXES]
    assert "patched detectron2/model_zoo/model_zoo.py" in out and "import check passed" in out
    zoo = (fake_site / "detectron2/model_zoo/model_zoo.py").read_text()
    assert "pkg_resources" not in zoo
    assert "interp=Image.BILINEAR," in (fake_site / "detectron2/data/transforms/transform.py").read_text()
    # the fixed model zoo still finds its packaged config, in a fresh interpreter
    probe = "from detectron2.model_zoo import get_config_file as g; print(g('Base-RCNN-FPN.yaml'))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert Path(res.stdout.strip()) == fake_site / "detectron2/model_zoo/configs/Base-RCNN-FPN.yaml"
    # a second --fix-source finds nothing left to do and records the same install
    assert installer.main(["--route", "existing", "--fix-source"]) == 0
    assert json.loads((tmp_path / "route.json").read_text())["patches"] == []


def test_existing_route_notes_pkg_resources_that_still_imports(installer, fake_site, tmp_path, capsys):
    # an older setuptools still ships pkg_resources: detectron2 imports, but the note says how to fix it
    old_setuptools = "import os\n\n\ndef resource_filename(package, path):\n    return os.path.join('/nowhere', path)\n"
    _write_tree(fake_site, {"pkg_resources.py": old_setuptools})
    _fake_detectron2(fake_site, transform=LINEAR_TRANSFORM_SRC.replace("LINEAR,", "BILINEAR,"))
    assert installer.main(["--route", "existing"]) == 0
    out = capsys.readouterr().out
    (note,) = [line for line in out.splitlines() if "note:" in line]
    assert "pkg_resources" in note and "--fix-source" in note
    assert json.loads((tmp_path / "route.json").read_text())["route"] == "existing"


def test_pkg_resources_fix_on_current_main_model_zoo(installer, tmp_path):
    main_transform = "    def __init__(self, src_rect, output_size, interp=Image.BILINEAR, fill=0):\n"
    root = _fake_detectron2(tmp_path / "src", transform=main_transform)
    applied = installer.apply_source_fixes(root)
    # main fixed LINEAR itself (ff53992b), so only the model zoo fix applies
    assert applied == [installer.SOURCE_FIXES[1].why]
    zoo_file = root / "detectron2/model_zoo/model_zoo.py"
    zoo = zoo_file.read_text()
    assert "pkg_resources" not in zoo
    ns = {"__file__": str(zoo_file)}
    exec(compile(zoo, str(zoo_file), "exec"), ns)
    assert Path(ns["get_config_file"]("Base-RCNN-FPN.yaml")) == root / "detectron2/model_zoo/configs/Base-RCNN-FPN.yaml"
    with pytest.raises(RuntimeError, match="not available in Model Zoo"):
        ns["get_config_file"]("no/such.yaml")
    assert installer.pending_source_fixes(root) == [] and installer.apply_source_fixes(root) == []
    with pytest.raises(installer.InstallError, match="not the verified v0.6 source"):
        installer.apply_source_fixes(root, strict=True)


def test_source_fix_matching_in_part_is_refused(installer, tmp_path):
    other_lookup = MAIN_MODEL_ZOO_SRC.replace("pkg_resources.resource_filename(", "pkg_resources.files(")
    root = _fake_detectron2(tmp_path / "src", model_zoo=other_lookup)
    before = (root / "detectron2/model_zoo/model_zoo.py").read_text()
    with pytest.raises(installer.InstallError, match="only in part"):
        installer.apply_source_fixes(root)
    assert (root / "detectron2/model_zoo/model_zoo.py").read_text() == before


def _git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _git_repo(path: Path) -> str:
    _git(path, "init", "-q")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "fake detectron2")
    return _git(path, "rev-parse", "HEAD")


def test_failing_routes_fall_through_to_the_next(installer, fake_site, tmp_path, monkeypatch, capsys):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    # existing: the Pillow-10 failure; git: a real (local) repository whose modeling does not
    # import; fallback: a verified archive that passes. pip "installs" by copying onto PYTHONPATH.
    _fake_detectron2(fake_site)
    repo = _fake_detectron2(
        tmp_path / "repo",
        transform=LINEAR_TRANSFORM_SRC.replace("LINEAR,", "BILINEAR,"),
        **{"detectron2/modeling/__init__.py": "raise ImportError(\"No module named 'fairscale'\")\n"},
    )
    commit = _git_repo(repo)
    files = dict.fromkeys(("config", "modeling", "checkpoint", "engine", "evaluation", "data/transforms"), "")
    sdist_extra = {f"pb1-detectron2-0.6/detectron2/{m}/__init__.py": t for m, t in files.items()}
    sdist_extra["pb1-detectron2-0.6/detectron2/data/__init__.py"] = "from .transforms import transform  # noqa\n"
    sdist_extra["pb1-detectron2-0.6/detectron2/model_zoo/__init__.py"] = "from .model_zoo import get_config_file  # noqa\n"
    archive = _fake_sdist(tmp_path / "pb1-detectron2-0.6.tar.gz", LINEAR_TRANSFORM_SRC, MAIN_MODEL_ZOO_SRC, sdist_extra)
    monkeypatch.setattr(installer, "FALLBACK_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(installer, "download_fallback", lambda dest: archive)

    def fake_pip(*args, **kwargs):
        installer.pip_calls.append(args)
        target = fake_site / "detectron2"
        if args[0] == "uninstall" or (args[0] == "install" and Path(args[-1]).is_dir()):
            shutil.rmtree(target, ignore_errors=True)
        if args[0] == "install" and Path(args[-1]).is_dir():
            shutil.copytree(Path(args[-1]) / "detectron2", target)
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(installer, "pip", fake_pip)
    assert installer.main(["--git-url", repo.as_uri(), "--git-commit", commit]) == 0
    out = capsys.readouterr().out
    why = [line for line in out.splitlines() if "not taken" in line]
    assert len(why) == 2
    assert why[0].startswith("[install_detectron2] route 'existing' not taken: import detectron2.data failed")
    assert "route 'git' not taken: installed, but import detectron2.modeling failed" in why[1]
    assert "fairscale" in why[1] and "uninstalled again" in why[1]
    assert "patched detectron2/model_zoo/model_zoo.py" in out  # the git source got the fix too
    assert ("uninstall", "-y", "detectron2") in installer.pip_calls
    record = json.loads((tmp_path / "route.json").read_text())
    assert record["route"] == "pypi-fallback" and Path(record["location"]) == fake_site
    assert "compiled ops: shim" in record["detail"]


def test_git_source_is_the_exact_commit(installer, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = _write_tree(tmp_path / "repo", {"setup.py": "# first\n"})
    first = _git_repo(repo)
    (repo / "setup.py").write_text("# second\n")
    _git(repo, "commit", "-q", "-am", "second")
    src = installer.fetch_git_source(repo.as_uri(), first, tmp_path / "checkout")
    assert (src / "setup.py").read_text() == "# first\n"
    with pytest.raises(installer.InstallError, match="git fetch"):
        installer.fetch_git_source(repo.as_uri(), "0" * 40, tmp_path / "other")


def test_git_route_options(installer, capsys):
    assert installer._remote_host(installer.GIT_URL) == ("github.com", 443)
    assert installer._remote_host("file:///srv/detectron2") is None and installer._remote_host("/srv/d2") is None
    assert installer.GIT_COMMIT != "2dde706855d87baa9760fbcd0bdb6004a3937204"  # predates the Pillow-10 fix
    with pytest.raises(SystemExit):
        installer.main(["--git-commit", "02b5c4e2"])
    assert "full 40-hex commit hash" in capsys.readouterr().err
