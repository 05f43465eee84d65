"""The package's import rules (docs/architecture.md): ``core`` is pure torch and imports neither
detectron2 nor the task adapters; ``det``, ``cls`` and ``seg`` never import each other; ``cls`` and
``seg`` never import detectron2."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deepkd_det"

FORBIDDEN = {
    "core": ("detectron2", "deepkd_det.det", "deepkd_det.cls", "deepkd_det.seg"),
    "det": ("deepkd_det.cls", "deepkd_det.seg"),
    "cls": ("detectron2", "deepkd_det.det", "deepkd_det.seg"),
    "seg": ("detectron2", "deepkd_det.det", "deepkd_det.cls"),
}


def _imports(path: Path):
    """Absolute names of every import in the file, at any depth (function-level imports too)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package += ".__init__"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield node.lineno, name
            for alias in node.names:  # "from deepkd_det import det" imports deepkd_det.det
                yield node.lineno, f"{name}.{alias.name}"


def _violations(folder: str):
    out = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for lineno, name in _imports(path):
            for bad in FORBIDDEN[folder]:
                if name == bad or name.startswith(bad + "."):
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{lineno} imports {name}")
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports_follow_the_rules(folder):
    assert _violations(folder) == []


def test_the_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    # The rule check itself must be able to fail: a relative import from core into det.
    fake = tmp_path / "deepkd_det" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from ..det import config\n    import detectron2.data\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "deepkd_det")
    found = _violations("core")
    assert any("imports deepkd_det.det" in v for v in found) and any("detectron2.data" in v for v in found)


def test_core_cls_and_seg_import_without_detectron2():
    # With detectron2 unimportable, every core module and the classification and segmentation packages load.
    modules = sorted(
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).replace(".__init__", "")
        for folder in ("core", "cls", "seg")
        for p in (PACKAGE / folder).rglob("*.py")
    )
    code = (
        "import sys, importlib\n"
        "sys.modules['detectron2'] = None\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok', len(sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok")
