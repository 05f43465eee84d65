"""What an exact ``--resume`` needs beyond detectron2's checkpoint: RNG states and data position.

detectron2 restores the model, optimizer, scheduler and iteration, but not the random number
generators (RPN / ROI proposal sampling draws from torch's, augmentations from numpy's) and
restarts the training sampler from the beginning of its stream. This module saves every
rank's RNG states with each checkpoint, restores them, and lets the training sampler skip the
indices consumed before the checkpoint, so that a resumed run continues as an uninterrupted one
(exactly so with ``DATALOADER.NUM_WORKERS 0`` and images of one aspect ratio class; with more
workers or mixed aspect-ratio grouping, the data order is resumed and per-image augmentations
may differ).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Any, Dict, Optional

import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase
from detectron2.utils import comm

from deepkd_det.core.rng import capture_rng_state, preserve_rng_state, restore_rng_state

__all__ = [
    "RNGStateHook",
    "isolate_loader_rng",
    "ResumableTrainingSampler",
    "capture_rng_state",
    "preserve_rng_state",
    "restore_rng_state",
    "trim_metrics_after",
]

logger = logging.getLogger(__name__)


def isolate_loader_rng(loader, seed: int) -> int:
    """Give every torch DataLoader inside ``loader`` its own generator; returns how many.

    A DataLoader iterator draws its workers' base seed from the *global* torch RNG when it is
    created, which detectron2's aspect-ratio grouping does lazily, at the first batch. After a
    resume that first batch is in the middle of training, so the draw would shift the restored
    RNG stream; with a private generator the global stream is left alone.
    """
    found, node, seen = 0, loader, set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, torch.utils.data.DataLoader):
            node.generator = torch.Generator().manual_seed(int(seed))
            found += 1
        node = getattr(node, "dataset", None)
    return found


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's TrainingSampler that can start ``skip`` indices (per rank) into its stream.

    The infinite stream is the same as TrainingSampler's for the same seed; resuming sets
    ``skip`` to the number of indices this rank consumed before the checkpoint.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: Optional[int] = None):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.skip = 0

    @property
    def seed(self) -> int:
        return self._seed

    def set_position(self, seed: int, skip: int) -> None:
        self._seed, self.skip = int(seed), int(skip)

    def __iter__(self):
        start = self._rank + self.skip * self._world_size
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)


class RNGStateHook(HookBase):
    """Captures every rank's RNG states right before the checkpointer saves, so that they go
    into the checkpoint (as this hook's state), and hands them back on load.

    Register it on every rank, before ``PeriodicCheckpointer``, with the checkpointer's period.
    ``load_state_dict`` only stores the states; the trainer takes them (:meth:`take_pending`)
    and applies them once everything that draws random numbers at start-up is built.
    """

    def __init__(self, period: int, sampler: Optional[ResumableTrainingSampler] = None):
        self._period = int(period)
        self._sampler = sampler
        self._captured: Optional[Dict[str, Any]] = None
        self._pending: Optional[Dict[str, Any]] = None

    def _will_save(self, iteration: int) -> bool:
        return (iteration + 1) % self._period == 0 or iteration >= self.trainer.max_iter - 1

    def after_step(self):
        if not self._will_save(self.trainer.iter):
            return
        states = comm.all_gather(capture_rng_state()) if comm.get_world_size() > 1 else [capture_rng_state()]
        self._captured = {"per_rank": states}
        if self._sampler is not None:
            self._captured["sampler_seed"] = int(self._sampler.seed)

    def state_dict(self):
        return self._captured or {}

    def load_state_dict(self, state_dict):
        self._pending = state_dict

    def take_pending(self) -> Optional[Dict[str, Any]]:
        """The state loaded from a checkpoint (``per_rank`` RNG states, ``sampler_seed``), once."""
        pending, self._pending = self._pending, None
        return pending or None


def trim_metrics_after(path: str, start_iter: int) -> int:
    """Cut ``metrics.json`` (detectron2's JSONWriter: one JSON object per line, in iteration
    order) before its first row with ``iteration >= start_iter``; returns the rows removed.

    A run killed after its last checkpoint has logged rows that the resumed run logs again: without
    this the file would hold two rows for those iterations. Only the tail is cut (a truncate), so
    the writer's open append handle stays valid and earlier rows are untouched.
    """
    if not os.path.isfile(path):
        return 0
    offset, cut, removed = 0, None, 0
    with open(path, "rb") as f:
        for line in f:
            if cut is None:
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None  # a line cut by the kill: goes with the tail
                if row is None or (isinstance(row, dict) and row.get("iteration", -1) >= start_iter):
                    cut = offset
            if cut is not None and line.strip():
                removed += 1
            offset += len(line)
    if cut is not None:
        os.truncate(path, cut)
        logger.info(f"metrics.json: removed {removed} rows from iteration {start_iter} on (logged after the "
                    "checkpoint that this run resumes from)")
    return removed
