"""Decoupled-momentum SGD: one momentum buffer per gradient component (DeepKD, DOT).

DeepKD (docs/maths.md) splits the student's gradient into TOG (task), TCG (target-class KD)
and NCG (non-target-class KD); each component has its own momentum ``mu + delta_c``:

    g_tog = grad(L_task) + weight_decay * w        # weight decay rides with the task gradient
    m_c   = g_c                                    on the first fold of each buffer
    m_c   = mu_c * m_c + (1 - dampening) * g_c     afterwards
    w    -= lr * (m_tog + m_tcg + m_ncg)           # only buffers folded this step contribute

Gradients are handed over one component at a time (``fold``), so at most one gradient set has
to exist at once; ``step`` applies the update. A parameter that gets no gradient from a
component leaves that buffer untouched (as torch SGD skips parameters whose grad is None).

Speed: every update is a ``torch._foreach_*`` call over lists bucketed by hyper-parameters.
In paper mode a buffer is stored pre-scaled, ``v_c = m_c * (1 - mu_c) / (1 - dampening)``, so
that the momentum update is a single ``lerp`` pass, ``v_c <- lerp(v_c, g_c, 1 - mu_c)``,
instead of a multiply pass plus an add pass; ``step`` divides the scale back out in the
``alpha`` of its add. ``momentum_buffer(p, c)`` and the tests see the true ``m_c``; the scale a
buffer was stored with is kept next to it (``<c>_scale``), so checkpoints round-trip and a
changed momentum or a checkpoint from the other mode is rescaled on the next fold. On CPU the
multi-pass updates (TOG's lerp + weight decay, the three adds of ``step``) run in cache-sized
blocks of tensors (``cpu_block_bytes``), so that the later passes read from cache.

``compat="official"`` reproduces the update of the released reference optimizer
(docs/maths.md, "The released reference code"): the decay factor of
a buffer depends on which *other* components reached the parameter this step, so that mode
keeps the folded gradients until ``step`` (as the reference does) and stores unscaled buffers.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

__all__ = ["DeepKDOptimizer", "DOTOptimizer", "DecoupledMomentumSGD", "DEEPKD_COMPONENTS", "DOT_COMPONENTS"]

DEEPKD_COMPONENTS = ("tog", "tcg", "ncg")
DOT_COMPONENTS = ("task", "kd")
COMPAT_MODES = ("paper", "official")


def _check_momentum(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"momentum of component {name!r} is {value:g}; each momentum (mu + delta) must lie in [0, 1)")


def _cache_blocks(rows: Sequence[Tuple[tuple, Any]], block_bytes: int) -> List[List[Tuple[tuple, Any]]]:
    """Groups rows ``(tensors, meta)`` (same-shaped tensors) into blocks of ~``block_bytes`` of the first.

    A row larger than a block is cut into flat views when all its tensors are contiguous, so
    big tensors are blocked too. ``block_bytes == 0`` keeps everything in one block.
    """
    if not block_bytes:
        return [list(rows)]
    blocks: List[List[Tuple[tuple, Any]]] = []
    current: List[Tuple[tuple, Any]] = []
    size = 0
    for tensors, meta in rows:
        first = tensors[0]
        nbytes = first.numel() * first.element_size()
        if nbytes > block_bytes and all(t.is_contiguous() for t in tensors):
            if current:
                blocks.append(current)
                current, size = [], 0
            pieces = [t.view(-1).split(max(1, block_bytes // first.element_size())) for t in tensors]
            blocks.extend([(parts, meta)] for parts in zip(*pieces))
            continue
        if current and size + nbytes > block_bytes:
            blocks.append(current)
            current, size = [], 0
        current.append((tensors, meta))
        size += nbytes
    if current:
        blocks.append(current)
    return blocks


class DecoupledMomentumSGD(Optimizer):
    """SGD with one momentum buffer per gradient component; subclasses name the components.

    Subclasses set ``components`` (the names ``fold`` accepts), ``decay_component`` (the one
    that carries weight decay) and implement ``_momenta(group) -> {component: mu}``.
    """

    components: Tuple[str, ...] = ()
    decay_component: str = ""
    compat: str = "paper"
    # Several passes over the same tensors (lerp + weight decay; the three buffer adds of step)
    # run block by block on CPU, so that the second pass finds the block in cache: ~2 MiB of
    # parameters per block (the working set is a few of those, well inside a 32 MiB L3).
    cpu_block_bytes: int = 2 * 2**20

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
            _check_momentum(name, mu)

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
        buf = state.get(f"{component}_buffer")
        if buf is None:
            return None
        return buf / state[f"{component}_scale"]

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
        _check_momentum(component, mu)
        scale = (1.0 - mu) / (1.0 - float(group["dampening"]))
        wd = float(group["weight_decay"]) if component == self.decay_component else 0.0
        buf_key, scale_key = f"{component}_buffer", f"{component}_scale"
        state = self.state[param]
        buf = state.get(buf_key)
        if buf is None:
            buf = state[buf_key] = grad.mul(scale)
            if wd:
                buf.add_(param, alpha=scale * wd)
        else:
            if state[scale_key] != scale:
                buf.mul_(scale / state[scale_key])
            buf.lerp_(grad, 1.0 - mu)
            if wd:
                buf.add_(param, alpha=(1.0 - mu) * wd)
        state[scale_key] = scale
        self._pending.setdefault(component, []).append((group, [param], [buf], scale))

    def _fold_paper(self, component: str, per_group) -> None:
        buf_key, scale_key = f"{component}_buffer", f"{component}_scale"
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
            _check_momentum(component, mu)
            damp = float(group["dampening"])
            scale = (1.0 - mu) / (1.0 - damp)
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
                old_scale = state[scale_key]
                if old_scale != scale:  # momentum/dampening changed or checkpoint from the other mode
                    rescale_bufs.append(buf)
                    rescale_factors.append(scale / old_scale)
                    state[scale_key] = scale
                l_params.append(p)
                l_bufs.append(buf)
                l_grads.append(g)
            pending.append((group, [p for p, _ in pairs], scale))

        if rescale_bufs:
            torch._foreach_mul_(rescale_bufs, rescale_factors)
        for (scale, wd), (params, grads) in first.items():
            if not params:
                continue
            bufs = torch._foreach_mul(grads, scale)  # m = g_c (no dampening on the first fold)
            if wd:
                torch._foreach_add_(bufs, params, alpha=scale * wd)
            for p, b in zip(params, bufs):
                self.state[p][buf_key] = b
                self.state[p][scale_key] = scale
        for (weight, wd), (params, bufs, grads) in later.items():
            if not params:
                continue
            # v = mu v + (1 - mu) g  ==  scale * (mu m + (1 - dampening) g)
            if not wd:
                torch._foreach_lerp_(bufs, grads, weight)
                continue
            rows = [((b, g, p), None) for b, g, p in zip(bufs, grads, params)]
            for block in _cache_blocks(rows, self._block_bytes(params)):
                b_block, g_block, p_block = (list(col) for col in zip(*(tensors for tensors, _ in block)))
                torch._foreach_lerp_(b_block, g_block, weight)
                torch._foreach_add_(b_block, p_block, alpha=weight * wd)
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
        # One row per parameter: (param, its folded buffers) and each buffer's alpha = -lr / scale.
        rows: Dict[int, Tuple[list, list]] = {}
        for component, entries in self._pending.items():
            for group, params, bufs, scale in entries:
                key = (component, -float(group["lr"]) / scale)
                for p, b in zip(params, bufs):
                    tensors, keys = rows.setdefault(id(p), ([p], []))
                    tensors.append(b)
                    keys.append(key)
        ordered = [(tuple(tensors), keys) for tensors, keys in rows.values()]
        for block in _cache_blocks(ordered, self._block_bytes([t[0] for t, _ in ordered[:1]])):
            ops: Dict[Tuple[str, float], Tuple[list, list]] = {}
            for tensors, keys in block:
                for b, key in zip(tensors[1:], keys):
                    ps, bs = ops.setdefault(key, ([], []))
                    ps.append(tensors[0])
                    bs.append(b)
            for (_, alpha), (ps, bs) in ops.items():
                torch._foreach_add_(ps, bs, alpha=alpha)
        self._pending = {}
        return loss

    def _block_bytes(self, tensors: Sequence[torch.Tensor]) -> int:
        """Cache blocking only pays on CPU; on accelerators one foreach call per list is best."""
        if not tensors or tensors[0].device.type != "cpu":
            return 0
        return self.cpu_block_bytes

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
        super().load_state_dict(state_dict)
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
    ``compat="official"`` reproduces the released reference update (see module docstring).
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

    # --------------------------------------------------------------- reference-compatible
    def _step_official(self) -> None:
        """The released reference update, step by step (docs/maths.md).

        Per parameter, with ``has_*`` = "got that component's gradient this step":
        TOG (no weight decay): decay ``mu_tcg`` if has_tcg, else ``mu_ncg`` if has_ncg, else the
        mean of the three momenta; with ``mu_tog == 0`` no buffer, the raw gradient is used.
        NCG: decay ``mu_ncg`` if has_tog, else ``mu_tcg`` if has_tcg, else (gradient + wd * w,
        mean momentum). TCG: gradient + wd * w always; decay ``mu_tcg`` if has_tog, else
        ``mu_ncg`` if has_ncg, else wd is added a second time and the mean momentum is used.
        The parameter is updated in place after each component (TOG, NCG, TCG), so the weight
        decay of TCG sees the weights already moved by TOG and NCG. First folds copy the
        (weight-decayed, for TCG) gradient.
        """
        # component -> {id(param): grad}: O(1) membership instead of the reference's list scans
        got = {c: {id(p): g for p, g in self._stash.get(c, ())} for c in DEEPKD_COMPONENTS}
        for group in self.param_groups:
            self._official_group(group, got)

    def _official_group(self, group: dict, got: Dict[str, Dict[int, torch.Tensor]]) -> None:
        mus = self._momenta(group)
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
            buf_key, scale_key = f"{component}_buffer", f"{component}_scale"
            (first_set, first_mu), (second_set, second_mu) = rules[component]
            buckets: Dict[float, Tuple[list, list]] = {}
            extra_wd: Tuple[list, list, list] = ([], [], [])  # NCG / TCG "else" branch: g + wd * w
            rescale_bufs, rescale_factors = [], []
            for p, g in zip(members, grads):
                state = self.state[p]
                buf = state.get(buf_key)
                if buf is None:
                    state[buf_key] = g.clone()
                    state[scale_key] = 1.0
                    continue
                if state[scale_key] != 1.0:  # buffer saved by paper mode: store it unscaled
                    rescale_bufs.append(buf)
                    rescale_factors.append(1.0 / state[scale_key])
                    state[scale_key] = 1.0
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
            torch._foreach_add_(members, [self.state[p][buf_key] for p in members], alpha=-lr)


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
    ):
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.compat = compat
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
                    buf_key, scale_key = f"{component}_buffer", f"{component}_scale"
                    buf = state.get(buf_key)
                    if buf is None:
                        raw = got[component][id(p)]
                        buf = state[buf_key] = (g if component == "task" else raw).clone()
                        state[scale_key] = 1.0
                    else:
                        if state[scale_key] != 1.0:  # buffer saved by paper mode: store it unscaled
                            buf.div_(state[scale_key])
                            state[scale_key] = 1.0
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
