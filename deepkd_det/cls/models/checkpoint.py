"""Loading teacher weights strictly: every key present, nothing extra, every shape equal.

Accepted files (all read with ``torch.load(..., weights_only=True)``, a checkpoint is untrusted):
- mdistiller / CRD teachers: ``{"model": state_dict, ...}`` (``cifar_teachers.tar`` unpacked);
- ``{"state_dict": state_dict, ...}``, or a plain state dict (torchvision ImageNet weights);
- keys saved from ``nn.DataParallel`` / DDP (``module.`` prefix), stripped.
A mismatch raises ValueError naming the offending keys: a partly random teacher never trains.
BatchNorm ``num_batches_tracked`` counters are the only keys allowed to be absent (checkpoints
from before torch 0.4.1 lack them; they play no part in the forward pass with the default momentum).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Union

import torch
import torch.nn as nn

from deepkd_det.core.io import load_weights_only

__all__ = ["load_teacher_weights", "read_state_dict", "resolve_teacher_checkpoint"]

PathLike = Union[str, "os.PathLike[str]"]
_MAX_LISTED = 20
_DATAPARALLEL_PREFIX = "module."


def resolve_teacher_checkpoint(root: PathLike, name: str) -> str:
    """``<root>/<name>_vanilla/ckpt_epoch_240.pth``, the cifar_teachers layout; it must exist."""
    path = os.path.join(os.fspath(root), f"{name}_vanilla", "ckpt_epoch_240.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"teacher checkpoint for {name!r} not found: expected {path} "
            "(cifar_teachers layout <root>/<name>_vanilla/ckpt_epoch_240.pth)"
        )
    return path


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped (``model`` / ``state_dict`` key, ``module.`` prefix)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    obj = load_weights_only(path)
    state = _unwrap(obj, path)
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint {path}: entries that are not tensors: {_listing(not_tensors)}")
    if state and all(k.startswith(_DATAPARALLEL_PREFIX) for k in state):
        state = {k[len(_DATAPARALLEL_PREFIX) :]: v for k, v in state.items()}
    return dict(state)


def _listing(keys: List[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_teacher_weights(model: nn.Module, path: PathLike, model_name: str | None = None) -> nn.Module:
    """Load ``path`` into ``model`` strictly and return the model.

    ``path`` is a checkpoint file, or a cifar_teachers directory together with ``model_name``
    (resolved by ``resolve_teacher_checkpoint``).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if model_name is None:
            raise ValueError(
                f"{path} is a directory: pass model_name to pick <name>_vanilla/ckpt_epoch_240.pth"
            )
        path = resolve_teacher_checkpoint(path, model_name)
    state = read_state_dict(path)
    expected = model.state_dict()

    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {path} does not fit {type(model).__name__} ({len(expected)} keys expected):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        lines.append("  (refusing to use a partly initialised teacher; check the model name and num_classes)")
        raise ValueError("\n".join(lines))

    # absent BN counters keep the model's own value
    full = {k: state.get(k, v) for k, v in expected.items()}
    model.load_state_dict(full, strict=True)
    return model
