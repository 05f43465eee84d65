"""The per-iteration steps: detectron2's ordinary step and DeepKD's decoupled step.

Both check every loss for NaN/inf *before* anything is updated, and name the loss that went
bad (detectron2 only reports the whole dict, after the backward pass). Under
torch.distributed the check is collective, so every rank raises together instead of the other
ranks hanging in the next collective.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Mapping, Optional

import torch
from detectron2.engine import HookBase, SimpleTrainer

from deepkd_det.core.amp import autocast
from deepkd_det.core.step import check_finite_losses as core_check_finite_losses

__all__ = [
    "DISTILL_KEYS",
    "CheckedSimpleTrainer",
    "DecoupledStepTrainer",
    "FiniteWeightsCheck",
    "check_finite_losses",
    "last_checkpoint_note",
    "split_components",
]

# Loss-dict keys of the two distillation components of the R-CNN logit part (the default when a
# model states no ``loss_components``).
DISTILL_KEYS = {"loss_tckd": "tcg", "loss_nckd": "ncg"}


_HINT = ("Checkpoints and metrics written so far are intact. Lower SOLVER.BASE_LR (scale it with "
         "SOLVER.IMS_PER_BATCH), add warm-up (SOLVER.WARMUP_ITERS, KD.WARMUP_ITERS) or check the data and teacher "
         "weights.")


def check_finite_losses(loss_dict: Mapping[str, torch.Tensor], iteration: int, where: str = "") -> None:
    """FloatingPointError naming every non-finite loss and the iteration (on all ranks at once)."""
    core_check_finite_losses(loss_dict, f"at iteration {iteration}{where}", hint=_HINT)


def last_checkpoint_note(output_dir: str) -> str:
    """Which file ``--resume`` continues from (the one ``last_checkpoint`` names), or that none exists."""
    try:
        with open(os.path.join(output_dir, "last_checkpoint")) as f:
            name = f.read().strip()
    except OSError:
        name = ""
    if name:
        return f"The last checkpoint is {os.path.join(output_dir, name)} (finite): --resume continues from it."
    return "No checkpoint was written yet: start again with a lower SOLVER.BASE_LR."


class FiniteWeightsCheck(HookBase):
    """Before each periodic / final checkpoint: every parameter and buffer must be finite, so
    that ``last_checkpoint`` never names a diverged model; and the momentum buffers are averaged
    over the workers (``average_buffers_``: in DEEPKD.DIST_MODE "update" each worker's buffers
    follow its own gradients, their average is the global buffer, which the checkpoint saves and
    every worker continues from). Register it on every rank, right before
    ``PeriodicCheckpointer``, with the checkpointer's period."""

    def __init__(self, period: int, output_dir: str):
        self._period = int(period)
        self._output_dir = output_dir

    def after_step(self):
        it = self.trainer.iter
        if not ((it + 1) % self._period == 0 or it >= self.trainer.max_iter - 1):
            return
        average = getattr(self.trainer.optimizer, "average_buffers_", None)
        if average is not None:
            average()  # collective, on every rank
        model = self.trainer.model
        bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise FloatingPointError(
                f"training diverged: after iteration {it} {len(bad)} weights are NaN/inf (e.g. {bad[:3]}); this "
                f"model was not saved. {_HINT}"
            )


def split_components(
    loss_dict: Mapping[str, torch.Tensor], components: Mapping[str, str] = DISTILL_KEYS
) -> Dict[str, torch.Tensor]:
    """``{"tog": sum of the task losses, "tcg": ..., "ncg": ...}``: ``components`` maps the
    distillation losses to "tcg" / "ncg" (the wrapper's ``loss_components``, from its parts);
    every other loss is a task (TOG) loss."""
    task = [v for k, v in loss_dict.items() if k not in components]
    if not task:
        raise ValueError(f"the model returned no task loss (keys {sorted(loss_dict)})")
    missing = [k for k in components if k not in loss_dict]
    if missing or not {"tcg", "ncg"} <= set(components.values()):
        raise ValueError(
            f"DEEPKD.ENABLED needs the distillation losses {missing or ['loss_tckd', 'loss_nckd']} from the model "
            f"(got {sorted(loss_dict)}); use MODEL.META_ARCHITECTURE DeepKDRCNN (or DistillDetector) with KD.TYPE "
            "KD or DKD, or KD.DENSE.TYPE for a dense student"
        )
    out = {"tog": torch.stack([t.reshape(()) for t in task]).sum()}
    for component in ("tcg", "ncg"):
        terms = [loss_dict[k] for k, c in components.items() if c == component]
        out[component] = terms[0] if len(terms) == 1 else torch.stack([t.reshape(()) for t in terms]).sum()
    return out


class CheckedSimpleTrainer(SimpleTrainer):
    """detectron2's SimpleTrainer step (sum of all losses, one backward, optimizer step) with
    the named non-finite check before the backward pass; the forward under autocast in
    ``amp_dtype`` (bf16 here; fp16 goes through detectron2's AMPTrainer or the decoupled step's scaler)."""

    def __init__(self, model, data_loader, optimizer, amp_dtype: Optional[torch.dtype] = None):
        super().__init__(model, data_loader, optimizer)
        self.amp_dtype = amp_dtype

    def _next_losses(self):
        assert self.model.training, "[CheckedSimpleTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        try:
            with autocast(_device_of(self.model), self.amp_dtype):
                loss_dict = self.model(data)
        except FloatingPointError as exc:
            # detectron2's own check inside the forward ("Predicted boxes or scores contain
            # Inf/NaN"): reported as ours, through the same (collective) check with the loss names
            # of the last iteration, so that every rank stops together.
            keys = getattr(self, "_loss_keys", None)
            where = f" (in the forward pass: {exc})"
            if not keys:
                raise FloatingPointError(f"non-finite values at iteration {self.iter}{where}. {_HINT}") from None
            nan = torch.tensor(float("nan"))
            check_finite_losses(dict.fromkeys(keys, nan), self.iter, where)
            raise
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        check_finite_losses(loss_dict, self.iter)
        self._loss_keys = list(loss_dict)
        return loss_dict, data_time

    def run_step(self):
        loss_dict, data_time = self._next_losses()
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        if hasattr(self, "after_backward"):  # detectron2 > v0.6 has an after_backward hook point
            self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


class DecoupledStepTrainer(CheckedSimpleTrainer):
    """The DeepKD step: one forward, then the core ``DecoupledStep``, which computes each
    component's gradient (TOG: every detector loss; TCG: loss_tckd; NCG: loss_nckd), averages it
    over processes and folds it into its own momentum buffer; then the parameter update.
    """

    def __init__(self, model, data_loader, optimizer, decoupled_step, amp_dtype: Optional[torch.dtype] = None):
        super().__init__(model, data_loader, optimizer, amp_dtype)
        self.decoupled_step = decoupled_step

    def run_step(self):
        loss_dict, data_time = self._next_losses()
        components = getattr(getattr(self.model, "module", self.model), "loss_components", DISTILL_KEYS)
        self.decoupled_step(self.optimizer.component_losses(**split_components(loss_dict, components)))
        self.optimizer.step()  # nothing to apply when the fp16 scaler skipped the step
        self._write_metrics(loss_dict, data_time)

    def state_dict(self):
        ret = super().state_dict()
        if self.decoupled_step.scaler is not None:  # exact resume of the loss scale
            ret["grad_scaler"] = self.decoupled_step.scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.decoupled_step.scaler is not None and "grad_scaler" in state_dict:
            self.decoupled_step.scaler.load_state_dict(state_dict["grad_scaler"])


def _device_of(model) -> torch.device:
    return next(model.parameters()).device
