#!/usr/bin/env python
"""Install detectron2 into the running Python environment, by the first route that works.

Detectron2 publishes no wheels, so ``make setup`` runs this tool with the project's venv
Python. Routes, tried in order (``--route`` forces one):

1. ``existing``: a detectron2 that is already installed (for example one you built from
   source) is kept as it is. ``--fix-source`` applies the source fixes below to it in place.
2. ``git``: the official repository at a pinned commit (``GIT_COMMIT``, after detectron2's
   Pillow-10 fix), fetched with git, given the source fixes, and built with its C++ ops
   (``pip install --no-build-isolation``). Where the network is closed it gives up within
   seconds (a TCP probe with a short timeout comes first).
3. ``pypi-fallback``: the verified pure-Python v0.6 from PyPI (``pb1-detectron2==0.6``, whose
   Python files are identical to the official v0.6 release). The archive is refused unless its
   sha256 matches; the C++ build is skipped; ``detectron2._C`` becomes a shim module whose ops
   raise a clear error.

Source fixes for a current stack (``SOURCE_FIXES``), applied where the source still has them:
``PIL.Image.LINEAR`` (removed in Pillow 10; an alias of ``BILINEAR``) becomes ``BILINEAR``,
and the model zoo's ``pkg_resources`` lookup (setuptools >= 81 no longer ships
``pkg_resources``; detectron2's current main still imports it) becomes the same path next to
``model_zoo.py``.

No route is recorded before an import check in a fresh interpreter (``IMPORT_CHECK_MODULES``);
a route that fails it falls through to the next, with one line saying why. The route taken is
printed and recorded in ``<site-packages>/deepkd_det_detectron2_route.json``
(``python -m deepkd_det.env`` reports it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple

GIT_URL = "https://github.com/facebookresearch/detectron2.git"
# detectron2 main of 2026-06-06. Needs to be at or after ff53992b (2023-07, "fix PIL.LINEAR
# warning"): the 2022 pin 2dde7068 fails `import detectron2.data` on Pillow >= 10.
GIT_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
GIT_HOST = ("github.com", 443)

# What the project imports from detectron2; a route is recorded only once all of these import
# in a fresh interpreter.
IMPORT_CHECK_MODULES = (
    "detectron2",
    "detectron2.config",
    "detectron2.data",
    "detectron2.modeling",
    "detectron2.model_zoo",
    "detectron2.checkpoint",
    "detectron2.engine",
    "detectron2.evaluation",
)

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



class SourceFix(NamedTuple):
    """Exact replacements in one detectron2 source file, applied all together or not at all."""

    path: str
    replacements: Tuple[Tuple[str, str], ...]
    why: str


# Source fixes for a current Python stack. Each old text must occur exactly once; a file that
# holds some but not all of a fix's old texts is refused rather than half-patched.
SOURCE_FIXES = (
    SourceFix(
        "detectron2/data/transforms/transform.py",
        (("interp=Image.LINEAR,", "interp=Image.BILINEAR,"),),
        "Image.LINEAR -> Image.BILINEAR (LINEAR was removed in Pillow 10; it was an alias of BILINEAR)",
    ),
    SourceFix(
        "detectron2/model_zoo/model_zoo.py",
        (
            ("import pkg_resources\n", ""),
            (
                'pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
                'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
            ),
        ),
        "model zoo: pkg_resources (gone from setuptools >= 81) -> the config path next to model_zoo.py",
    ),
)

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
        "reach GitHub (see docs/install.md)."
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


def verify_archive(path: Path, expected: Optional[str] = None) -> None:
    """Refuse an archive whose sha256 is not the verified one."""
    expected = expected or FALLBACK_SHA256
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


# --------------------------------------------------------------------------------------------
# every route: source fixes, then an import check in a fresh interpreter
# --------------------------------------------------------------------------------------------
def _fix_state(text: str, fix: SourceFix) -> str:
    """'applicable' (each old text once), 'absent' (none of them) or 'partial' (anything else)."""
    counts = [text.count(old) for old, _ in fix.replacements]
    if all(c == 1 for c in counts):
        return "applicable"
    return "absent" if not any(counts) else "partial"


def apply_source_fixes(root: Path, strict: bool = False) -> List[str]:
    """Apply ``SOURCE_FIXES`` to the detectron2 source under ``root`` (the folder holding ``detectron2/``).

    Returns the ``why`` of each fix applied. ``strict`` (the verified v0.6 archive): every fix
    must apply. Otherwise a fix none of whose old texts occur is taken as done (later detectron2
    fixed LINEAR itself); a file that matches a fix only in part is refused either way.
    """
    applied = []
    for fix in SOURCE_FIXES:
        target = root / fix.path
        text = target.read_text() if target.exists() else ""
        state = _fix_state(text, fix)
        if state == "applicable":
            for old, new in fix.replacements:
                text = text.replace(old, new)
            target.write_text(text)
            applied.append(fix.why)
            log(f"patched {fix.path}: {fix.why}")
        elif strict:
            raise InstallError(f"{fix.path} does not hold the text to fix ({fix.why}); this is not the verified v0.6 source")
        elif state == "partial":
            raise InstallError(f"{target} matches the fix '{fix.why}' only in part; refusing to half-patch it")
    return applied


def pending_source_fixes(root: Path) -> List[str]:
    """The fixes that would still apply to the detectron2 source under ``root``."""
    return [
        fix.why
        for fix in SOURCE_FIXES
        if (root / fix.path).exists() and _fix_state((root / fix.path).read_text(), fix) == "applicable"
    ]


_PROBE_MARK = "DEEPKD-IMPORT-CHECK "
_IMPORT_PROBE = r"""
import importlib, json, sys
report = {"failed": None, "error": ""}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as e:
        report["failed"], report["error"] = name, " ".join(f"{type(e).__name__}: {e}".split())
        break
d2 = sys.modules.get("detectron2")
if d2 is not None:
    report["file"] = getattr(d2, "__file__", None) or ""
    report["version"] = str(getattr(d2, "__version__", "unknown"))
    try:
        import detectron2._C as C
        report["compiled_ops"] = "shim" if getattr(C, "__deepkd_shim__", False) else "built (%s)" % C.__file__
    except BaseException as e:
        report["compiled_ops"] = "missing (%s: %s)" % (type(e).__name__, e)
print(MARK + json.dumps(report))
""".replace("MARK", repr(_PROBE_MARK))


def import_check(modules=IMPORT_CHECK_MODULES, timeout: float = 900.0) -> dict:
    """Import ``modules`` in a fresh interpreter with this Python and environment.

    Returns the probe's report: ``failed`` (the first module that did not import, or None),
    ``error`` (one line), and where detectron2 came from (``file``, ``version``,
    ``compiled_ops``). A fresh process, because an install changes what imports and a failed
    import leaves half-initialised modules behind; a neutral working directory, so that a
    ``./detectron2`` source folder cannot stand in for the installed package.
    """
    with tempfile.TemporaryDirectory(prefix="deepkd-d2-check-") as cwd:
        try:
            res = subprocess.run(
                [sys.executable, "-c", _IMPORT_PROBE, *modules], capture_output=True, text=True, cwd=cwd, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"failed": modules[0], "error": f"the import check took more than {timeout:.0f} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(_PROBE_MARK):
            return json.loads(line[len(_PROBE_MARK) :])
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
    return {"failed": modules[0], "error": f"the checking interpreter exited with code {res.returncode} ({tail})"}


def _location(report: dict) -> str:
    """The folder holding the ``detectron2/`` package the check imported."""
    return str(Path(report["file"]).parent.parent) if report.get("file") else "?"


def describe(report: dict) -> str:
    return (
        f"detectron2 {report.get('version', '?')} from {Path(report.get('file') or '?').parent}, "
        f"compiled ops: {report.get('compiled_ops', '?')}"
    )


def checked_or_uninstalled() -> dict:
    """The import check after a route installed detectron2; on failure the install is removed."""
    report = import_check()
    if report["failed"]:
        pip("uninstall", "-y", "detectron2")
        raise InstallError(
            f"installed, but import {report['failed']} failed: {report['error']} (uninstalled again)"
        )
    return report


# --------------------------------------------------------------------------------------------
# route 1: an existing detectron2
# --------------------------------------------------------------------------------------------
def find_detectron2_root() -> Optional[Path]:
    """The folder holding the installed ``detectron2/`` package, found without importing it."""
    probe = "import importlib.util as u; s = u.find_spec('detectron2'); print((s and s.origin) or '')"
    with tempfile.TemporaryDirectory(prefix="deepkd-d2-check-") as cwd:
        res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, check=False)
    origin = res.stdout.strip().splitlines()[-1] if res.returncode == 0 and res.stdout.strip() else ""
    return Path(origin).parent.parent if origin else None


def _fix_command() -> str:
    return f"{sys.executable} tools/install_detectron2.py --route existing --fix-source"


def use_existing(fix_source: bool = False, keep_record: bool = False) -> None:
    """Record the detectron2 already installed, once it passes the import check."""
    root = find_detectron2_root()
    if root is None:
        raise InstallError("no detectron2 is installed in this environment")
    applied = apply_source_fixes(root) if fix_source else []
    report = import_check()
    pending = pending_source_fixes(root)
    if report["failed"]:
        hint = (
            f"; its source under {root} still needs: {'; '.join(pending)}. '{_fix_command()}' applies that in place"
            if pending
            else ""
        )
        raise InstallError(f"import {report['failed']} failed: {report['error']}{hint}")
    for why in pending:  # imports today (e.g. an old setuptools still has pkg_resources) but is fragile
        log(f"note: detectron2 under {root} imports, but still needs: {why}. '{_fix_command()}' applies it")
    if keep_record and route_file().exists():
        try:
            record = json.loads(route_file().read_text())
        except (OSError, ValueError):
            record = {}
        recorded = record.get("route")
        # Still the install that was recorded: same place, same kind of compiled ops.
        same_kind = (recorded == "pypi-fallback") == (report.get("compiled_ops") == "shim")
        if recorded and same_kind and record.get("location", _location(report)) == _location(report):
            log(f"keeping the recorded route '{recorded}' ({describe(report)})")
            return
    record_route("existing", detail=describe(report), location=_location(report), patches=applied)


# --------------------------------------------------------------------------------------------
# route 2: official git repository
# --------------------------------------------------------------------------------------------
def network_reachable(host=GIT_HOST, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def _remote_host(url: str) -> Optional[Tuple[str, int]]:
    """(host, port) to probe for a network URL; None for a local repository (path or file://)."""
    parts = urllib.parse.urlsplit(url)
    default_ports = {"https": 443, "http": 80, "ssh": 22, "git": 9418}
    if parts.scheme in default_ports and parts.hostname:
        return parts.hostname, parts.port or default_ports[parts.scheme]
    return None


def fetch_git_source(url: str, commit: str, dest: Path, timeout: float = 900.0) -> Path:
    """A shallow checkout of exactly ``commit`` from ``url`` into ``dest`` (git checks the hash)."""
    git = shutil.which("git")
    if git is None:
        raise InstallError("git is not installed (the git route fetches detectron2 with git)")
    dest.mkdir(parents=True, exist_ok=True)
    steps = (["init", "-q"], ["fetch", "-q", "--depth", "1", url, commit], ["checkout", "-q", "FETCH_HEAD"])
    for step in steps:
        cmd = [git, "-C", str(dest), "-c", "advice.detachedHead=false", *step]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise InstallError(f"git {step[0]} {url} {commit[:12]} failed: {tail}")
    head = subprocess.run([git, "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head != commit:
        raise InstallError(f"git checked out {head or 'nothing'}, expected {commit}")
    return dest


def install_from_git(url: str = GIT_URL, commit: str = GIT_COMMIT, timeout: float = 3600.0) -> None:
    host = _remote_host(url)
    if host is not None and not network_reachable(host):
        raise InstallError(f"{host[0]} is not reachable from this machine (3 s TCP probe)")
    with tempfile.TemporaryDirectory(prefix="deepkd-d2-git-") as tmp:
        src = fetch_git_source(url, commit, Path(tmp) / "detectron2")
        applied = apply_source_fixes(src)
        # --no-build-isolation: the C++ ops build against the torch already installed.
        res = pip("install", "--no-build-isolation", str(src), timeout=timeout)
        if res.returncode != 0:
            raise InstallError(f"pip could not build detectron2 from git (exit code {res.returncode})")
    report = checked_or_uninstalled()
    record_route("git", commit=commit, url=url, detail=describe(report), location=_location(report), patches=applied)


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

    apply_source_fixes(stage, strict=True)
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
    report = checked_or_uninstalled()
    record_route(
        "pypi-fallback",
        requirement=FALLBACK_REQUIREMENT,
        sha256=FALLBACK_SHA256,
        detail=describe(report),
        location=_location(report),
        patches=["_C shim (compiled ops raise MissingCompiledOp)"] + [fix.why for fix in SOURCE_FIXES],
    )


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", choices=["auto", "existing", "git", "pypi-fallback"], default="auto")
    parser.add_argument("--force", action="store_true", help="auto: install even if an existing detectron2 passes the check")
    parser.add_argument(
        "--fix-source", action="store_true", help="existing route: apply the source fixes to the installed detectron2 in place"
    )
    parser.add_argument("--git-url", default=GIT_URL, help="git route: repository (a local path or file:// URL works)")
    parser.add_argument("--git-commit", default=GIT_COMMIT, help="git route: full 40-hex commit hash")
    parser.add_argument("--archive", type=Path, help="use this local pb1-detectron2-0.6.tar.gz (sha256-checked)")
    parser.add_argument("--no-deps", action="store_true", help="fallback route: do not install v0.6's dependencies")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[0-9a-f]{40}", args.git_commit):
        parser.error(f"--git-commit {args.git_commit!r} is not a full 40-hex commit hash")

    if args.route == "auto":
        routes = ([] if args.force else ["existing"]) + ([] if args.archive else ["git"]) + ["pypi-fallback"]
    else:
        routes = [args.route]
    attempts = {
        "existing": ("the detectron2 already installed", lambda: use_existing(args.fix_source, args.route == "auto")),
        "git": (f"{args.git_url} @ {args.git_commit[:12]}, compiled ops", lambda: install_from_git(args.git_url, args.git_commit)),
        "pypi-fallback": (
            f"{FALLBACK_REQUIREMENT}, sha256 {FALLBACK_SHA256[:12]}..., pure Python with the _C shim",
            lambda: install_fallback(args.archive, with_deps=not args.no_deps),
        ),
    }
    for route in routes:
        what, attempt = attempts[route]
        log(f"trying route '{route}' ({what})")
        try:
            attempt()
        except (InstallError, subprocess.TimeoutExpired, OSError) as e:
            log(f"route '{route}' not taken: {e}")
            continue
        log(f"route: {route} ({what}); import check passed")
        return 0
    log(f"FAILED: no route worked ({', '.join(routes)}; why is said above)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
