"""The paper-mode update maths of decoupled-momentum SGD, as free functions over tensor lists.

Per component ``c`` with momentum ``mu_c`` (docs/maths.md, "4. The DeepKD update")::

    m_c <- g_c                                  first fold of the buffer
    m_c <- mu_c * m_c + (1 - dampening) * g_c   afterwards
    w   <- w - lr * sum_c m_c                   over the buffers folded this step

A buffer is stored pre-scaled, ``v_c = s_c * m_c`` with ``s_c = (1 - mu_c) / (1 - dampening)``
(``buffer_scale``), so that the momentum update is one ``lerp`` pass,
``v_c <- lerp(v_c, g_c, 1 - mu_c)``, instead of a multiply pass and an add pass; the update of
the weights divides the scale back out in the ``alpha`` of its add. Weight decay is part of
the gradient of the component that carries it (``g + wd * w``).
"""

from __future__ import annotations

from typing import Hashable, List, Optional, Sequence, Tuple

import torch

from .blocking import cache_blocks

__all__ = [
    "DEEPKD_COMPONENTS",
    "apply_update_",
    "sgd_kernel",
    "torch_sgd_",
    "buffer_scale",
    "check_momentum",
    "first_fold",
    "fold_paper_",
    "fold_tensor_",
    "scale_key",
    "scaled_buffer_key",
]

# The DeepKD gradient components, in the order the update applies them (task, target, non-target).
DEEPKD_COMPONENTS = ("tog", "tcg", "ncg")


def scaled_buffer_key(component: str) -> str:
    """State key of the stored buffer ``v_c = s_c * m_c`` (scaled; ``momentum_buffer`` gives ``m_c``)."""
    return f"scaled_buffer_{component}"


def scale_key(component: str) -> str:
    """State key of the scale ``s_c`` the buffer of ``component`` is stored with (1.0: unscaled)."""
    return f"{component}_scale"


def check_momentum(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"momentum of component {name!r} is {value:g}; each momentum (mu + delta) must lie in [0, 1)")


def buffer_scale(momentum: float, dampening: float) -> float:
    """``s = (1 - mu) / (1 - dampening)``: the factor a paper-mode buffer is stored with."""
    return (1.0 - momentum) / (1.0 - dampening)


def first_fold(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], scale: float,
               weight_decay: float) -> List[torch.Tensor]:
    """New scaled buffers ``s * (g + wd * w)``: ``m = g`` on the first fold (no dampening)."""
    bufs = torch._foreach_mul(grads, scale)
    if weight_decay:
        torch._foreach_add_(bufs, params, alpha=scale * weight_decay)
    return bufs


def fold_paper_(bufs: List[torch.Tensor], grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                weight: float, weight_decay: float, block_bytes: int = 0) -> None:
    """``v <- lerp(v, g + wd * w, weight)`` with ``weight = 1 - mu``, in place.

    ``v = s * m`` makes this ``s * (mu * m + (1 - dampening) * (g + wd * w))``. With weight decay
    the two passes (lerp, then add of ``w``) run in cache blocks of ``block_bytes`` (0: one block).
    """
    if not bufs:
        return
    if not weight_decay:
        torch._foreach_lerp_(bufs, list(grads), weight)
        return
    rows = [((b, g, p), None) for b, g, p in zip(bufs, grads, params)]
    for block in cache_blocks(rows, block_bytes):
        b_block, g_block, p_block = (list(col) for col in zip(*(tensors for tensors, _ in block)))
        torch._foreach_lerp_(b_block, g_block, weight)
        torch._foreach_add_(b_block, p_block, alpha=weight * weight_decay)


def fold_tensor_(buf: Optional[torch.Tensor], old_scale: float, grad: torch.Tensor, param: torch.Tensor,
                 momentum: float, scale: float, weight_decay: float) -> torch.Tensor:
    """One tensor's fold (streaming): returns the scaled buffer (new, or ``buf`` updated in place).

    ``old_scale`` is the scale ``buf`` was stored with; a different ``scale`` rescales it first.
    """
    if buf is None:
        buf = grad.mul(scale)
        if weight_decay:
            buf.add_(param, alpha=scale * weight_decay)
        return buf
    if old_scale != scale:
        buf.mul_(scale / old_scale)
    buf.lerp_(grad, 1.0 - momentum)
    if weight_decay:
        buf.add_(param, alpha=(1.0 - momentum) * weight_decay)
    return buf


def apply_update_(rows: Sequence[Tuple[torch.Tensor, Sequence[Tuple[Hashable, torch.Tensor, float]]]],
                  block_bytes: int = 0) -> None:
    """``w += sum_k alpha_k * v_k`` for every row ``(w, [(tag, v_k, alpha_k), ...])``, in place.

    With ``alpha_k = -lr / s_k`` this is ``w -= lr * sum_c m_c``. The adds of one block are
    bucketed by ``(tag, alpha)`` into one foreach call each; ``tag`` (the component) keeps a
    parameter out of a list twice. Rows run in cache blocks of ``block_bytes`` (0: one block).
    """
    table = [((w, *(v for _, v, _ in terms)), [(tag, alpha) for tag, _, alpha in terms]) for w, terms in rows]
    for block in cache_blocks(table, block_bytes):
        ops = {}
        for tensors, keys in block:
            for v, key in zip(tensors[1:], keys):
                ws, vs = ops.setdefault(key, ([], []))
                ws.append(tensors[0])
                vs.append(v)
        for (_, alpha), (ws, vs) in ops.items():
            torch._foreach_add_(ws, vs, alpha=alpha)


def sgd_kernel(params: Sequence[torch.Tensor], kernel: str = "auto",
               others: Sequence[Sequence[Optional[torch.Tensor]]] = ()) -> str:
    """Which of torch's SGD implementations to run over ``params``: ``"fused"``, ``"foreach"`` or ``"for-loop"``.

    ``"auto"``: fused where torch has the fused kernel for the device and dtype (CPU and CUDA
    floating point) and every tensor of ``others`` (gradients, buffers) has its parameter's
    strides (the fused kernel walks all of them as one layout: a transposed parameter with a
    contiguous gradient comes out wrong), else foreach where the device has it, else the for-loop.
    """
    if kernel != "auto":
        return kernel
    if not params:
        return "for-loop"
    from torch.utils._foreach_utils import (
        _get_foreach_kernels_supported_devices,
        _get_fused_kernels_supported_devices,
    )

    device = params[0].device.type
    same_layout = all(t is None or t.stride() == p.stride() for ts in others for p, t in zip(params, ts))
    if (device in _get_fused_kernels_supported_devices() and same_layout
            and all(t.is_floating_point() for t in params)):
        return "fused"
    if device in _get_foreach_kernels_supported_devices():
        return "foreach"
    return "for-loop"


def torch_sgd_(params: List[torch.Tensor], grads: List[torch.Tensor], bufs: List[Optional[torch.Tensor]], *,
               lr: float, momentum: float, dampening: float, weight_decay: float, kernel: str = "auto") -> None:
    """One step of torch's own SGD (``torch.optim.sgd.sgd``) over the lists, in place.

    ``d = g + wd * w``; ``b = d`` where ``bufs[i]`` is None (the list entry is filled with the new
    buffer), else ``b = momentum * b + (1 - dampening) * d``; ``w -= lr * b``. ``bufs`` must be all
    None or all tensors (torch's fused kernel takes one first-step flag per call). ``kernel``:
    ``"auto"`` (``sgd_kernel``), ``"fused"``, ``"foreach"`` or ``"for-loop"``.
    """
    if not params:
        return
    from torch.optim.sgd import sgd

    which = sgd_kernel(params, kernel, (grads, bufs))
    sgd(params, list(grads), bufs, foreach=which == "foreach", fused=which == "fused", weight_decay=weight_decay,
        momentum=momentum, lr=lr, dampening=dampening, nesterov=False, maximize=False)
