"""The decoupled step: one forward pass, one gradient per loss component, folded into the optimizer.

``DecoupledStep(optimizer, strategy)(losses)`` takes the loss tensors of one forward pass
(``{component: scalar loss}``, e.g. ``optimizer.component_losses(tog=ce, tcg=tckd, ncg=nckd)``),
checks they are finite, computes each component's gradient with respect to the trainable
parameters of ``optimizer`` (frozen parameters, ``requires_grad=False``, e.g. a teacher, are
skipped) and hands it to ``optimizer.fold``. The caller then calls ``optimizer.step()``.

Strategies:
  * ``"sequential"``: one ``torch.autograd.grad`` per component with the graph retained until the
    last one; each gradient set is folded and freed before the next is computed, so at most one
    gradient set is alive at a time (paper-mode optimizer; ``compat="official"`` keeps every
    component's gradient until ``step`` because its update needs all three at once).
  * ``"batched"``: one ``torch.autograd.grad(..., is_grads_batched=True)`` over the stacked
    losses (a vmap over the backward pass): one traversal of the graph with K cotangents, at
    the price of K gradient sets alive at once. Where an operation of the model has no vmap
    rule the step warns once, names the error, and falls back to ``"sequential"``.
  * ``"streaming"``: one ``backward(inputs=params)`` per component with a post-accumulate-grad
    hook on every parameter that folds its gradient (``optimizer.fold_param``) the moment it
    is complete and drops it: no full gradient set ever exists (extra memory ~ the buffers)
    and each fold reads a gradient that is still in cache. ``.grad`` is used as scratch space
    during the call (and restored afterwards). Under torch.distributed it runs as
    ``"sequential"`` (the all-reduce needs whole gradient sets); with a ``grad_hook`` each
    component's gradients are also collected for the hook.

Equal momenta: when the optimizer shares one buffer between components of equal momentum
(``optimizer.ties``, ``merge_equal_momenta=True``), their losses are summed and take one
backward pass together, folded under the tie's name with, per parameter, the set of tied
components whose graph reaches it (``sources``, one graph walk per tied loss). DeepKD on KD
(TOG and NCG both at ``mu + 0.075``) then costs two backward passes instead of three. A
``grad_hook`` needs one gradient per component, so it refuses such an optimizer.

Mixed precision: with ``scaler`` (a ``core.amp.ComponentGradScaler``, for fp16) every loss is
multiplied by the one scale before its backward pass, every component's gradient is unscaled,
and one overflow check over all of them decides: on inf/NaN nothing is folded (every buffer and
parameter stays as it was, ``self.skipped`` is True) and the scale backs off. The check needs
all components before the first fold, so the gradient sets are kept until then ("streaming"
runs as "sequential"). bf16 needs no scaler.

Gradient-norm clipping (``clip_norm > 0``): the norm of the *summed* gradient (all components,
after the all-reduce) is clipped as ``torch.nn.utils.clip_grad_norm_`` clips one gradient, by
scaling every component by the same factor ``min(1, clip_norm / (norm + 1e-6))``, so the
decomposition is kept and the summed update equals a clipped plain one. It needs every
component's gradient before the first fold: they are held, as with the scaler.

Distributed (torch.distributed initialised, world size > 1): the model is *not* wrapped in
DistributedDataParallel (DDP averages one combined gradient, not one per component). Instead
each component's gradient is all-reduced here, in flattened buckets, and divided by the world
size: exactly the per-component share of what DDP would produce for the combined gradient.
Call ``broadcast_parameters(model)`` once after building the model (and after loading weights)
so that every worker starts from rank 0's weights, as DDP does at construction. Batch-norm
running statistics are per worker unless you broadcast them too (``buffers=True``, the default,
does it once; DDP re-broadcasts them at every forward).
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from .dist import global_flags

__all__ = ["DIST_MODES", "DecoupledStep", "STRATEGIES", "allreduce_gradients", "broadcast_parameters", "check_finite_losses"]

STRATEGIES = ("sequential", "batched", "streaming")
DIST_MODES = ("components", "update")

GradHook = Callable[[str, List[torch.Tensor], List[Optional[torch.Tensor]]], None]


def _world_size(group=None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> List[List[int]]:
    """Indices of ``tensors`` split into runs of one dtype/device and at most ~bucket_bytes each."""
    out: List[List[int]] = []
    current: List[int] = []
    size = 0
    key = None
    for i, t in enumerate(tensors):
        k = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if current and (k != key or size + nbytes > bucket_bytes):
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
        key = k
    if current:
        out.append(current)
    return out


def allreduce_gradients(
    grads: Sequence[Optional[torch.Tensor]],
    params: Sequence[torch.Tensor],
    group=None,
    bucket_bytes: int = 25 * 2**20,
) -> List[Optional[torch.Tensor]]:
    """Averages one component's gradients over workers, as DDP averages a gradient.

    A parameter that got a gradient on some worker but not on this one contributes zeros here
    (a small all-reduce of presence flags decides); a parameter no worker reached stays None.
    Gradients may carry leading batch dimensions (the "batched" strategy): shapes must simply
    agree across workers. Returns new tensors (views into the reduced buckets).
    """
    world = _world_size(group)
    grads = list(grads)
    if world == 1:
        return grads
    device = params[0].device if params else torch.device("cpu")
    present = torch.tensor([g is not None for g in grads], dtype=torch.int32, device=device)
    dist.all_reduce(present, group=group)
    present_any = present.tolist()
    lead: Optional[torch.Size] = None
    for g, p in zip(grads, params):
        if g is not None:
            lead = g.shape[: g.dim() - p.dim()]
            break
    filled: List[Optional[torch.Tensor]] = []
    for g, p, n in zip(grads, params, present_any):
        if g is None and n > 0:
            g = torch.zeros((*(lead or ()), *p.shape), dtype=p.dtype, device=p.device)
        filled.append(g)
    live = [i for i, g in enumerate(filled) if g is not None]
    out: List[Optional[torch.Tensor]] = [None] * len(filled)
    for bucket in _buckets([filled[i] for i in live], bucket_bytes):
        index = [live[j] for j in bucket]
        shapes = [filled[i].shape for i in index]
        flat = torch.cat([filled[i].reshape(-1) for i in index])
        for i in index:
            filled[i] = None  # the flat bucket holds the values now
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for i, piece, shape in zip(index, flat.split([s.numel() for s in shapes]), shapes):
            out[i] = piece.view(shape)
    return out


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0, group=None, buffers: bool = True) -> None:
    """Copies rank ``src``'s parameters (and buffers) to every worker, in flattened buckets.

    Needed once before training with ``DecoupledStep`` under torch.distributed, because the
    model is not wrapped in DDP (which would do this at construction). No-op on one worker.
    """
    if _world_size(group) == 1:
        return
    tensors = [p.data for p in module.parameters()]
    if buffers:
        tensors += [b for b in module.buffers()]
    for bucket in _buckets(tensors, 25 * 2**20):
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for i in bucket:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset : offset + n].view_as(tensors[i]))
            offset += n


def check_finite_losses(losses: Mapping[str, torch.Tensor], where: str = "", hint: str = "",
                        group=None) -> Dict[str, float]:
    """The losses as floats (one host sync); FloatingPointError naming every non-finite one.

    Under torch.distributed the values are summed over the workers first, so a NaN or inf on any
    worker reaches every worker and all of them raise together (none hangs in the next
    collective). ``where`` ("at iteration 12") and ``hint`` (what to change) go into the message.
    """
    names = list(losses)
    values = torch.stack([losses[n].detach().float().reshape(()).cpu() for n in names])
    world = _world_size(group)
    if world > 1:
        values = values.clone()
        dist.all_reduce(values, group=group)
    out = dict(zip(names, values.tolist()))
    bad = [f"{n}={v:g}" for n, v in out.items() if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        on = " (on at least one process)" if world > 1 else ""
        raise FloatingPointError(
            f"non-finite loss {where}{on}: {', '.join(bad)}. Nothing was updated with it." + (f" {hint}" if hint else "")
        )
    if world > 1:
        out = {n: v / world for n, v in out.items()}
    return out


def _looks_like_vmap_error(err: BaseException) -> bool:
    text = str(err).lower()
    return any(word in text for word in ("vmap", "batching rule", "batched", "functorch", "is_grads_batched"))


class DecoupledStep:
    """Computes and folds one gradient per loss component (see module docstring).

    Args:
        optimizer: a ``DecoupledMomentumSGD`` (``DeepKDOptimizer``, ``DOTOptimizer``): it must
            have ``components``, ``params`` and ``fold(component, grads)``.
        strategy: ``"sequential"`` or ``"batched"``.
        grad_hook: optional ``hook(component, params, grads)`` called with each component's
            (already averaged) gradients before they are folded, e.g. ``GSNRMeter.gradient_hook``.
            ``params`` are the trainable parameters, ``grads`` aligned with them (None = no grad).
        process_group: torch.distributed group for the gradient average (default: world).
        bucket_mb: size of the flattened all-reduce buckets.
        check_finite: check the losses for NaN/inf before anything is folded (a trainer that
            already checked them, with its own message, passes False).
        scaler: optional ``ComponentGradScaler`` (fp16 mixed precision; module docstring).
        clip_norm: > 0 clips the norm of the summed gradient to this value (see module docstring);
            the norm before clipping is kept in ``last_grad_norm``.
        dist_mode: under torch.distributed, ``"components"`` averages each component's gradient
            (one all-reduce per component, before its fold); ``"update"`` lets every worker fold its
            own gradients into its buffers and averages only the update ``sum_c m_c`` in
            ``optimizer.step()`` (one all-reduce per step, as DDP). The fold is linear, so the two
            are equal; ``update`` needs global presence flags (one small all-reduce per component,
            also carrying a tie's sources) and one global fp16 overflow flag. It falls back to
            ``components`` (said once in the log) with clipping, a gradient hook (GSNR) or the
            official compat optimizer. Checkpoints: call ``optimizer.average_buffers_()`` on every
            worker first (the average of the workers' buffers is the global buffer).
    """

    def __init__(
        self,
        optimizer,
        strategy: str = "sequential",
        *,
        grad_hook: Optional[GradHook] = None,
        process_group=None,
        bucket_mb: float = 25.0,
        check_finite: bool = True,
        scaler=None,
        clip_norm: float = 0.0,
        dist_mode: str = "components",
    ):
        if dist_mode not in DIST_MODES:
            raise ValueError(f"distributed mode must be one of {DIST_MODES}, got {dist_mode!r}")
        self.dist_mode = dist_mode
        self._update = False  # this call runs the "update" mode (set per call)
        self._fallback_said = False
        if strategy not in STRATEGIES:
            raise ValueError(f"gradient strategy must be one of {STRATEGIES}, got {strategy!r}")
        for attr in ("components", "params", "fold"):
            if not hasattr(optimizer, attr):
                raise TypeError(
                    f"DecoupledStep needs a decoupled-momentum optimizer (DeepKDOptimizer, DOTOptimizer); "
                    f"{type(optimizer).__name__} has no {attr!r}"
                )
        if grad_hook is not None and getattr(optimizer, "ties", ()):
            raise ValueError(
                f"DecoupledStep: a grad_hook needs one gradient per component, but the optimizer shares buffers "
                f"{optimizer.ties} (equal momenta); build it with merge_equal_momenta=False"
            )
        self.optimizer = optimizer
        self.strategy = strategy
        self.grad_hook = grad_hook
        self.process_group = process_group
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.check_finite = check_finite
        self.scaler = scaler
        self.skipped = False  # the last call found an overflow (scaler) and folded nothing
        self._held: Optional[list] = None
        if not clip_norm >= 0:
            raise ValueError(f"clip_norm must be >= 0 (0: no clipping), got {clip_norm}")
        self.clip_norm = float(clip_norm)
        self.last_grad_norm: Optional[float] = None
        self._batched_checked = False  # first batched call keeps the graph, so a fallback can still run

    # ---------------------------------------------------------------------------- checks
    def _check_losses(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        if not losses:
            raise ValueError("DecoupledStep got no losses")
        names = list(losses)
        unknown = [n for n in names if n not in self.optimizer.components]
        if unknown:
            raise ValueError(
                f"loss components {unknown} are not components of the optimizer {tuple(self.optimizer.components)}"
            )
        for name in names:
            loss = losses[name]
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"loss component {name!r} must be a scalar tensor, got {shape}")
        if not self.check_finite:
            return {}
        # One host sync for all values, before any gradient is computed or folded.
        return check_finite_losses(losses, "in the decoupled step", group=self.process_group)

    # ------------------------------------------------------------------------------ call
    def __call__(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """Folds every component's gradient into the optimizer; returns the loss values (floats)."""
        values = self._check_losses(losses)
        self.skipped = False
        self._update = self._update_mode()
        self.optimizer.update_reducer = self._reduce_update if self._update else None
        active = [(n, losses[n].reshape(())) for n in losses if losses[n].requires_grad]
        if not active:
            return values
        all_params = self.optimizer.params
        index = [i for i, p in enumerate(all_params) if p.requires_grad]
        if not index:
            raise ValueError("the optimizer holds no parameter with requires_grad=True")
        plan = _Plan(all_params, index)
        ties = getattr(self.optimizer, "ties", ())
        if ties:
            active = _merge_ties(active, ties, plan, self.optimizer.tie_name)
        if self.scaler is None and self.clip_norm == 0:
            self._compute(active, plan)
            return values
        # The scaler's overflow check and the norm clip both need every component's gradient
        # before the first fold: the gradients are held, then decided on together.
        self._held = []
        try:
            self._compute(self.scaler.scale_losses(active) if self.scaler is not None else active, plan)
            held = self._held
        finally:
            self._held = None
        if self.scaler is not None:
            found: dict = {}
            for _, grads, _ in held:
                found = self.scaler.unscale_(grads, found)
            if self._update:  # local gradients: one global overflow flag
                flag = torch.stack([f.reshape(()) for f in found.values()]).amax().reshape(1) if found else \
                    torch.zeros(1, device=self.optimizer.params[0].device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
                found = {flag.device: flag}
            self.skipped = self.scaler.update(found)
            if self.skipped:
                return values
        if self.clip_norm > 0:
            held = self._clip(held)
        for name, grads, plan in held:
            self._fold_now(name, grads, plan)
        return values

    def _clip(self, held):
        """Scale every held component gradient by one factor so the summed gradient's norm is at
        most ``clip_norm`` (``torch.nn.utils.clip_grad_norm_`` on the sum keeps the decomposition)."""
        summed: Dict[int, torch.Tensor] = {}
        for _, grads, plan in held:
            for p, g in zip(plan.trainable, grads):
                if g is not None:
                    summed[id(p)] = g if id(p) not in summed else summed[id(p)] + g
        norms = [torch.linalg.vector_norm(g.float()) for g in summed.values()]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        self.last_grad_norm = float(total)
        coef = torch.clamp(self.clip_norm / (total + 1e-6), max=1.0)
        return [(name, [None if g is None else g * coef.to(g.device, g.dtype) for g in grads], plan)
                for name, grads, plan in held]

    def _compute(self, active, plan: _Plan) -> None:
        if self.strategy == "batched" and len(active) > 1:
            if self._batched(active, plan):
                return
        if self.strategy == "streaming" and self._held is None and _world_size(self.process_group) == 1:
            self._streaming(active, plan)
            return
        self._sequential(active, plan)

    def _update_mode(self) -> bool:
        """The distributed "update" mode applies: several workers, and nothing that needs global gradients."""
        if self.dist_mode != "update" or _world_size(self.process_group) == 1:
            return False
        why = ("SOLVER.CLIP_GRADIENTS / clip_norm needs the norm of the global summed gradient" if self.clip_norm
               else "the gradient hook (GSNR) needs each component's global gradient" if self.grad_hook else
               "the official compat update is not linear in the gradients (its momenta and weight decay follow "
               "which components reached a parameter, applied one after the other)"
               if getattr(self.optimizer, "compat", "paper") != "paper" else "")
        if why and not self._fallback_said:
            logging.getLogger(__name__).warning(
                "distributed mode 'update' falls back to 'components' (one all-reduce per component): %s", why)
            self._fallback_said = True
        return not why

    def _reduce_update(self, updates: List[torch.Tensor], params: List[torch.Tensor]) -> List[torch.Tensor]:
        return allreduce_gradients(updates, params, self.process_group, self.bucket_bytes)

    def _global_presence(self, name: str, grads: Sequence[Optional[torch.Tensor]], plan: _Plan):
        """Update mode: zeros where another worker's gradient reached a parameter and this one's did not
        (so every worker folds the same buffers), and a tie's sources made global, in one small all-reduce."""
        grads = list(grads)
        local = plan.sources.get(name)
        members = self.optimizer._members(name) if local is not None else ()
        device = plan.trainable[0].device
        flags = torch.zeros(1 + len(members), len(grads), dtype=torch.int32, device=device)
        flags[0] = torch.tensor([g is not None for g in grads], dtype=torch.int32)
        for k, c in enumerate(members):
            flags[1 + k] = torch.tensor([bool(s) and c in s for s in local], dtype=torch.int32)
        flags = global_flags(flags, self.process_group).tolist()
        for i, (g, p) in enumerate(zip(grads, plan.trainable)):
            if g is None and flags[0][i]:
                grads[i] = torch.zeros_like(p)
        if local is not None:
            plan.sources[name] = [frozenset(c for k, c in enumerate(members) if flags[1 + k][i]) or None
                                  for i in range(len(grads))]
        return grads

    def _fold(self, name: str, grads: Sequence[Optional[torch.Tensor]], plan: _Plan, reduce: bool) -> None:
        if _world_size(self.process_group) > 1:
            # Global presence (and a tie's global sources, which decide its weight decay: the same
            # on every worker in both modes).
            filled = self._global_presence(name, grads, plan)
            if self._update:
                grads = filled
            elif reduce:
                grads = allreduce_gradients(grads, plan.trainable, self.process_group, self.bucket_bytes)
        if self._held is not None:  # the scaler decides over all components before the first fold
            self._held.append((name, list(grads), plan))
            return
        self._fold_now(name, grads, plan)

    def _fold_now(self, name: str, grads: Sequence[Optional[torch.Tensor]], plan: _Plan) -> None:
        if self.grad_hook is not None:
            self.grad_hook(name, plan.trainable, list(grads))
        if name in plan.sources:
            # A gradient without a local source came from another worker's all-reduce: every
            # tied component active here is taken to have reached it.
            members = frozenset(c for s in plan.sources[name] if s for c in s)
            sources = [s or (members if g is not None else None) for s, g in zip(plan.sources[name], grads)]
            self.optimizer.fold(name, plan.full(grads), sources=plan.full(sources))
        else:
            self.optimizer.fold(name, plan.full(grads))

    def _sequential(self, active, plan: _Plan) -> None:
        last = len(active) - 1
        for k, (name, loss) in enumerate(active):
            grads = torch.autograd.grad(loss, plan.trainable, retain_graph=k < last, allow_unused=True)
            self._fold(name, grads, plan, reduce=True)
            del grads  # the optimizer keeps what it needs; free before the next backward

    def _batched(self, active, plan: _Plan) -> bool:
        # Which parameters each loss reaches: in a batched gradient an unreached parameter shows
        # up as a row of zeros, but "no gradient" must leave its buffer untouched.
        reached = [_reached_parameters(loss, plan.position) for _, loss in active]
        stacked = torch.stack([loss for _, loss in active])
        eye = torch.eye(len(active), dtype=stacked.dtype, device=stacked.device)
        try:
            grads = torch.autograd.grad(
                stacked,
                plan.trainable,
                grad_outputs=eye,
                is_grads_batched=True,
                allow_unused=True,
                retain_graph=not self._batched_checked,
            )
        except RuntimeError as err:
            if self._batched_checked or not _looks_like_vmap_error(err):
                raise
            warnings.warn(
                "DecoupledStep: strategy 'batched' (torch.autograd.grad with is_grads_batched=True) failed: "
                f"{err}. Some operation of the model has no vmap rule for its backward pass; falling back "
                "to strategy 'sequential' for this and all later steps.",
                RuntimeWarning,
                stacklevel=3,
            )
            self.strategy = "sequential"
            return False
        self._batched_checked = True
        stacked_device = stacked.device
        del stacked
        # One all-reduce for all components at once (the batch dimension rides along); none in update mode.
        if not self._update:
            grads = allreduce_gradients(grads, plan.trainable, self.process_group, self.bucket_bytes)
            if _world_size(self.process_group) > 1:  # a row reached on another worker is an averaged gradient here
                flags = torch.zeros(len(active), len(plan.trainable), dtype=torch.int32, device=stacked_device)
                for k, rows_k in enumerate(reached):
                    flags[k, sorted(rows_k)] = 1
                flags = global_flags(flags, self.process_group).tolist()
                reached = [{j for j, f in enumerate(row) if f} for row in flags]
        for k, (name, _) in enumerate(active):
            rows = [None if g is None or j not in reached[k] else g[k] for j, g in enumerate(grads)]
            self._fold(name, rows, plan, reduce=False)
        return True


    def _streaming(self, active, plan: _Plan) -> None:
        optimizer, hook = self.optimizer, self.grad_hook
        current: Dict[str, object] = {}

        def on_grad(param: torch.Tensor) -> None:
            grad, param.grad = param.grad, None
            sources = current["sources"]
            if sources is None:
                optimizer.fold_param(current["name"], param, grad)
            else:
                optimizer.fold_param(current["name"], param, grad, sources[plan.position[id(param)]])
            if hook is not None:
                current["grads"][plan.position[id(param)]] = grad

        saved = [p.grad for p in plan.trainable]
        handles = []
        try:
            for p in plan.trainable:
                p.grad = None  # the hook must see this component's gradient alone
                handles.append(p.register_post_accumulate_grad_hook(on_grad))
            last = len(active) - 1
            for k, (name, loss) in enumerate(active):
                current["name"] = name
                current["sources"] = plan.sources.get(name)
                if current["sources"] is not None:  # refuse before a single tensor is folded
                    optimizer.check_sources(name, plan.full(current["sources"]))
                current["grads"] = [None] * len(plan.trainable)
                loss.backward(inputs=plan.trainable, retain_graph=k < last)
                if hook is not None:
                    hook(name, plan.trainable, current.pop("grads"))
        finally:
            for handle in handles:
                handle.remove()
            for p, g in zip(plan.trainable, saved):
                p.grad = g


class _Plan:
    """The trainable parameters of one call and where they sit in ``optimizer.params``."""

    def __init__(self, all_params: List[torch.Tensor], index: List[int]):
        self.size = len(all_params)
        self.index = index
        self.trainable = [all_params[i] for i in index]
        self.position = {id(p): j for j, p in enumerate(self.trainable)}
        self.sources: Dict[str, List[Optional[frozenset]]] = {}  # tie -> per trainable param, who reaches it

    def full(self, grads: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        out: List[Optional[torch.Tensor]] = [None] * self.size
        for i, g in zip(self.index, grads):
            out[i] = g
        return out


def _merge_ties(active, ties, plan: _Plan, tie_name) -> list:
    """Replaces each tie's losses by their sum (at the place of the first), noting who reaches what."""
    losses = dict(active)
    out = []
    for name, loss in active:
        tie = next((t for t in ties if name in t), None)
        if tie is None:
            out.append((name, loss))
            continue
        if name != next(c for c in tie if c in losses):
            continue  # folded with the first of its tie
        members = [c for c in tie if c in losses]
        reached = {c: _reached_parameters(losses[c], plan.position) for c in members}
        plan.sources[tie_name(tie)] = [
            frozenset(c for c in members if j in reached[c]) or None for j in range(len(plan.trainable))
        ]
        total = losses[members[0]]
        for c in members[1:]:
            total = total + losses[c]
        out.append((tie_name(tie), total))
    return out


def _reached_parameters(loss: torch.Tensor, position: Dict[int, int]) -> set:
    """Positions of the parameters the autograd graph of ``loss`` reaches (what allow_unused reports)."""
    found = set()
    seen = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad nodes hold the leaf tensor
        if variable is not None:
            j = position.get(id(variable))
            if j is not None:
                found.add(j)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found
