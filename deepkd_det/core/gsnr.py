"""Gradient (and momentum-buffer) signal-to-noise ratio of each gradient component.

For a component c and parameter element j over M mini-batches (docs/maths.md, "GSNR"):

    GSNR_j = mean(g_j)^2 / (var(g_j) + eps)

reported as the mean over the elements of each parameter tensor (per layer) and over all
elements (overall); BSNR is the same statistic of the momentum buffers after each step.
``var`` is the population variance (``unbiased=True`` divides by M - 1); ``eps`` keeps
elements with zero variance finite (an element that is always 0 has GSNR 0).

The meter is cheap enough to leave on: it is active for a window of M iterations every P
iterations and only then accumulates a running sum and sum of squares per element (float64 by
default; the accumulators are freed when the window closes). While a window is open that is
2 accumulators x (components + buffers) per measured element: 12 float64 = 24x the float32
parameter bytes for DeepKD with buffers; pass a subset of ``named_parameters`` or
``dtype=torch.float32`` to measure large models.

    meter = GSNRMeter(student.named_parameters(), window=32, period=500)
    step = DecoupledStep(optimizer, grad_hook=meter.gradient_hook)
    for it in range(max_iter):
        meter.begin(it)
        step(losses); optimizer.step()
        meter.observe_buffers(optimizer)
        scalars = meter.end()          # {"gsnr/tog": ..., "bsnr/ncg": ...} at a window's last iteration
        if scalars: log(scalars)       # per-layer values in meter.per_layer
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["GSNRMeter", "gsnr_from_moments"]


def gsnr_from_moments(
    total: torch.Tensor, total_sq: torch.Tensor, count: int, eps: float = 1e-12, unbiased: bool = False
) -> torch.Tensor:
    """Element-wise GSNR from the sum and the sum of squares of ``count`` samples."""
    if count < 2:
        raise ValueError(f"GSNR needs at least 2 samples, got {count}")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_(min=0.0)  # rounding can make it slightly negative
    if unbiased:
        var = var * (count / (count - 1))
    return mean * mean / (var + eps)


class GSNRMeter:
    """Windowed GSNR/BSNR meter (see module docstring).

    Args:
        named_parameters: ``(name, parameter)`` pairs to measure, e.g. ``model.named_parameters()``.
        window: M, number of consecutive iterations per measurement (>= 2).
        period: P, a window starts every P iterations (>= window).
        start: first iteration of the first window.
        eps: added to the variance.
        unbiased: divide the variance by M - 1 instead of M.
        dtype: accumulator dtype (float64 avoids cancellation in ``E[g^2] - E[g]^2``).
    """

    def __init__(
        self,
        named_parameters: Iterable[Tuple[str, torch.Tensor]],
        window: int = 20,
        period: int = 500,
        start: int = 0,
        eps: float = 1e-12,
        unbiased: bool = False,
        dtype: torch.dtype = torch.float64,
    ):
        pairs = list(named_parameters)
        if not pairs:
            raise ValueError("GSNRMeter needs at least one parameter")
        if int(window) < 2:
            raise ValueError(f"GSNR window must be >= 2 iterations, got {window}")
        if int(period) < int(window):
            raise ValueError(f"GSNR period ({period}) must be >= window ({window})")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]
        self._position = {id(p): j for j, p in enumerate(self.params)}
        self.window, self.period, self.start = int(window), int(period), int(start)
        self.eps, self.unbiased, self.dtype = float(eps), bool(unbiased), dtype
        self.active = False
        self.iteration: Optional[int] = None
        # (kind, component) -> position -> [sum, sum of squares, count]
        self._moments: Dict[Tuple[str, str], Dict[int, list]] = {}
        self.per_layer: Dict[str, Dict[str, float]] = {}

    # -------------------------------------------------------------------------- schedule
    def is_active_at(self, iteration: int) -> bool:
        return iteration >= self.start and (iteration - self.start) % self.period < self.window

    def begin(self, iteration: int) -> bool:
        """Marks the start of an iteration; returns whether the meter records in it."""
        self.iteration = int(iteration)
        self.active = self.is_active_at(self.iteration)
        return self.active

    def end(self) -> Optional[Dict[str, float]]:
        """Closes the iteration; at the last iteration of a window returns the scalars and resets."""
        was_active, self.active = self.active, False
        if not was_active or self.iteration is None:
            return None
        if (self.iteration - self.start) % self.period != self.window - 1:
            return None
        scalars, per_layer = self.compute()
        self.per_layer = per_layer
        self.reset()
        return scalars

    def reset(self) -> None:
        self._moments = {}

    # --------------------------------------------------------------------------- observe
    @torch.no_grad()
    def _accumulate(self, kind: str, component: str, params: Sequence[torch.Tensor], values) -> None:
        moments = self._moments.setdefault((kind, component), {})
        for p, v in zip(params, values):
            if v is None:
                continue
            j = self._position.get(id(p))
            if j is None:
                continue
            v = v.detach().to(self.dtype)
            entry = moments.get(j)
            if entry is None:
                moments[j] = [v.clone(), v * v, 1]
            else:
                entry[0].add_(v)
                entry[1].addcmul_(v, v)
                entry[2] += 1

    def observe_gradients(
        self,
        component: str,
        grads: Sequence[Optional[torch.Tensor]],
        params: Optional[Sequence[torch.Tensor]] = None,
    ) -> None:
        """Records one mini-batch gradient of ``component`` (aligned with ``params``, default the meter's)."""
        if self.active:
            self._accumulate("gsnr", component, self.params if params is None else params, grads)

    def gradient_hook(self, component: str, params: List[torch.Tensor], grads: List[Optional[torch.Tensor]]) -> None:
        """``DecoupledStep`` grad_hook signature."""
        self.observe_gradients(component, grads, params)

    def observe_buffers(self, optimizer) -> None:
        """Records every component's momentum buffer (call after ``optimizer.step()``)."""
        if not self.active:
            return
        for component in optimizer.components:
            bufs = [optimizer.momentum_buffer(p, component) for p in self.params]
            self._accumulate("bsnr", component, self.params, bufs)

    # --------------------------------------------------------------------------- compute
    @torch.no_grad()
    def compute(self) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
        """``({"gsnr/<c>": overall, "bsnr/<c>": ...}, {"gsnr/<c>": {layer: value}})`` from what is recorded.

        Overall is the mean over all elements of the measured parameters; a parameter with
        fewer than 2 samples in the window is left out.
        """
        scalars: Dict[str, float] = {}
        per_layer: Dict[str, Dict[str, float]] = {}
        for (kind, component), moments in sorted(self._moments.items()):
            key = f"{kind}/{component}"
            layers: Dict[str, float] = {}
            total, count = 0.0, 0
            for j in sorted(moments):
                s, sq, n = moments[j]
                if n < 2:
                    continue
                ratio = gsnr_from_moments(s, sq, n, self.eps, self.unbiased)
                layers[self.names[j]] = float(ratio.mean())
                total += float(ratio.sum())
                count += ratio.numel()
            if count:
                scalars[key] = total / count
                per_layer[key] = layers
        return scalars, per_layer
