"""End-of-training check that every process holds the same parameters.

The decoupled step runs without a DDP wrapper: each component's gradient is all-reduced by
``deepkd_det.core.step``. A bug there (or a rank that skipped an update) would let the ranks
drift apart silently; this hook compares a digest of all parameters across processes once
training has finished and fails loudly if they differ.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ParameterSyncCheck", "parameter_digest"]

logger = logging.getLogger(__name__)


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes (CPU copy)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ParameterSyncCheck(HookBase):
    """After a completed multi-process run, all-gathers the parameter digests and raises
    RuntimeError if they differ; logs the common digest otherwise."""

    def after_train(self):
        world = comm.get_world_size()
        if world == 1 or self.trainer.iter < self.trainer.max_iter:
            return  # single process, or training failed (other ranks may not reach a collective)
        digest = parameter_digest(self.trainer.model)
        digests = comm.all_gather(digest)
        if len(set(digests)) != 1:
            raise RuntimeError(
                "parameters differ across processes after training: "
                + ", ".join(f"rank {r}: {d[:16]}" for r, d in enumerate(digests))
            )
        logger.info(f"parameters identical on all {world} processes (sha256 {digest})")
