"""The K of the dynamic top-k mask (DTM) as a function of training progress.

The paper describes a curriculum without a closed form: few, high-confidence non-target
classes early, more as training goes on, all of them by the late phase. ``TopKSchedule``
offers three shapes and validates them; defaults follow that description (linear from 10% of
the non-target classes at the start to all of them at 60% of training).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

__all__ = ["TopKSchedule", "SCHEDULE_MODES", "default_k_start"]

SCHEDULE_MODES = ("off", "constant", "linear", "step")


def default_k_start(num_nontarget: int) -> int:
    """The first K of the default schedule: 10% of the non-target classes, at least 2.

    NCKD compares the teacher's and the student's distributions over the kept non-target
    classes, renormalised: over one class both are 1 and NCKD is exactly zero, so K = 1 distils
    nothing. (With a single non-target class there is no other choice than K = 1.)
    """
    n = int(num_nontarget)
    return min(n, max(2, math.ceil(0.1 * n)))


class TopKSchedule:
    """Maps training progress in [0, 1] to K, the number of non-target classes NCKD keeps.

    Args:
        num_nontarget: number of non-target classes, ``C - 1``.
        mode: ``"off"`` (always all classes), ``"constant"`` (always ``k_start``),
            ``"linear"`` (``k_start`` until progress ``start``, linear to ``k_end`` at ``end``,
            then ``k_end``), ``"step"`` (``phases``: ``[(progress, K), ...]``; the K of the last
            phase that has begun; before the first phase ``k_start``).
        k_start: first K; default ``default_k_start(num_nontarget)``: ``max(2, ceil(0.1 * num_nontarget))``
            (K = 1 keeps one non-target class, and NCKD over one class is always zero).
        k_end: last K; default ``num_nontarget`` (all non-target classes).
    """

    def __init__(
        self,
        num_nontarget: int,
        mode: str = "linear",
        k_start: Optional[int] = None,
        k_end: Optional[int] = None,
        start: float = 0.0,
        end: float = 0.6,
        phases: Sequence[Tuple[float, int]] = (),
    ):
        if int(num_nontarget) < 1:
            raise ValueError(f"num_nontarget must be >= 1, got {num_nontarget}")
        if mode not in SCHEDULE_MODES:
            raise ValueError(f"top-k schedule mode must be one of {SCHEDULE_MODES}, got {mode!r}")
        self.num_nontarget = int(num_nontarget)
        self.mode = mode
        self.k_start = int(k_start) if k_start is not None else default_k_start(self.num_nontarget)
        self.k_end = int(k_end) if k_end is not None else self.num_nontarget
        self.start = float(start)
        self.end = float(end)
        self.phases = [(float(p), int(k)) for p, k in phases]
        self.last_progress: float = 0.0
        self._validate()

    @classmethod
    def from_cfg(cls, node: Any, num_nontarget: int) -> TopKSchedule:
        """From a config node with ``MODE, K_START, K_END`` (0: the default), ``START, END, PHASES``."""
        return cls(
            num_nontarget,
            mode=node.MODE,
            k_start=node.K_START or None,
            k_end=node.K_END or None,
            start=node.START,
            end=node.END,
            phases=[tuple(p) for p in node.PHASES],
        )

    def _check_k(self, name: str, k: int) -> None:
        if not 1 <= k <= self.num_nontarget:
            raise ValueError(
                f"top-k schedule: {name}={k} is out of range; K must lie in [1, C-1] = [1, {self.num_nontarget}]"
            )

    def _validate(self) -> None:
        self._check_k("k_start", self.k_start)
        self._check_k("k_end", self.k_end)
        if self.mode == "linear":
            if self.k_start > self.k_end:
                raise ValueError(f"top-k schedule: k_start={self.k_start} > k_end={self.k_end}")
            if not 0.0 <= self.start <= self.end <= 1.0:
                raise ValueError(
                    f"top-k schedule: need 0 <= start <= end <= 1, got start={self.start}, end={self.end}"
                )
        if self.mode == "step":
            if not self.phases:
                raise ValueError("top-k schedule: mode 'step' needs at least one phase (progress, K)")
            last_p, last_k = -1.0, self.k_start
            for p, k in self.phases:
                self._check_k("phase K", k)
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"top-k schedule: phase progress {p} is outside [0, 1]")
                if p <= last_p:
                    raise ValueError("top-k schedule: phase progress points must be strictly increasing")
                if k < last_k:
                    raise ValueError("top-k schedule: K must not decrease from one phase to the next")
                last_p, last_k = p, k

    def k_at(self, progress: float) -> int:
        """K at ``progress`` (clamped to [0, 1])."""
        p = min(max(float(progress), 0.0), 1.0)
        if self.mode == "off":
            return self.num_nontarget
        if self.mode == "constant":
            return self.k_start
        if self.mode == "linear":
            if p <= self.start:
                return self.k_start
            if p >= self.end:
                return self.k_end
            frac = (p - self.start) / (self.end - self.start)
            return int(round(self.k_start + frac * (self.k_end - self.k_start)))
        k = self.k_start
        for phase_p, phase_k in self.phases:
            if p >= phase_p:
                k = phase_k
        return k

    def __call__(self, progress: float) -> int:
        """K at ``progress``; remembers the progress so that it is saved with the state."""
        self.last_progress = float(progress)
        return self.k_at(progress)

    def topk_arg(self, progress: float) -> Optional[int]:
        """K as the ``topk`` argument of the losses: None when every non-target class is kept."""
        k = self(progress)
        return None if k >= self.num_nontarget else k

    def state_dict(self) -> Dict[str, Any]:
        return {
            "num_nontarget": self.num_nontarget,
            "mode": self.mode,
            "k_start": self.k_start,
            "k_end": self.k_end,
            "start": self.start,
            "end": self.end,
            "phases": [list(ph) for ph in self.phases],
            "last_progress": self.last_progress,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("num_nontarget", "mode", "k_start", "k_end", "start", "end"):
            setattr(self, key, state[key])
        self.phases = [(float(p), int(k)) for p, k in state.get("phases", [])]
        self.last_progress = float(state.get("last_progress", 0.0))
        self._validate()

    def __repr__(self) -> str:
        return (
            f"TopKSchedule(num_nontarget={self.num_nontarget}, mode={self.mode!r}, k_start={self.k_start}, "
            f"k_end={self.k_end}, start={self.start}, end={self.end}, phases={self.phases})"
        )
