"""Frozen-teacher preparation: eval mode, no gradients, batch-norm folded into the convolutions.

A frozen teacher in eval mode computes ``bn(conv(x))`` with fixed statistics, which is one
affine map: folding BN into the conv weights and bias (``fuse_conv_bn_eval``) gives the same
logits for less work on every iteration.

Which BN follows which conv is read from the data flow with ``torch.fx`` (a conv whose only
user is a BN, each called exactly once), so pre-activation blocks (BN before conv) are handled
right. Where a forward cannot be traced (data-dependent control flow), its submodules are traced
one by one; optionally (``order_fallback``) its direct children are paired by registration
order. ``fold_batchnorm(..., example_input=x)`` checks the folded model against the original
on ``x`` and raises if they differ.
"""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = [
    "batchnorm_affine", "copy_module_sharing_hooks", "fold_affine_into_conv_", "fold_batchnorm", "prepare_teacher",
]

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
_FORWARD_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def copy_module_sharing_hooks(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)`` whose forward/backward hooks are the original's callables, not copies.

    Deep-copying a hook copies what it is bound to or closes over: a recorder holding this
    step's activations (non-leaf tensors, which ``deepcopy`` refuses) or a counter that would then
    count into a copy nobody reads. Shared, a hook on the original also sees the copy's forward.
    """
    memo = {id(hook): hook for m in module.modules() for name in _FORWARD_HOOK_DICTS
            for hook in getattr(m, name, {}).values()}
    return copy.deepcopy(module, memo)


def batchnorm_affine(running_mean: torch.Tensor, running_var: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``bn(x) = a * x + b`` per channel, for batch norm with fixed statistics.

    ``a = weight / sqrt(var + eps)``, ``b = bias - mean * a`` (weight 1 and bias 0 when absent).
    """
    a = torch.rsqrt(running_var + eps)
    if weight is not None:
        a = a * weight
    b = -running_mean * a
    if bias is not None:
        b = b + bias
    return a, b


@torch.no_grad()
def fold_affine_into_conv_(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Makes ``conv(x)`` compute ``scale * conv(x) + shift`` (per output channel), in place.

    ``W <- W * scale`` (per output channel) and ``bias <- bias * scale + shift`` (a bias is added
    when the conv has none). Computed in float64, stored in the conv's dtype.
    """
    w = conv.weight
    s, t = scale.double(), shift.double()
    new_w = w.double() * s.view(-1, *([1] * (w.dim() - 1)))
    new_b = t if conv.bias is None else conv.bias.double() * s + t
    conv.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=w.requires_grad)
    conv.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and isinstance(bn, _BN_TYPES)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _pairs_from_fx(model: nn.Module) -> Optional[List[Tuple[str, str]]]:
    """(conv name, bn name) pairs from the traced data flow, or None if the model cannot be traced."""
    try:
        import torch.fx

        signature = inspect.signature(model.forward)
        concrete = {
            name: param.default
            for name, param in signature.parameters.items()
            if param.default is not inspect.Parameter.empty
        }
        graph = torch.fx.symbolic_trace(model, concrete_args=concrete or None).graph
    except Exception:  # any tracing failure: fall back to module order
        return None
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules.get(src.target), modules.get(node.target)
        if calls[src.target] == 1 and calls[node.target] == 1 and _foldable(conv, bn):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_by_order(module: nn.Module) -> List[Tuple[str, str]]:
    """Direct children: a BN registered right after a conv (the ``order_fallback`` rule)."""
    children = list(module.named_children())
    return [(a, b) for (a, conv), (b, bn) in zip(children, children[1:]) if _foldable(conv, bn)]


def _collect_pairs(
    module: nn.Module, prefix: str, order_fallback: bool, untraced: List[str]
) -> List[Tuple[str, str]]:
    """Pairs from the data flow of the largest traceable modules, descending where tracing fails."""
    pairs = _pairs_from_fx(module)
    if pairs is not None:
        return [(prefix + a, prefix + b) for a, b in pairs]
    untraced.append(prefix.rstrip(".") or "the top-level forward")
    out = [(prefix + a, prefix + b) for a, b in _pairs_by_order(module)] if order_fallback else []
    for name, child in module.named_children():
        if any(True for _ in child.children()):
            out += _collect_pairs(child, f"{prefix}{name}.", order_fallback, untraced)
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def fold_batchnorm(
    module: nn.Module,
    example_input: Optional[torch.Tensor] = None,
    atol: float = 1e-4,
    order_fallback: bool = False,
) -> nn.Module:
    """An eval-mode copy of ``module`` with every ``Conv2d -> BatchNorm2d`` pair folded into the conv.

    Pairs come from the ``torch.fx`` data flow (a conv whose only user is a BN, both called once).
    A module whose forward cannot be traced (data-dependent control flow) is entered instead
    and its traceable submodules are folded; with ``order_fallback=True`` its direct children
    are also paired by registration order (conv registered right before a BN of the same width).
    The BN modules become ``nn.Identity``; the input module is not modified. With
    ``example_input`` the outputs of the copy and the original are compared (to
    ``atol * (1 + max |output|)``). The folded model's state dict differs (convs gain a bias).
    """
    original_mode = module.training
    model = copy_module_sharing_hooks(module).eval()
    untraced: List[str] = []
    pairs = _collect_pairs(model, "", order_fallback, untraced)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _set_submodule(model, bn_name, nn.Identity())
    left = [name for name, m in model.named_modules() if isinstance(m, _BN_TYPES)]
    if untraced and (left or order_fallback):
        warnings.warn(
            f"fold_batchnorm: torch.fx cannot trace {', '.join(untraced)} of {type(module).__name__}; "
            + (
                "its direct Conv2d/BatchNorm2d children were paired by registration order"
                if order_fallback
                else f"{len(left)} batch-norm layer(s) left unfolded ({', '.join(left[:4])}...)"
            ),
            RuntimeWarning,
            stacklevel=3,
        )
    if example_input is not None:
        module.eval()
        try:
            expected, got = module(example_input), model(example_input)
        finally:
            module.train(original_mode)
        for a, b in zip(_tensors(expected), _tensors(got)):
            # float rounding of the fold grows with the output's magnitude; a wrong pairing does not
            allowed = atol * (1.0 + a.abs().max().item())
            error = (a - b).abs().max().item()
            if error > allowed:
                raise RuntimeError(
                    f"fold_batchnorm changed the output of {type(module).__name__} by {error:.3g} "
                    f"(> {allowed:.3g}): a BatchNorm2d does not directly follow the Conv2d it was paired with; "
                    "use fold_bn=False for this model"
                )
    return model


def _tensors(output) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def _train_keeps_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen teacher: whatever is asked, stay in eval mode."""
    return nn.Module.train(self, False)


def prepare_teacher(
    module: nn.Module,
    fold_bn: bool = True,
    example_input: Optional[torch.Tensor] = None,
    channels_last: bool = False,
) -> nn.Module:
    """The teacher to distil from: eval mode, ``requires_grad=False``, optionally BN-folded.

    Returns a new module when ``fold_bn`` (see ``fold_batchnorm``), else ``module`` itself.
    ``channels_last=True`` stores the 4-d weights in channels-last order, which makes oneDNN's
    CPU convolutions faster (inputs need no conversion; outputs are numerically the same up to
    float rounding). Its ``train()`` is pinned to eval mode, so that ``distiller.train()`` on a
    parent module never switches the teacher's batch-norm or dropout to training behaviour.
    Run its forward under ``torch.no_grad()``.
    """
    teacher = fold_batchnorm(module, example_input) if fold_bn else module
    teacher.eval()
    teacher.requires_grad_(False)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    teacher.train = types.MethodType(_train_keeps_eval, teacher)
    return teacher
