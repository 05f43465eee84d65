"""Print the environment DeepKD-Det runs in: ``python -m deepkd_det.env``.

Like detectron2's ``collect_env``: Python, torch, torchvision, detectron2 and, above all, the
route by which detectron2 was installed (see ``tools/install_detectron2.py``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import platform
import sys
import sysconfig
from pathlib import Path
from typing import Dict

ROUTE_FILE_NAME = "deepkd_det_detectron2_route.json"  # written by tools/install_detectron2.py


def _version(module: str, dist: str = "") -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # report, never crash: this tool is for bug reports
        return f"not importable ({type(e).__name__}: {e})"
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(dist or module)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


def detectron2_route() -> Dict[str, str]:
    """How detectron2 got here: the recorded route and what ``detectron2._C`` actually is."""
    info: Dict[str, str] = {}
    recorded = Path(sysconfig.get_paths()["purelib"]) / ROUTE_FILE_NAME
    if recorded.exists():
        try:
            for key, value in json.loads(recorded.read_text()).items():
                info[key] = "; ".join(value) if isinstance(value, list) else str(value)
        except (OSError, ValueError) as e:
            info["route"] = f"unreadable record {recorded} ({e})"
    else:
        info["route"] = "unrecorded (detectron2 was not installed by tools/install_detectron2.py)"
    try:
        import detectron2._C as compiled
    except ImportError as e:
        info["compiled_ops"] = f"missing ({e})"
    else:
        if getattr(compiled, "__deepkd_shim__", False):
            info["compiled_ops"] = "shim (pure-Python v0.6: rotated boxes, deformable conv, fast COCOeval unavailable)"
        else:
            info["compiled_ops"] = f"built ({getattr(compiled, '__file__', '?')})"
    return info


def collect_env() -> Dict[str, str]:
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "deepkd_det": _version("deepkd_det"),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "detectron2": _version("detectron2"),
        "numpy": _version("numpy"),
        "pycocotools": _version("pycocotools"),
        "fvcore": _version("fvcore"),
        "Pillow": _version("PIL"),
        "cv2": _version("cv2"),
    }
    try:
        import torch

        env["cuda_available"] = str(torch.cuda.is_available())
        env["cpu_threads"] = str(torch.get_num_threads())
    except ImportError:
        pass
    if not env["detectron2"].startswith("not importable"):
        env.update({f"detectron2_{k}": v for k, v in detectron2_route().items()})
    return env


def main() -> None:
    env = collect_env()
    width = max(len(k) for k in env)
    for key, value in env.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
