"""Periodic GSNR / BSNR of the three gradient components during detection training.

Every DEEPKD.GSNR.PERIOD iterations (0: once per epoch) the core ``GSNRMeter`` records a window
of DEEPKD.GSNR.WINDOW mini-batches: each component's (process-averaged) gradient through the
decoupled step's ``grad_hook``, and the momentum buffers after the update. At the window's end
the overall values go to the event storage as ``gsnr/<c>`` and ``bsnr/<c>`` (so to metrics.json
and TensorBoard, where ``tools/plot_gsnr.py`` finds them) and the per-layer values to
``<OUTPUT_DIR>/gsnr_per_layer.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["GSNRHook"]

_WRITER_PERIOD = 20  # DeepKDTrainer's PeriodicWriter period, as DefaultTrainer's


class GSNRHook(HookBase):
    """Drives a ``deepkd_det.core.gsnr.GSNRMeter`` from the trainer's iterations.

    Args:
        step: the trainer's ``DecoupledStep`` (its ``grad_hook`` is set while a window records).
        meter: the meter (``core.settings.build_gsnr_meter``) over the trainable named parameters.
        output_dir: where ``gsnr_per_layer.jsonl`` goes (main process only); None: not written.
    """

    def __init__(self, step, meter, output_dir: Optional[str] = None):
        if meter.period < _WRITER_PERIOD:
            logging.getLogger(__name__).warning(
                f"DEEPKD.GSNR.PERIOD={meter.period} < {_WRITER_PERIOD}: metrics.json / TensorBoard are written every "
                f"{_WRITER_PERIOD} iterations and keep only the latest window; gsnr_per_layer.jsonl has every window"
            )
        self.step = step
        self.meter = meter
        self.output_dir = output_dir

    def before_step(self):
        recording = self.meter.begin(self.trainer.iter)
        self.step.grad_hook = self.meter.gradient_hook if recording else None

    def after_step(self):
        self.meter.observe_buffers(self.step.optimizer)
        self.step.grad_hook = None
        scalars = self.meter.end()
        if not scalars:
            return
        self.trainer.storage.put_scalars(smoothing_hint=False, **scalars)
        if self.output_dir and comm.is_main_process():
            row = {"type": "gsnr", "iter": self.trainer.iter, **scalars, "per_layer": self.meter.per_layer}
            with open(os.path.join(self.output_dir, "gsnr_per_layer.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
