#!/usr/bin/env python
"""Install detectron2 into the running Python environment, by the first route that works.

Detectron2 publishes no wheels, so ``make setup`` runs this tool with the project's venv
Python. Routes, tried in order (``--route`` forces one):

1. ``existing``: detectron2 already imports; nothing is changed.
2. ``git``: the official repository at a pinned commit, built with its C++ ops
   (``pip install --no-build-isolation git+...``). Where the network is closed it gives up
   within seconds (a TCP probe with a short timeout comes first).
3. ``pypi-fallback``: the verified pure-Python v0.6 from PyPI (``pb1-detectron2==0.6``, whose
   Python files are identical to the official v0.6 release). The archive is refused unless its
   sha256 matches; the C++ build is skipped; ``detectron2._C`` becomes a shim module whose ops
   raise a clear error; and v0.6's one use of ``PIL.Image.LINEAR`` (removed in Pillow 10; it
   was an alias of ``BILINEAR``) is rewritten to ``BILINEAR`` so that a current Pillow works.

The route taken is printed and recorded in ``<site-packages>/deepkd_det_detectron2_route.json``
(``python -m deepkd_det.env`` reports it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

GIT_URL = "https://github.com/facebookresearch/detectron2.git"
GIT_COMMIT = "2dde706855d87baa9760fbcd0bdb6004a3937204"
GIT_HOST = ("github.com", 443)

FALLBACK_REQUIREMENT = "pb1-detectron2==0.6"
FALLBACK_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
FALLBACK_ARCHIVE_NAME = "pb1-detectron2-0.6.tar.gz"

# detectron2 v0.6's runtime requirements, less black==21.4b2 (only used to pretty-print lazy
# configs on save; that pin does not install on current Python versions).
FALLBACK_DEPENDENCIES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "future",
    "pydot",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
    "scipy>1.5.1",
]

# Source fixes for a current Python stack: (file, exact old text, new text, why). Each old
# text must occur exactly once, so a different source is refused rather than half-patched.
SOURCE_PATCHES = [
    (
        "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR,",
        "interp=Image.BILINEAR,",
        "Image.LINEAR -> Image.BILINEAR (LINEAR was removed in Pillow 10; it was an alias of BILINEAR)",
    ),
    (
        "detectron2/model_zoo/model_zoo.py",
        "import pkg_resources\n",
        "",
        "drop pkg_resources (gone from setuptools >= 81)",
    ),
    (
        "detectron2/model_zoo/model_zoo.py",
        'pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
        'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
        "model-zoo config files found next to model_zoo.py (what pkg_resources returned)",
    ),
]

ROUTE_FILE_NAME = "deepkd_det_detectron2_route.json"

SHIM_SOURCE = '''"""Stand-in for detectron2's compiled C++/CUDA ops (written by DeepKD-Det's installer).

This detectron2 was installed by the offline route: the pure-Python v0.6 release without its
C++ build. Faster R-CNN does not need these ops (it uses torchvision's RoIAlign and NMS).
Rotated boxes, deformable convolution and the fast COCO evaluator do: calling one raises
MissingCompiledOp. For the full build, on a machine that can reach GitHub, run
    .venv/bin/python tools/install_detectron2.py --route git --force
"""

__deepkd_shim__ = True


class MissingCompiledOp(ImportError):
    """A compiled detectron2 op was requested from the pure-Python install."""


def get_compiler_version():
    return "not built (pure-Python detectron2 from DeepKD-Det's offline route)"


def get_cuda_version():
    return "not built"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise MissingCompiledOp(
        f"detectron2._C.{name} is a compiled C++ op, and this detectron2 is the pure-Python v0.6 "
        "installed by DeepKD-Det's offline route (no compiled ops). Faster R-CNN does not need it; "
        "rotated boxes, deformable convolution and the fast COCO evaluator do (use "
        "COCOEvaluator(..., use_fast_impl=False)). For the full build run "
        "'.venv/bin/python tools/install_detectron2.py --route git --force' on a machine that can "
        "reach GitHub (see README, 'How the install works')."
    )
'''

STAGED_PYPROJECT = """[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "detectron2"
version = "0.6"
description = "detectron2 v0.6, pure Python (no compiled ops), installed by DeepKD-Det's offline route"

[tool.setuptools.packages.find]
include = ["detectron2*"]

[tool.setuptools.package-data]
"detectron2.model_zoo" = ["configs/**/*"]
"""


class InstallError(RuntimeError):
    """An install route failed; the message says why."""


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def route_file() -> Path:
    return site_packages() / ROUTE_FILE_NAME


def record_route(route: str, **details) -> None:
    info = {"route": route, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details}
    path = route_file()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)
    log(f"recorded route '{route}' in {path}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_archive(path: Path, expected: str = FALLBACK_SHA256) -> None:
    """Refuse an archive whose sha256 is not the verified one."""
    actual = sha256_of(path)
    if actual != expected:
        raise InstallError(
            f"refusing {path.name}: its sha256 is {actual}, expected {expected} (the verified "
            "pb1-detectron2 0.6 sdist). The archive may be corrupted or tampered with; nothing was installed."
        )


def pip(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    log("running: " + " ".join(cmd))
    return subprocess.run(cmd, timeout=timeout, check=False)


def detectron2_importable() -> bool:
    probe = "import detectron2, detectron2.modeling; print(detectron2.__version__)"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    return res.returncode == 0


def describe_existing() -> str:
    probe = (
        "import detectron2._C as C, json; print(json.dumps({'shim': bool(getattr(C, '__deepkd_shim__', False)),"
        " 'file': getattr(C, '__file__', '')}))"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return "detectron2 without a detectron2._C module"
    info = json.loads(res.stdout.strip().splitlines()[-1])
    return "pure Python with the _C shim" if info["shim"] else f"compiled ops ({info['file']})"


# --------------------------------------------------------------------------------------------
# route 2: official git repository
# --------------------------------------------------------------------------------------------
def network_reachable(host=GIT_HOST, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def install_from_git(timeout: float = 3600.0) -> None:
    if not network_reachable():
        raise InstallError(f"{GIT_HOST[0]} is not reachable from this machine (3 s TCP probe)")
    res = pip(
        "install",
        "--no-build-isolation",  # the C++ ops build against the torch already installed
        f"git+{GIT_URL}@{GIT_COMMIT}",
        timeout=timeout,
    )
    if res.returncode != 0:
        raise InstallError(f"pip could not build detectron2 from git (exit code {res.returncode})")
    record_route("git", commit=GIT_COMMIT, url=GIT_URL)


# --------------------------------------------------------------------------------------------
# route 3: verified PyPI fallback
# --------------------------------------------------------------------------------------------
def _index_url() -> str:
    """The package index pip is configured with (PIP_INDEX_URL, pip config), else PyPI's."""
    url = os.environ.get("PIP_INDEX_URL", "")
    if not url:
        res = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
        )
        url = res.stdout.strip() if res.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def _fetch_from_index(dest: Path) -> Path:
    """Fetch the sdist from the index's PEP 503 page, as pip does, without building metadata.

    Current pip refuses to even download this sdist: its metadata lists an extra with a
    direct-URL dependency (``panopticapi @ https://...``), which pip >= 25 rejects for files
    from PyPI. The file is sha256-checked afterwards either way.
    """
    import re
    import urllib.parse
    import urllib.request

    page_url = f"{_index_url()}/pb1-detectron2/"
    if page_url.startswith("file:"):  # a local index folder, as pip reads it: <name>/index.html
        page_url += "index.html"
    with urllib.request.urlopen(page_url, timeout=60) as resp:
        page = resp.read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', page):
        if urllib.parse.urlsplit(href).path.endswith("/" + FALLBACK_ARCHIVE_NAME):
            url = urllib.parse.urljoin(page_url, href)
            break
    else:
        raise InstallError(f"{FALLBACK_ARCHIVE_NAME} is not listed on {page_url}")
    archive = dest / FALLBACK_ARCHIVE_NAME
    with urllib.request.urlopen(url, timeout=300) as resp, open(archive, "wb") as f:
        shutil.copyfileobj(resp, f)
    return archive


def download_fallback(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    # --require-hashes makes pip itself check the archive before it runs anything from it.
    req = dest / "requirements.txt"
    req.write_text(f"{FALLBACK_REQUIREMENT} --hash=sha256:{FALLBACK_SHA256}\n")
    res = pip(
        "download", "--no-deps", "--no-build-isolation", "--require-hashes", "-r", str(req), "-d", str(dest)
    )
    archive = dest / FALLBACK_ARCHIVE_NAME
    if res.returncode == 0 and archive.exists():
        return archive
    log(f"pip download failed (exit code {res.returncode}); fetching {FALLBACK_ARCHIVE_NAME} from the index directly")
    try:
        return _fetch_from_index(dest)
    except (OSError, ValueError) as e:
        raise InstallError(f"could not download {FALLBACK_REQUIREMENT} from the package index: {e}") from e


def stage_fallback(archive: Path, workdir: Path) -> Path:
    """Unpack the verified sdist and lay out an installable pure-Python detectron2."""
    with tarfile.open(archive, "r:gz") as tar:
        if sys.version_info >= (3, 11, 4) or hasattr(tarfile, "data_filter"):
            tar.extractall(workdir, filter="data")
        else:  # pragma: no cover - old Pythons without extraction filters
            for member in tar.getmembers():
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise InstallError(f"unsafe path in archive: {member.name}")
            tar.extractall(workdir)
    roots = [p for p in workdir.iterdir() if p.is_dir()]
    if len(roots) != 1 or not (roots[0] / "detectron2" / "__init__.py").exists():
        raise InstallError(f"{archive.name} does not have the expected layout (one folder holding detectron2/)")
    src = roots[0]
    stage = workdir / "staged"
    shutil.copytree(src / "detectron2", stage / "detectron2")
    for name in ("LICENSE", "README.md"):
        if (src / name).exists():
            shutil.copy(src / name, stage / name)

    for rel, old, new, why in SOURCE_PATCHES:
        target = stage / rel
        text = target.read_text()
        if text.count(old) != 1:
            raise InstallError(f"expected exactly one {old!r} in {rel}; this is not the verified v0.6 source")
        target.write_text(text.replace(old, new))
        log(f"patched {rel}: {why}")

    (stage / "detectron2" / "_C.py").write_text(SHIM_SOURCE)
    (stage / "pyproject.toml").write_text(STAGED_PYPROJECT)
    return stage


def install_fallback(archive: Path | None = None, with_deps: bool = True) -> None:
    with tempfile.TemporaryDirectory(prefix="deepkd-d2-") as tmp:
        tmpdir = Path(tmp)
        if archive is None:
            archive = download_fallback(tmpdir / "download")
        verify_archive(Path(archive))
        log(f"{Path(archive).name}: sha256 verified")
        unpack = tmpdir / "unpack"
        unpack.mkdir()
        stage = stage_fallback(Path(archive), unpack)
        if with_deps:
            res = pip("install", *FALLBACK_DEPENDENCIES)
            if res.returncode != 0:
                raise InstallError("could not install detectron2's runtime dependencies")
        res = pip("install", "--no-deps", "--no-build-isolation", str(stage))
        if res.returncode != 0:
            raise InstallError(f"pip could not install the staged detectron2 (exit code {res.returncode})")
    record_route(
        "pypi-fallback",
        requirement=FALLBACK_REQUIREMENT,
        sha256=FALLBACK_SHA256,
        patches=["_C shim (compiled ops raise MissingCompiledOp)"] + [why for *_, why in SOURCE_PATCHES],
    )


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", choices=["auto", "existing", "git", "pypi-fallback"], default="auto")
    parser.add_argument("--force", action="store_true", help="install even if detectron2 already imports")
    parser.add_argument("--archive", type=Path, help="use this local pb1-detectron2-0.6.tar.gz (sha256-checked)")
    parser.add_argument("--no-deps", action="store_true", help="fallback route: do not install v0.6's dependencies")
    args = parser.parse_args(argv)

    if args.route in ("auto", "existing") and not args.force and detectron2_importable():
        desc = describe_existing()
        log(f"route: existing (detectron2 already importable: {desc})")
        if not route_file().exists():
            record_route("existing", detail=desc)
        return 0
    if args.route == "existing":
        log("route 'existing' requested but detectron2 does not import")
        return 1

    errors = []
    if args.route in ("auto", "git") and args.archive is None:
        try:
            log(f"trying route 'git' ({GIT_URL} @ {GIT_COMMIT[:12]})")
            install_from_git()
            log("route: git (official repository, compiled ops)")
            return 0
        except (InstallError, subprocess.TimeoutExpired) as e:
            errors.append(f"git: {e}")
            log(f"route 'git' failed: {e}")
            if args.route == "git":
                return 1
    try:
        log(f"trying route 'pypi-fallback' ({FALLBACK_REQUIREMENT}, sha256 {FALLBACK_SHA256[:12]}...)")
        install_fallback(args.archive, with_deps=not args.no_deps)
    except InstallError as e:
        errors.append(f"pypi-fallback: {e}")
        log("FAILED: " + " | ".join(errors))
        return 1
    log("route: pypi-fallback (pure-Python detectron2 v0.6, _C shim, source fixes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
