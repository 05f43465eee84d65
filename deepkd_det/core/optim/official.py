"""The update of the released DeepKD reference optimizer (``compat="official"``), emulated exactly.

docs/maths.md ("5. The released reference code") lists how it differs from the paper. Per
parameter, with ``has_*`` = "got that component's gradient this step":

* TOG (no weight decay): decay ``mu_tcg`` if has_tcg, else ``mu_ncg`` if has_ncg, else the
  mean of the three momenta; with ``mu_tog == 0`` there is no buffer, the raw gradient is used.
* NCG: decay ``mu_ncg`` if has_tog, else ``mu_tcg`` if has_tcg, else (gradient + wd * w,
  mean momentum).
* TCG: gradient + wd * w always; decay ``mu_tcg`` if has_tog, else ``mu_ncg`` if has_ncg, else
  wd is added a second time and the mean momentum is used.

The parameter is updated in place after each component (TOG, NCG, TCG), so the weight decay of
TCG sees the weights already moved by TOG and NCG. First folds copy the (weight-decayed, for
TCG) gradient. The decay of a buffer depends on which *other* components reached the
parameter, so this mode needs every component's gradient at once (kept until ``step``) and
stores its buffers unscaled (scale 1.0).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .functional import DEEPKD_COMPONENTS, scale_key, scaled_buffer_key

__all__ = ["official_deepkd_step_"]



def official_deepkd_step_(
    param_groups: Sequence[dict],
    momenta: Callable[[dict], Dict[str, float]],
    state: Dict[torch.Tensor, dict],
    stash: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]],
) -> None:
    """Applies the reference update to every group, in place.

    ``momenta(group)`` gives ``{component: mu}``; ``state`` is the optimizer's per-parameter
    state; ``stash`` maps each component to the ``(param, grad)`` pairs it reached this step.
    """
    # component -> {id(param): grad}: O(1) membership instead of the reference's list scans
    got = {c: {id(p): g for p, g in stash.get(c, ())} for c in DEEPKD_COMPONENTS}
    for group in param_groups:
        _official_group(group, momenta(group), state, got)


def _official_group(group: dict, mus: Dict[str, float], state, got: Dict[str, Dict[int, torch.Tensor]]) -> None:
    mu_mean = (mus["tog"] + mus["tcg"] + mus["ncg"]) / 3.0
    damp = float(group["dampening"])
    wd = float(group["weight_decay"])
    lr = float(group["lr"])
    # Decay rule per component: (component checked first, its mu), (checked second, its mu).
    rules = {
        "tog": ((got["tcg"], mus["tcg"]), (got["ncg"], mus["ncg"])),
        "ncg": ((got["tog"], mus["ncg"]), (got["tcg"], mus["tcg"])),
        "tcg": ((got["tog"], mus["tcg"]), (got["ncg"], mus["ncg"])),
    }
    for component in ("tog", "ncg", "tcg"):
        members = [p for p in group["params"] if id(p) in got[component]]
        if not members:
            continue
        grads = [got[component][id(p)] for p in members]
        if component == "tcg" and wd:
            grads = torch._foreach_add(grads, members, alpha=wd)  # w as moved by TOG and NCG
        if component == "tog" and mus["tog"] == 0.0:
            torch._foreach_add_(members, grads, alpha=-lr)  # the reference keeps no TOG buffer then
            continue
        buf_key, s_key = scaled_buffer_key(component), scale_key(component)
        (first_set, first_mu), (second_set, second_mu) = rules[component]
        buckets: Dict[float, Tuple[list, list]] = {}
        extra_wd: Tuple[list, list, list] = ([], [], [])  # NCG / TCG "else" branch: g + wd * w
        rescale_bufs, rescale_factors = [], []
        for p, g in zip(members, grads):
            s = state[p]
            buf = s.get(buf_key)
            if buf is None:
                s[buf_key] = g.clone()
                s[s_key] = 1.0
                continue
            if s[s_key] != 1.0:  # buffer saved by paper mode: store it unscaled
                rescale_bufs.append(buf)
                rescale_factors.append(1.0 / s[s_key])
                s[s_key] = 1.0
            if id(p) in first_set:
                mu = first_mu
            elif id(p) in second_set:
                mu = second_mu
            elif component != "tog" and wd:
                extra_wd[0].append(p)
                extra_wd[1].append(buf)
                extra_wd[2].append(g)
                continue
            else:
                mu = mu_mean
            bufs, gs = buckets.setdefault(mu, ([], []))
            bufs.append(buf)
            gs.append(g)
        if rescale_bufs:
            torch._foreach_mul_(rescale_bufs, rescale_factors)
        if extra_wd[0]:
            ps, bufs, gs = extra_wd
            gs = torch._foreach_add(gs, ps, alpha=wd)
            torch._foreach_mul_(bufs, mu_mean)
            torch._foreach_add_(bufs, gs, alpha=1.0 - damp)
        for mu, (bufs, gs) in buckets.items():
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, gs, alpha=1.0 - damp)
        torch._foreach_add_(members, [state[p][buf_key] for p in members], alpha=-lr)
