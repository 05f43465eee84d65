"""Decoupled-momentum SGD: the optimizers that gather param groups and keep one buffer per component.

``DeepKDOptimizer`` (TOG / TCG / NCG, docs/maths.md) and ``DOTOptimizer`` (task / distillation)
are thin subclasses of ``DecoupledMomentumSGD``, whose docstring writes the algorithm out. The
update maths lives in ``functional.py`` (paper mode) and ``official.py`` (the released code).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from ..dist import all_reduce_mean
from .blocking import CPU_BLOCK_BYTES, block_bytes_for
from .functional import (
    DEEPKD_COMPONENTS,
    apply_update_,
    buffer_scale,
    check_momentum,
    first_fold,
    fold_paper_,
    fold_tensor_,
    scale_key,
    scaled_buffer_key,
    torch_sgd_,
)
from .official import official_deepkd_step_

__all__ = ["COMPAT_MODES", "DEEPKD_COMPONENTS", "DOT_COMPONENTS", "DOTOptimizer", "DecoupledMomentumSGD",
           "DeepKDOptimizer"]

DOT_COMPONENTS = ("task", "kd")
COMPAT_MODES = ("paper", "official")


class DecoupledMomentumSGD(Optimizer):
    """SGD with one momentum buffer per gradient component; subclasses name the components.

    The algorithm (paper mode; docs/maths.md, "4. The DeepKD update"), per parameter ``w`` of a
    group with ``lr``, ``weight_decay`` and ``dampening``, and per component ``c`` with momentum
    ``mu_c`` (``_momenta``)::

        g_c  = gradient of component c (+ weight_decay * w for ``decay_component``)
        m_c  = g_c                                  on the first fold of the buffer
        m_c  = mu_c * m_c + (1 - dampening) * g_c   afterwards
        w   -= lr * sum_c m_c                       over the buffers folded since the last step

    A component that does not reach ``w`` in a step leaves its buffer untouched (as torch SGD
    skips a parameter whose grad is None). Gradients arrive one component at a time (``fold``
    with a whole list, or ``fold_param`` per tensor while streaming), so at most one gradient
    set has to exist at once; ``step`` applies the update.

    Two implementations of the paper update, equal to rounding:

    * **torch's SGD kernels** (paper mode, ``fold`` of whole lists, every ``mu_c > 0``): the update
      is one plain SGD step per component that share the weights (``b_c <- mu_c b_c + (1 - d)
      g_c``, ``w <- w - lr b_c``), so ``fold`` holds the gradient (a reference, no copy) and
      ``step`` runs torch's own SGD (``torch.optim.sgd.sgd``: fused where the device has it, else
      foreach, else the for-loop; ``functional.torch_sgd_``) once per component with that
      component's buffer. The calls that carry weight decay run first, on the weights before any
      update; a parameter a component did not reach is not in its call. The held gradients cost
      memory until ``step`` (up to one gradient set per component).
    * **our own foreach update** (``fold_param`` while streaming, a component with momentum 0,
      and ``compat="official"`` through ``official.py``): the buffer is folded at once and the
      gradient freed, ``step`` adds the buffers (``functional.py``).

    State per parameter: ``scaled_buffer_<c>`` holds ``s_c * m_c`` and ``<c>_scale`` holds the
    ``s_c`` it was stored with: 1.0 after torch's kernels and in official mode, ``(1 - mu_c) /
    (1 - dampening)`` after our own paper-mode fold (``functional.py`` says why). ``momentum_buffer``
    returns the true ``m_c``. A buffer stored with another scale (changed momentum, the other
    route or mode, an older checkpoint) is rescaled on its next use.

    Subclasses set ``components`` (the names ``fold`` accepts), ``decay_component`` (the one
    that carries weight decay) and implement ``_momenta(group) -> {component: mu}``; a
    ``compat="official"`` mode implements ``_step_official`` (see ``official.py``).

    Equal momenta (``merge_equal_momenta=True``, paper mode only): components whose momenta
    are equal in every group (``ties``, e.g. TOG and NCG of DeepKD on KD, both ``mu + 0.075``)
    evolve as one buffer, ``m_a + m_b <- mu (m_a + m_b) + (1 - dampening) (g_a + g_b)``, so
    they are folded as one component named ``"a+b"`` with the gradient of the summed loss: one
    backward pass instead of two. Per parameter, ``sources`` says which of the tied components
    reached it. The one buffer equals the sum of the separate ones as long as a component that
    reached a parameter once reaches it whenever any of its tie does (a parameter reached by
    one of them only, always, is fine; so is one that a tied component starts to reach later,
    when dampening is 0): otherwise the separate update would leave that component's part
    undecayed while the shared buffer decays it, and ``fold`` raises instead of drifting.
    Weight decay applies where ``decay_component`` is among the sources. ``momentum_buffer``
    takes the tie's name (the sum of its buffers); the official update keeps every buffer apart.
    """

    components: Tuple[str, ...] = ()
    decay_component: str = ""
    compat: str = "paper"
    merge_equal_momenta: bool = False
    # CPU cache blocking of the multi-pass updates (blocking.py); 0 turns it off.
    cpu_block_bytes: int = CPU_BLOCK_BYTES
    # torch's SGD implementation for the kernel route: "auto" (fused > foreach > for-loop), or one of them;
    # "own" turns the kernel route off (every fold uses our own foreach update).
    sgd_kernel: str = "auto"
    # Distributed "update" mode (set by core.step.DecoupledStep(dist_mode="update")): each worker folds
    # its own gradients into its buffers, and ``step`` averages the update sum_c m_c over the workers
    # with ``update_reducer(updates, params) -> averaged`` (one bucketed all-reduce) before applying it.
    # None: a local step.
    update_reducer = None

    def __init__(self, params, defaults: Dict[str, Any]):
        self._pending: Dict[str, List[Tuple[dict, List[torch.Tensor], List[torch.Tensor], float]]] = {}
        self._stash: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}  # official: (param, grad)
        self._held: Dict[str, list] = {}  # kernel route: component -> per group [(param, grad)]
        self._streamed: Dict[str, set] = {}  # component -> ids of params folded one by one this step
        self._group_of: Optional[Dict[int, dict]] = None
        self._sources: Dict[str, Dict[int, frozenset]] = {}  # tie -> id(param) -> tied components reaching it
        self._ties: Optional[tuple] = None
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- groups
    def _momenta(self, group: dict) -> Dict[str, float]:
        raise NotImplementedError

    def _validate_group(self, group: dict) -> None:
        lr = float(group["lr"])
        if lr < 0.0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if float(group["weight_decay"]) < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        if not 0.0 <= float(group["dampening"]) < 1.0:
            raise ValueError(f"dampening must lie in [0, 1), got {group['dampening']}")
        for name, mu in self._momenta(group).items():
            check_momentum(name, mu)

    def add_param_group(self, param_group: dict) -> None:
        # Validate on a merged view first, so that a bad group is refused before it is added.
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_group(merged)
        super().add_param_group(param_group)
        self._group_of = None
        self._ties = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_pending", {})
        self.__dict__.setdefault("_stash", {})
        self.__dict__.setdefault("_held", {})
        self._streamed = {}
        self._sources = {}
        self._ties = None
        self._group_of = None

    @property
    def params(self) -> List[torch.Tensor]:
        """All parameters in group order: the order an explicit gradient list must follow."""
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def ties(self) -> Tuple[Tuple[str, ...], ...]:
        """Groups of components with equal momenta in every param group that share one buffer.

        Empty unless ``merge_equal_momenta`` and paper mode. Fold a tie under ``tie_name(tie)``.
        """
        if not self.merge_equal_momenta or self.compat != "paper" or not self.param_groups:
            return ()
        if self._ties is None:  # once per step (momenta may change between steps, not within one)
            momenta = [self._momenta(g) for g in self.param_groups]
            same: Dict[tuple, List[str]] = {}
            for c in self.components:
                same.setdefault(tuple(m[c] for m in momenta), []).append(c)
            self._ties = tuple(tuple(cs) for cs in same.values() if len(cs) > 1)
        return self._ties

    @staticmethod
    def tie_name(tie: Sequence[str]) -> str:
        return "+".join(tie)

    @property
    def fold_names(self) -> Tuple[str, ...]:
        """What ``fold`` accepts: every component outside a tie, and each tie's name."""
        ties = self.ties
        tied = {c for tie in ties for c in tie}
        return tuple(c for c in self.components if c not in tied) + tuple(self.tie_name(t) for t in ties)

    def _members(self, name: str) -> Tuple[str, ...]:
        return tuple(name.split("+"))

    def _check_name(self, component: str) -> None:
        names = self.fold_names
        if component in names:
            return
        tie = next((t for t in self.ties if component in t), None)
        if tie is not None:
            raise ValueError(f"component {component!r} shares one buffer with {tie} (equal momenta): fold "
                             f"{self.tie_name(tie)!r}, or build the optimizer with merge_equal_momenta=False")
        raise ValueError(f"unknown gradient component {component!r}; this optimizer folds {names}")

    def _check_component(self, component: str) -> None:
        self._check_name(component)
        if (component in self._pending or component in self._stash or component in self._streamed
                or component in self._held):
            raise RuntimeError(f"component {component!r} was already folded in this step; call step() first")

    def component_losses(self, tog=None, tcg=None, ncg=None) -> Dict[str, torch.Tensor]:
        """Maps the three DeepKD losses onto this optimizer's components (None = absent)."""
        raise NotImplementedError

    def momentum_buffer(self, param: torch.Tensor, component: str) -> Optional[torch.Tensor]:
        """The true momentum buffer ``m_c`` of ``param`` (a new tensor), or None before its first fold.

        For a tie's name (``"tog+ncg"``), the one buffer its components share: the sum of theirs.
        """
        self._check_name(component)
        state = self.state.get(param, {})
        buf = state.get(scaled_buffer_key(component))
        if buf is None:
            return None
        return buf / state[scale_key(component)]

    # ------------------------------------------------------------------------------- fold
    def _gradients(self, grads: Optional[Sequence[Optional[torch.Tensor]]], clear_grad: bool):
        """Per group: a list of (param, grad) with grad not None; consumes ``.grad`` if asked."""
        per_group: List[List[Tuple[torch.Tensor, torch.Tensor]]] = []
        if grads is not None:
            grads = list(grads)
            total = sum(len(g["params"]) for g in self.param_groups)
            if len(grads) != total:
                raise ValueError(
                    f"fold() got {len(grads)} gradients for {total} parameters; pass one entry (or None) per "
                    "parameter, in the order of optimizer.params"
                )
        offset = 0
        for group in self.param_groups:
            pairs = []
            for i, p in enumerate(group["params"]):
                if grads is None:
                    g = p.grad
                    if g is not None and clear_grad:
                        p.grad = None  # the next component's backward must not accumulate onto this one
                else:
                    g = grads[offset + i]
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("DecoupledMomentumSGD does not support sparse gradients")
                if g.shape != p.shape:
                    raise ValueError(f"gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
                pairs.append((p, g.detach()))
            per_group.append(pairs)
            offset += len(group["params"])
        return per_group

    @torch.no_grad()
    def fold(
        self,
        component: str,
        grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
        *,
        clear_grad: bool = True,
        sources: Optional[Sequence[Optional[frozenset]]] = None,
    ) -> None:
        """Folds one component's gradient into its momentum buffer.

        Args:
            component: one of ``self.fold_names``; each at most once per step, in any order.
            grads: optional explicit gradients aligned with ``self.params`` (None entries: no
                gradient). Without it the gradient is read from ``p.grad``.
            clear_grad: when reading ``p.grad``, set it to None afterwards, so that the next
                component's backward starts from zero and the gradient memory is freed.
            sources: for a tie only (and required there): aligned with ``self.params``, the set
                of the tie's components that reached each parameter (None where none did).

        In ``compat="official"`` and on the kernel route (class docstring) the gradients are kept
        (not copied) until ``step``; do not modify explicitly passed tensors in place before then.
        """
        self._check_component(component)
        per_group = self._gradients(grads, clear_grad)
        if self.compat == "official":
            self._stash[component] = [pair for pairs in per_group for pair in pairs]
            return
        if "+" in component:
            self._sources[component] = self.check_sources(component, sources, per_group)
        if self._kernel_route(component):
            if "+" in component:
                self._record_sources(component, [p for pairs in per_group for p, _ in pairs])
            self._held[component] = per_group
            return
        self._fold_paper(component, per_group)

    def _kernel_route(self, component: str) -> bool:
        """torch's SGD kernels apply: paper mode and a non-zero momentum in every group (torch keeps no
        buffer at momentum 0, and its dampening then differs from the paper's)."""
        if self.sgd_kernel == "own" or self.update_reducer is not None:
            return False
        member = self._members(component)[0]
        return all(self._momenta(g)[member] > 0.0 for g in self.param_groups)

    def _apply_held(self, held: Dict[str, list], decayed: bool) -> None:
        """torch's SGD once per held component, over the parameters whose weight decay is (not) zero.

        Buckets span param groups with equal hyper-parameters; first folds (no buffer yet) run in
        their own call (torch's fused kernel takes one first-step flag per call).
        """
        for component, per_group in held.items():
            buf_key, s_key = scaled_buffer_key(component), scale_key(component)
            buckets: Dict[tuple, Tuple[list, list, list]] = {}
            rescale_bufs: List[torch.Tensor] = []
            rescale_factors: List[float] = []
            for group, pairs in zip(self.param_groups, per_group):
                if not pairs:
                    continue
                mu = self._momenta(group)[self._members(component)[0]]
                group_wd = float(group["weight_decay"])
                for p, g in pairs:
                    wd = group_wd if self._carries_decay(component, p) else 0.0
                    if bool(wd) != decayed:
                        continue
                    state = self.state[p]
                    buf = state.get(buf_key)
                    if buf is not None and state[s_key] != 1.0:
                        rescale_bufs.append(buf)
                        rescale_factors.append(1.0 / state[s_key])
                        state[s_key] = 1.0
                    key = (float(group["lr"]), mu, float(group["dampening"]), wd, buf is None, p.device, p.dtype)
                    params, grads, bufs = buckets.setdefault(key, ([], [], []))
                    params.append(p)
                    grads.append(g)
                    bufs.append(buf)
            if rescale_bufs:
                torch._foreach_mul_(rescale_bufs, rescale_factors)
            for (lr, mu, damp, wd, first, _, _), (params, grads, bufs) in buckets.items():
                torch_sgd_(params, grads, bufs, lr=lr, momentum=mu, dampening=damp, weight_decay=wd,
                           kernel=self.sgd_kernel)
                if first:
                    for p, b in zip(params, bufs):
                        self.state[p][buf_key] = b
                        self.state[p][s_key] = 1.0

    def check_sources(self, name: str, sources: Optional[Sequence[Optional[frozenset]]], per_group=None):
        """Checks a tie's ``sources`` (aligned with ``self.params``) before anything is folded.

        Raises where the shared buffer would differ from the separate ones (class docstring);
        returns ``{id(param): sources}``. ``per_group`` limits the check to parameters with a gradient.
        """
        params = self.params
        if sources is None or len(sources) != len(params):
            raise ValueError(f"fold({name!r}) of a tie needs sources: one set of its components per parameter")
        by_id = {id(p): s for p, s in zip(params, sources)}
        if per_group is None:
            rows = [(g, p, by_id[id(p)]) for g in self.param_groups for p in g["params"] if by_id[id(p)]]
        else:
            rows = [(g, p, by_id[id(p)]) for g, pairs in zip(self.param_groups, per_group) for p, _ in pairs]
        self._check_tie(name, rows)
        return by_id

    @torch.no_grad()
    def fold_param(self, component: str, param: torch.Tensor, grad: Optional[torch.Tensor],
                   sources: Optional[frozenset] = None) -> None:
        """Folds the gradient of one parameter (streaming: call it as each gradient becomes ready).

        At most once per parameter and component in a step, and not mixed with ``fold`` of the
        same component. Per-tensor operations: meant for gradients folded while still in cache
        (see ``DecoupledStep(strategy="streaming")``); ``fold`` is faster for whole lists. For a
        tie, ``sources`` is the set of its components that reached ``param``.
        """
        self._check_name(component)
        streamed = self._streamed.get(component)
        if streamed is None:
            self._check_component(component)
            streamed = self._streamed[component] = set()
        if grad is None:
            return
        if id(param) in streamed:
            raise RuntimeError(f"parameter folded twice for component {component!r} in one step")
        if self._group_of is None:
            self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        group = self._group_of.get(id(param))
        if group is None:
            raise ValueError("fold_param() got a tensor that is not a parameter of this optimizer")
        if grad.shape != param.shape:
            raise ValueError(f"gradient of shape {tuple(grad.shape)} for a parameter of shape {tuple(param.shape)}")
        streamed.add(id(param))
        grad = grad.detach()
        if self.compat == "official":
            self._stash.setdefault(component, []).append((param, grad))
            return
        tied = "+" in component
        if tied:
            if not sources:
                raise ValueError(f"fold_param({component!r}) of a tie needs sources: the tied components reaching it")
            self._check_tie(component, [(group, param, sources)])
            self._sources.setdefault(component, {})[id(param)] = sources
        mu = self._momenta(group)[self._members(component)[0]]
        check_momentum(component, mu)
        scale = buffer_scale(mu, float(group["dampening"]))
        wd = float(group["weight_decay"]) if self._carries_decay(component, param) else 0.0
        buf_key, s_key = scaled_buffer_key(component), scale_key(component)
        state = self.state[param]
        buf = state[buf_key] = fold_tensor_(state.get(buf_key), state.get(s_key, scale), grad, param, mu, scale, wd)
        state[s_key] = scale
        if tied:
            self._record_sources(component, [param])
        self._pending.setdefault(component, []).append((group, [param], [buf], scale))

    # ------------------------------------------------------------------------------- ties
    def _carries_decay(self, component: str, param: torch.Tensor) -> bool:
        if "+" not in component:
            return component == self.decay_component
        return self.decay_component in self._sources[component][id(param)]

    def _check_tie(self, name: str, rows) -> None:
        """Refuses, before any state changes, a fold whose shared buffer would differ from the separate ones."""
        key = f"{name}_sources"
        tie = set(self._members(name))
        for group, p, sources in rows:
            if not sources or not set(sources) <= tie:
                raise ValueError(f"sources of a parameter in tie {name!r} must be a non-empty subset of {sorted(tie)}, "
                                 f"got {sources}")
            seen = set(filter(None, self.state.get(p, {}).get(key, "").split("+")))
            missing = seen - set(sources)
            late = set(sources) - seen if seen and float(group["dampening"]) else set()
            if missing or late:
                why = (f"{sorted(missing)} reached a parameter in earlier steps but not in this one" if missing else
                       f"{sorted(late)} reach a parameter for the first time with dampening "
                       f"{group['dampening']} (its first fold is not dampened)")
                raise RuntimeError(
                    f"tie {name!r}: {why}; one shared buffer cannot reproduce the separate buffers then. Build the "
                    "optimizer with merge_equal_momenta=False (DEEPKD.MERGE_EQUAL_MOMENTA False)"
                )

    def _record_sources(self, name: str, params) -> None:
        key, by_id, members = f"{name}_sources", self._sources[name], self._members(name)
        for p in params:
            state = self.state[p]
            seen = set(filter(None, state.get(key, "").split("+"))) | set(by_id[id(p)])
            state[key] = "+".join(c for c in members if c in seen)

    def _fold_paper(self, component: str, per_group) -> None:
        buf_key, s_key = scaled_buffer_key(component), scale_key(component)
        # Buckets of groups that share hyper-parameters, so each foreach call spans them all.
        first: Dict[Tuple[float, float], Tuple[list, list]] = {}
        later: Dict[Tuple[float, float], Tuple[list, list, list]] = {}
        rescale_bufs: List[torch.Tensor] = []
        rescale_factors: List[float] = []
        pending = []
        for group, pairs in zip(self.param_groups, per_group):
            if not pairs:
                continue
            mu = self._momenta(group)[self._members(component)[0]]
            check_momentum(component, mu)
            scale = buffer_scale(mu, float(group["dampening"]))
            group_wd = float(group["weight_decay"])
            for p, g in pairs:
                wd = group_wd if self._carries_decay(component, p) else 0.0
                f_params, f_grads = first.setdefault((scale, wd), ([], []))
                l_params, l_bufs, l_grads = later.setdefault((1.0 - mu, wd), ([], [], []))
                state = self.state[p]
                buf = state.get(buf_key)
                if buf is None:
                    f_params.append(p)
                    f_grads.append(g)
                    continue
                old_scale = state[s_key]
                if old_scale != scale:  # momentum/dampening changed or checkpoint from the other mode
                    rescale_bufs.append(buf)
                    rescale_factors.append(scale / old_scale)
                    state[s_key] = scale
                l_params.append(p)
                l_bufs.append(buf)
                l_grads.append(g)
            pending.append((group, [p for p, _ in pairs], scale))

        if rescale_bufs:
            torch._foreach_mul_(rescale_bufs, rescale_factors)
        for (scale, wd), (params, grads) in first.items():
            if not params:
                continue
            for p, b in zip(params, first_fold(grads, params, scale, wd)):
                self.state[p][buf_key] = b
                self.state[p][s_key] = scale
        for (weight, wd), (params, bufs, grads) in later.items():
            fold_paper_(bufs, grads, params, weight, wd, self._block_bytes(params))
        if "+" in component:
            self._record_sources(component, [p for _, params, _ in pending for p in params])
        self._pending[component] = [
            (group, params, [self.state[p][buf_key] for p in params], scale) for group, params, scale in pending
        ]

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """Applies ``w -= lr * sum_c m_c`` over the buffers folded since the last step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.compat == "official":
            self._streamed = {}
            self._sources = {}
            self._ties = None
            self._step_official()
            self._stash = {}
            return loss
        # torch's kernels: the calls with weight decay first (on the weights before any update),
        # then our own update of the buffers folded already, then the other calls.
        held, self._held = self._held, {}
        self._apply_held(held, decayed=True)
        self._streamed = {}
        self._ties = None
        if self.update_reducer is not None:
            self._step_averaged()
            self._apply_held(held, decayed=False)
            self._sources = {}
            return loss
        # One row per parameter: (param, [(component, buffer, -lr / scale), ...]).
        rows: Dict[int, Tuple[torch.Tensor, list]] = {}
        for component, entries in self._pending.items():
            for group, params, bufs, scale in entries:
                alpha = -float(group["lr"]) / scale
                for p, b in zip(params, bufs):
                    rows.setdefault(id(p), (p, []))[1].append((component, b, alpha))
        ordered = list(rows.values())
        apply_update_(ordered, self._block_bytes([w for w, _ in ordered[:1]]))
        self._pending = {}
        self._apply_held(held, decayed=False)
        self._sources = {}
        return loss

    def _step_averaged(self) -> None:
        """``w -= lr * mean_workers(sum_c m_c)``: the update of the averaged gradients, since the fold is
        linear (the average of the workers' buffers is the buffer of the averaged gradients)."""
        per: Dict[int, Tuple[torch.Tensor, float, list]] = {}
        for entries in self._pending.values():
            for group, params, bufs, scale in entries:
                for p, b in zip(params, bufs):
                    per.setdefault(id(p), (p, float(group["lr"]), []))[2].append((b, 1.0 / scale))
        self._pending = {}
        items = list(per.values())
        updates = []
        for _, _, terms in items:
            u = terms[0][0] * terms[0][1]
            for b, f in terms[1:]:
                u.add_(b, alpha=f)
            updates.append(u)
        averaged = self.update_reducer(updates, [p for p, _, _ in items])
        by_lr: Dict[float, Tuple[list, list]] = {}
        for (p, lr, _), u in zip(items, averaged):
            ws, us = by_lr.setdefault(lr, ([], []))
            ws.append(p)
            us.append(u)
        for lr, (ws, us) in by_lr.items():
            torch._foreach_add_(ws, us, alpha=-lr)

    @torch.no_grad()
    def average_buffers_(self, group=None) -> None:
        """Replaces every momentum buffer by its average over the workers of ``group`` (collective: call
        it on every worker). In the distributed "update" mode each worker's buffers are fed by its own
        gradients; their average is the buffer of the averaged gradients, so a checkpoint saves it and
        every worker continues from it exactly."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return
        tensors = [state[k] for p in self.params for state in [self.state.get(p, {})]
                   for k in sorted(state) if k.startswith("scaled_buffer_")]
        by_kind: Dict[tuple, List[torch.Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for ts in by_kind.values():
            flat = all_reduce_mean(torch.cat([t.reshape(-1) for t in ts]), group)
            for t, piece in zip(ts, flat.split([t.numel() for t in ts])):
                t.copy_(piece.view_as(t))

    def _block_bytes(self, tensors: Sequence[torch.Tensor]) -> int:
        return block_bytes_for(tensors, self.cpu_block_bytes)

    def _step_official(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no compat='official' mode")

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        if self._pending or self._stash or self._held:
            raise RuntimeError(
                "state_dict() called between fold() and step(): folded gradients would be lost; call step() first"
            )
        return super().state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        names = set(self.fold_names)
        for s in _renamed_buffer_keys(state_dict, self.components).get("state", {}).values():
            stored = {k[len("scaled_buffer_"):] for k in s if k.startswith("scaled_buffer_")}
            if not stored <= names:
                raise ValueError(f"optimizer checkpoint holds buffers {sorted(stored - names)} but this optimizer "
                                 f"folds {sorted(names)} (DEEPKD.MERGE_EQUAL_MOMENTA or the momenta differ from the "
                                 "run that wrote it)")
        state_dict = _renamed_buffer_keys(state_dict, self.components)
        # torch's load_state_dict rebuilds every iterable state value with its type from a generator,
        # which turns a string (a tie's "<tie>_sources") into the generator's repr: keep them apart.
        strings = {k: {key: v for key, v in s.items() if isinstance(v, str)}
                   for k, s in state_dict.get("state", {}).items()}
        if any(strings.values()):
            state_dict = {**state_dict, "state": {k: {key: v for key, v in s.items() if not isinstance(v, str)}
                                                  for k, s in state_dict["state"].items()}}
        super().load_state_dict(state_dict)
        params = self.params
        for k, entries in strings.items():
            if entries:
                self.state[params[int(k)]].update(entries)
        self._pending = {}
        self._stash = {}
        self._held = {}
        self._streamed = {}
        self._sources = {}
        self._ties = None
        self._group_of = None
        for group in self.param_groups:
            self._validate_group(group)


class DeepKDOptimizer(DecoupledMomentumSGD):
    """DeepKD's three-buffer SGD (TOG / TCG / NCG), a ``torch.optim.Optimizer``.

    Usage (one forward pass, one gradient component at a time; see ``core.step.DecoupledStep``)::

        opt = DeepKDOptimizer(model.parameters(), lr=0.05, weight_decay=5e-4)
        for name, loss in opt.component_losses(tog=ce, tcg=tckd, ncg=nckd).items():
            loss.backward(retain_graph=True)
            opt.fold(name)            # reads and clears p.grad
        opt.step()

    Per-group ``lr``, ``weight_decay``, ``momentum``, ``delta_*``, ``dampening`` are honoured
    (detectron2's ``build_optimizer`` groups and LR schedulers that set ``group["lr"]`` work).
    ``compat="official"`` reproduces the released reference update (``official.py``);
    ``merge_equal_momenta`` shares one buffer between components of equal momentum (paper mode).
    """

    components = DEEPKD_COMPONENTS
    decay_component = "tog"

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        delta_tog: float = 0.075,
        delta_tcg: float = -0.075,
        delta_ncg: float = 0.05,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        compat: str = "paper",
        merge_equal_momenta: bool = False,
    ):
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.compat = compat
        self.merge_equal_momenta = bool(merge_equal_momenta)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            delta_tog=delta_tog,
            delta_tcg=delta_tcg,
            delta_ncg=delta_ncg,
            weight_decay=weight_decay,
            dampening=dampening,
        )
        super().__init__(params, defaults)

    def _momenta(self, group: dict) -> Dict[str, float]:
        mu = float(group["momentum"])
        return {c: mu + float(group[f"delta_{c}"]) for c in DEEPKD_COMPONENTS}

    def component_losses(self, tog=None, tcg=None, ncg=None) -> Dict[str, torch.Tensor]:
        return {name: loss for name, loss in (("tog", tog), ("tcg", tcg), ("ncg", ncg)) if loss is not None}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["compat"] = self.compat
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        state_dict.pop("compat", None)  # buffers carry their scale, so either mode loads either
        super().load_state_dict(state_dict)

    def _step_official(self) -> None:
        official_deepkd_step_(self.param_groups, self._momenta, self.state, self._stash)


class DOTOptimizer(DecoupledMomentumSGD):
    """DOT (Distillation-Oriented Trainer): two buffers, task ``mu - delta``, distillation ``mu + delta``.

    The special case of DeepKD with TCG and NCG summed into one distillation component
    (``component_losses`` does the summing). Weight decay rides with the task gradient.

    ``compat="official"`` reproduces mdistiller's DOT (public repository megvii-research/mdistiller;
    docs/maths.md §5). It differs for a parameter that gets only one of the two gradients in a
    step (in the detector: the RPN and box-regression parameters, task only): that buffer decays
    with the mean momentum ``(mu_task + mu_kd) / 2``, and a distillation-only gradient gets
    weight decay (except on its buffer's first step, which copies the raw gradient). Per step,
    task first: ``d = g_task + wd * w``; ``m_task = d`` the first time, else ``mu * m_task + (1 -
    dampening) * d`` with ``mu = mu_task`` if the parameter also got a distillation gradient,
    else the mean (``mu_task == 0``: no buffer, ``m_task = d``); ``w -= lr * m_task``. Then
    distillation: ``m_kd = g_kd`` the first time, else ``mu_kd * m_kd + (1 - dampening) * g_kd``
    if the parameter got a task gradient, else ``mean * m_kd + (1 - dampening) * (g_kd + wd *
    w)``; ``w -= lr * m_kd``. A parameter with both gradients gets the paper's update.
    """

    components = DOT_COMPONENTS
    decay_component = "task"

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        delta: float = 0.075,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        compat: str = "paper",
        merge_equal_momenta: bool = False,
    ):
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.compat = compat
        # Ties are a paper-mode shortcut; mdistiller's update (official) keeps both buffers apart.
        self.merge_equal_momenta = bool(merge_equal_momenta) and compat == "paper"
        defaults = dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay, dampening=dampening)
        super().__init__(params, defaults)

    def _step_official(self) -> None:
        """mdistiller's DOT update (class docstring), parameter by parameter, task then distillation."""
        got = {c: {id(p): g for p, g in self._stash.get(c, ())} for c in DOT_COMPONENTS}
        for group in self.param_groups:
            mus = self._momenta(group)
            mu_mean = (mus["task"] + mus["kd"]) / 2.0
            damp, wd, lr = float(group["dampening"]), float(group["weight_decay"]), float(group["lr"])
            for component, other in (("task", "kd"), ("kd", "task")):
                for p in group["params"]:
                    g = got[component].get(id(p))
                    if g is None:
                        continue
                    both = id(p) in got[other]
                    if wd and (component == "task" or not both):
                        g = g.add(p, alpha=wd)  # a first distillation step drops it again below
                    if component == "task" and mus["task"] == 0.0:
                        p.add_(g, alpha=-lr)  # mdistiller keeps no task buffer then
                        continue
                    state = self.state[p]
                    buf_key, s_key = scaled_buffer_key(component), scale_key(component)
                    buf = state.get(buf_key)
                    if buf is None:
                        raw = got[component][id(p)]
                        buf = state[buf_key] = (g if component == "task" else raw).clone()
                        state[s_key] = 1.0
                    else:
                        if state[s_key] != 1.0:  # buffer saved by paper mode: store it unscaled
                            buf.div_(state[s_key])
                            state[s_key] = 1.0
                        buf.mul_(mus[component] if both else mu_mean).add_(g, alpha=1.0 - damp)
                    p.add_(buf, alpha=-lr)

    def _momenta(self, group: dict) -> Dict[str, float]:
        mu, delta = float(group["momentum"]), float(group["delta"])
        return {"task": mu - delta, "kd": mu + delta}

    def component_losses(self, tog=None, tcg=None, ncg=None) -> Dict[str, torch.Tensor]:
        losses: Dict[str, torch.Tensor] = {}
        if tog is not None:
            losses["task"] = tog
        kd = [x for x in (tcg, ncg) if x is not None]
        if kd:
            losses["kd"] = kd[0] if len(kd) == 1 else kd[0] + kd[1]
        return losses


def _renamed_buffer_keys(state_dict: Dict[str, Any], components: Sequence[str]) -> Dict[str, Any]:
    """Checkpoints written before the key rename stored ``<c>_buffer`` (already scaled)."""
    states = state_dict.get("state", {})
    if not any(f"{c}_buffer" in s for s in states.values() for c in components):
        return state_dict
    renamed = {}
    for k, s in states.items():
        s = dict(s)
        for c in components:
            if f"{c}_buffer" in s:
                s[scaled_buffer_key(c)] = s.pop(f"{c}_buffer")
        renamed[k] = s
    return {**state_dict, "state": renamed}
