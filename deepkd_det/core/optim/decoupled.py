"""Decoupled-momentum SGD: the optimizers that gather param groups and keep one buffer per component.

``DeepKDOptimizer`` (TOG / TCG / NCG, docs/maths.md) and ``DOTOptimizer`` (task / distillation)
are thin subclasses of ``DecoupledMomentumSGD``, whose docstring writes the algorithm out. The
update maths lives in ``functional.py`` (paper mode) and ``official.py`` (the released code).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from .blocking import CPU_BLOCK_BYTES, block_bytes_for
from .functional import (
    apply_update_,
    buffer_scale,
    check_momentum,
    first_fold,
    fold_paper_,
    fold_tensor_,
    scale_key,
    scaled_buffer_key,
)
from .official import official_deepkd_step_

__all__ = ["COMPAT_MODES", "DEEPKD_COMPONENTS", "DOT_COMPONENTS", "DOTOptimizer", "DecoupledMomentumSGD",
           "DeepKDOptimizer"]

DEEPKD_COMPONENTS = ("tog", "tcg", "ncg")
DOT_COMPONENTS = ("task", "kd")
COMPAT_MODES = ("paper", "official")


class DecoupledMomentumSGD(Optimizer):
    """SGD with one momentum buffer per gradient component; subclasses name the components.

    The algorithm (paper mode; docs/maths.md, "The decoupled update"), per parameter ``w`` of a
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

    State per parameter: ``scaled_buffer_<c>`` holds ``s_c * m_c`` with
    ``s_c = (1 - mu_c) / (1 - dampening)`` and ``<c>_scale`` holds the ``s_c`` it was stored
    with (``functional.py`` says why; ``momentum_buffer`` returns the true ``m_c``). A changed
    momentum, or a buffer from the other mode, is rescaled on its next fold.

    Subclasses set ``components`` (the names ``fold`` accepts), ``decay_component`` (the one
    that carries weight decay) and implement ``_momenta(group) -> {component: mu}``; a
    ``compat="official"`` mode implements ``_step_official`` (see ``official.py``).
    """

    components: Tuple[str, ...] = ()
    decay_component: str = ""
    compat: str = "paper"
    # CPU cache blocking of the multi-pass updates (blocking.py); 0 turns it off.
    cpu_block_bytes: int = CPU_BLOCK_BYTES

    def __init__(self, params, defaults: Dict[str, Any]):
        self._pending: Dict[str, List[Tuple[dict, List[torch.Tensor], List[torch.Tensor], float]]] = {}
        self._stash: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}  # official: (param, grad)
        self._streamed: Dict[str, set] = {}  # component -> ids of params folded one by one this step
        self._group_of: Optional[Dict[int, dict]] = None
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

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_pending", {})
        self.__dict__.setdefault("_stash", {})
        self._streamed = {}
        self._group_of = None

    @property
    def params(self) -> List[torch.Tensor]:
        """All parameters in group order: the order an explicit gradient list must follow."""
        return [p for group in self.param_groups for p in group["params"]]

    def _check_component(self, component: str) -> None:
        if component not in self.components:
            raise ValueError(f"unknown gradient component {component!r}; this optimizer has {self.components}")
        if component in self._pending or component in self._stash or component in self._streamed:
            raise RuntimeError(f"component {component!r} was already folded in this step; call step() first")

    def component_losses(self, tog=None, tcg=None, ncg=None) -> Dict[str, torch.Tensor]:
        """Maps the three DeepKD losses onto this optimizer's components (None = absent)."""
        raise NotImplementedError

    def momentum_buffer(self, param: torch.Tensor, component: str) -> Optional[torch.Tensor]:
        """The true momentum buffer ``m_c`` of ``param`` (a new tensor), or None before its first fold."""
        if component not in self.components:
            raise ValueError(f"unknown gradient component {component!r}; this optimizer has {self.components}")
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
    ) -> None:
        """Folds one component's gradient into its momentum buffer.

        Args:
            component: one of ``self.components``; each at most once per step, in any order.
            grads: optional explicit gradients aligned with ``self.params`` (None entries: no
                gradient). Without it the gradient is read from ``p.grad``.
            clear_grad: when reading ``p.grad``, set it to None afterwards, so that the next
                component's backward starts from zero and the gradient memory is freed.

        In ``compat="official"`` the gradients are kept (not copied) until ``step``; do not
        modify explicitly passed tensors in place before then.
        """
        self._check_component(component)
        per_group = self._gradients(grads, clear_grad)
        if self.compat == "official":
            self._stash[component] = [pair for pairs in per_group for pair in pairs]
            return
        self._fold_paper(component, per_group)

    @torch.no_grad()
    def fold_param(self, component: str, param: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
        """Folds the gradient of one parameter (streaming: call it as each gradient becomes ready).

        At most once per parameter and component in a step, and not mixed with ``fold`` of the
        same component. Per-tensor operations: meant for gradients folded while still in cache
        (see ``DecoupledStep(strategy="streaming")``); ``fold`` is faster for whole lists.
        """
        if component not in self.components:
            raise ValueError(f"unknown gradient component {component!r}; this optimizer has {self.components}")
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
        mu = self._momenta(group)[component]
        check_momentum(component, mu)
        scale = buffer_scale(mu, float(group["dampening"]))
        wd = float(group["weight_decay"]) if component == self.decay_component else 0.0
        buf_key, s_key = scaled_buffer_key(component), scale_key(component)
        state = self.state[param]
        buf = state[buf_key] = fold_tensor_(state.get(buf_key), state.get(s_key, scale), grad, param, mu, scale, wd)
        state[s_key] = scale
        self._pending.setdefault(component, []).append((group, [param], [buf], scale))

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
            mu = self._momenta(group)[component]
            check_momentum(component, mu)
            scale = buffer_scale(mu, float(group["dampening"]))
            wd = float(group["weight_decay"]) if component == self.decay_component else 0.0
            f_params, f_grads = first.setdefault((scale, wd), ([], []))
            l_params, l_bufs, l_grads = later.setdefault((1.0 - mu, wd), ([], [], []))
            for p, g in pairs:
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
        self._streamed = {}
        if self.compat == "official":
            self._step_official()
            self._stash = {}
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
        return loss

    def _block_bytes(self, tensors: Sequence[torch.Tensor]) -> int:
        return block_bytes_for(tensors, self.cpu_block_bytes)

    def _step_official(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no compat='official' mode")

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        if self._pending or self._stash:
            raise RuntimeError(
                "state_dict() called between fold() and step(): folded gradients would be lost; call step() first"
            )
        return super().state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(_renamed_buffer_keys(state_dict, self.components))
        self._pending = {}
        self._stash = {}
        self._streamed = {}
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
    ``compat="official"`` reproduces the released reference update (``official.py``).
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
    ):
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.compat = compat
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
    ):
        defaults = dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay, dampening=dampening)
        super().__init__(params, defaults)

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
