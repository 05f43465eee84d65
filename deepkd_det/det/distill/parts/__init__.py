"""One file a distillation method (``base.DistillPart``); importing this package imports every
module of the folder, which registers its parts."""

import importlib
import pkgutil

from .base import DISTILL_PART_REGISTRY, NEEDS, DistillPart, part_order

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DISTILL_PART_REGISTRY", "NEEDS", "DistillPart", "part_order"]
