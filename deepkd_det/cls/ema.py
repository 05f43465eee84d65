"""Model EMA of the classifier: timm's ``ModelEmaV2``, as the GPD release uses it (``--model-ema``).

Every released GPD command trains with ``--model-ema``: a copy of the model whose state (every
parameter *and* buffer, BN statistics included, in ``state_dict`` order) follows

    ema <- decay * ema + (1 - decay) * model        after every optimizer step,

with decay 0.99996 (the release's ``--model-ema-decay`` default). It starts as a copy of the
model at the first step and is evaluated, like the model, after every epoch; the release keeps
the better of the two top-1 values as its best metric. This module only builds timm's class
(``EMA.ENABLED`` / ``EMA.DECAY``) and gives its state for checkpoints; the trainer updates,
evaluates, saves and restores it (deepkd_det/cls/engine.py). Integer buffers
(``num_batches_tracked``) go through the same formula and are truncated back to integers, as
timm does.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

__all__ = ["EMA_DECAY_RELEASE", "build_ema", "ema_state", "load_ema_state"]

EMA_DECAY_RELEASE = 0.99996


def build_ema(cfg, model: nn.Module) -> Optional[nn.Module]:
    """timm's ``ModelEmaV2`` of ``model`` with ``cfg.EMA.DECAY``; None when ``EMA.ENABLED`` is off."""
    if not cfg.EMA.ENABLED:
        return None
    try:
        from timm.utils import ModelEmaV2
    except ImportError as exc:  # pragma: no cover - timm is a declared dependency
        raise ImportError("EMA.ENABLED needs timm (pip install timm)") from exc
    return ModelEmaV2(model, decay=float(cfg.EMA.DECAY))


def ema_state(ema: Optional[nn.Module]) -> Optional[Dict[str, torch.Tensor]]:
    return None if ema is None else ema.module.state_dict()


def load_ema_state(ema: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    ema.module.load_state_dict(state)
