"""The distillation part: one method of the detector side, small and self-contained.

A part says what it needs from one training forward (``needs``: the student's backbone
``"features"``, its R-CNN ``"box_head"`` on the sampled proposals, its ``"dense_head"``
outputs), owns its trainable modules (``modules()``: training-only, registered on the wrapper
under these names, so their state-dict keys are ``<name>.*``), and turns one iteration's
``DistillContext`` into named losses (``losses(ctx)``). ``components()`` names the losses that
feed DeepKD's target-class (``"tcg"``) and non-target-class (``"ncg"``) gradients; every other
loss, the detector's own included, feeds the task gradient (TOG). ``from_config(cfg, student,
teacher)`` returns the part, or None when its keys turn it off. Parts are registered in
``DISTILL_PART_REGISTRY`` (every module of this folder is imported by the package); the wrapper
builds them in ``part_order()``: by their ``order``. A new method is one file in this folder plus
its config keys.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Mapping, Optional, Tuple

import torch
from detectron2.utils.registry import Registry
from torch import nn

__all__ = ["DISTILL_PART_REGISTRY", "DistillPart", "NEEDS", "part_order", "training_only_modules"]

DISTILL_PART_REGISTRY = Registry("DISTILL_PART")
DISTILL_PART_REGISTRY.__doc__ = "Distillation parts of the detector side (deepkd_det/det/distill/parts/base.py)."

# What a part can ask of one forward.
NEEDS = ("features", "box_head", "dense_head")



class DistillPart:
    """Base class of a distillation part (module docstring)."""

    name: str = ""
    # Build order = order of the losses in the loss dict; the modules are built (random
    # initialisation) in this order too, so it fixes the random stream of a run.
    order: float = 100.0
    # What ``describe`` calls it in messages ("ReviewKD head").
    what: str = ""
    needs: FrozenSet[str] = frozenset()
    # The names ``modules()`` uses (so that files holding them are known as training-only even
    # for a model built without this part).
    module_names: Tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg, student: nn.Module, teacher) -> Optional[DistillPart]:
        raise NotImplementedError

    @classmethod
    def enabled(cls, cfg) -> bool:
        """Whether the config turns this part on (decides whether a teacher is built)."""
        raise NotImplementedError

    @classmethod
    def disable(cls, cfg) -> None:
        """Turn this part off in ``cfg`` (not frozen): the student alone is evaluated / exported."""
        raise NotImplementedError

    def modules(self) -> Dict[str, nn.Module]:
        return {}

    def components(self) -> Mapping[str, str]:
        return {}

    def losses(self, ctx) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


def part_order() -> Tuple[str, ...]:
    """The registered parts' names, by ``order`` (then name)."""
    return tuple(sorted(dict(DISTILL_PART_REGISTRY), key=lambda n: (DISTILL_PART_REGISTRY.get(n).order, n)))


def training_only_modules() -> Dict[str, str]:
    """``{module name on the wrapper: what it is}`` of every registered part: the state-dict
    prefixes (``<name>.``) that are training-only, whichever parts a model was built with."""
    out: Dict[str, str] = {}
    for name in part_order():
        part = DISTILL_PART_REGISTRY.get(name)
        for module in part.module_names:
            out[module] = part.what or part.name
    return out
