"""Mixed precision for the decoupled step: autocast dtypes and one gradient scaler over all components.

bf16 needs no scaling: the forward runs under ``torch.autocast`` and the step is unchanged. fp16
gradients can overflow, so the losses are multiplied by a dynamic scale ``S`` before their
backward passes, as ``torch.amp.GradScaler`` does for one loss. With several components that
each fold into their own momentum buffer, the scale must be one for all of them:

    grads_c = grad(S * L_c) / S                    for every component c (unscaled before folding)
    overflow = any gradient of any component is inf / NaN
    overflow:  fold nothing (every buffer and parameter untouched), S *= backoff
    otherwise: fold every component; S *= growth after ``growth_interval`` clean steps

``ComponentGradScaler`` holds ``S`` and the count of clean steps (``state_dict`` for exact
resume); ``core.step.DecoupledStep(scaler=...)`` applies it.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Mapping, Optional, Sequence

import torch

__all__ = ["AMP_DTYPES", "ComponentGradScaler", "amp_dtype", "autocast"]

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def amp_dtype(name: str, key: str = "AMP.DTYPE") -> torch.dtype:
    """``"fp16"`` / ``"bf16"`` as a torch dtype; ValueError naming ``key`` otherwise."""
    if name not in AMP_DTYPES:
        raise ValueError(f"{key} must be one of {tuple(AMP_DTYPES)}, got {name!r}")
    return AMP_DTYPES[name]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` in ``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class ComponentGradScaler:
    """One dynamic loss scale shared by every gradient component of a step (module docstring).

    The same defaults as ``torch.amp.GradScaler``. ``update`` reads the overflow flag on the host
    once per step: the decoupled step has to know before it folds anything.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise ValueError("ComponentGradScaler needs init_scale > 0, growth_factor > 1, backoff_factor in (0, 1) "
                             "and growth_interval >= 1")
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.clean_steps = 0  # steps without overflow since the scale last changed
        self.skipped_steps = 0

    def scale_losses(self, losses: Sequence) -> List:
        """``[(name, S * loss), ...]`` for ``[(name, loss), ...]``."""
        return [(name, loss * self.scale) for name, loss in losses]

    @torch.no_grad()
    def unscale_(self, grads: Sequence[Optional[torch.Tensor]], found_inf: Optional[Dict] = None) -> Dict:
        """Divides ``grads`` by ``S`` in place; accumulates per device a 1-element flag of overflow.

        Returns ``{device: flag}`` (pass it back in for the next component's gradients).
        """
        found_inf = {} if found_inf is None else found_inf
        by_key: Dict[tuple, List[torch.Tensor]] = {}
        for g in grads:
            if g is not None:
                by_key.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), tensors in by_key.items():
            flag = found_inf.get(device)
            if flag is None:
                flag = found_inf[device] = torch.zeros(1, dtype=torch.float32, device=device)
            inv = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=device)
            # Fused: multiplies by inv and sets flag to 1 where any element is inf / NaN.
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, inv)
        return found_inf

    def update(self, found_inf: Mapping) -> bool:
        """Adapts ``S`` to this step's overflow flags; returns True when the step must be skipped."""
        overflow = any(float(flag.item()) > 0 for flag in found_inf.values())
        if overflow:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.clean_steps = 0
        return overflow

    def state_dict(self) -> Dict[str, float]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps,
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval}

    def load_state_dict(self, state: Mapping) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
