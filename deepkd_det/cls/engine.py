"""The classification trainer: plain or DeepKD distillation, checkpoints, resume, logs, evaluation.

One ``ClsTrainer(cfg, resume=False).train()`` call runs a whole experiment on one or several
workers (torchrun). Rank 0 writes everything under the output directory:

    config.yaml       the merged configuration
    worklog.txt       plain-text log of the run (start, epochs, best, errors)
    metrics.jsonl     one json object per epoch ({"type": "epoch", ...}) and GSNR measurement
    tb/               TensorBoard scalars (losses, lr, K, top-1/top-5, GSNR)
    latest.pth        full training state after the last finished epoch (used by --resume); with
                      DiffKD it also holds the distiller's training-only modules ("distiller")
    best.pth          full training state of the best validation top-1
    student_best.pth  student weights only, {"model": state_dict} (mdistiller layout)
    ckpt_epoch_<N>.pth  student weights only, every LOG.SAVE_EVERY epochs and after the last one

With ``EMA.ENABLED`` (timm's ModelEmaV2, cls/ema.py) the EMA model is updated after every step,
held in latest.pth / best.pth ("ema"), evaluated after every epoch (``val/ema_top1``) and, when
it scores the best epoch, written to student_best.pth (``"source": "ema"``).

With ``GPD.ENABLED`` the trained model is the GPD shared model (student and dynamic teacher in
one, distillers/gpd.py): latest.pth / best.pth hold it, student_best.pth and ckpt_epoch_<N>.pth
the exported plain student (loadable into the ordinary student class).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.amp import ComponentGradScaler, amp_dtype, autocast
from deepkd_det.core.cfgfile import flatten
from deepkd_det.core.dist import DistInfo, all_gather_object, all_reduce_sum, barrier, init_distributed
from deepkd_det.core.gpd import DYNAMIC_TEACHER, at_width
from deepkd_det.core.io import check_output_dir, remove_leftover_temp_files
from deepkd_det.core.rng import capture_rng_state, preserve_rng_state, restore_rng_state
from deepkd_det.core.settings import build_decoupled_step, build_gsnr_meter, decoupled
from deepkd_det.core.step import check_finite_losses

from . import deepkd as deepkd_api
from .checkpoint import atomic_save, load_checkpoint
from .config import build_topk_schedule, experiment_name, output_dir, validate_cfg
from .data import build_datasets, build_loaders
from .distillers import StepContext, build_distiller, distiller_class
from .distillers.gpd import plain_student, widen_student
from .ema import build_ema, ema_state, load_ema_state

__all__ = ["ClsTrainer", "NonFiniteLossError", "accuracy", "evaluate", "build_teacher", "lr_at"]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; training stops before the step that would spread it."""


def lr_at(cfg, epoch_progress: float) -> float:
    """Learning rate at ``epoch_progress`` (0-based epochs, fractional within an epoch)."""
    s = cfg.SOLVER
    if s.LR_SCHEDULER == "step":
        lr = s.LR * s.LR_DECAY_RATE ** sum(int(epoch_progress) >= stage for stage in s.LR_DECAY_STAGES)
    else:
        lr = s.MIN_LR + (s.LR - s.MIN_LR) * 0.5 * (1.0 + math.cos(math.pi * epoch_progress / s.EPOCHS))
    if s.WARMUP_EPOCHS > 0 and epoch_progress < s.WARMUP_EPOCHS:
        lr *= epoch_progress / s.WARMUP_EPOCHS
    return lr


def accuracy(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> List[int]:
    """Number of rows whose target is among the top-k logits, for each k (k capped at C)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> Dict[str, float]:
    """Top-1 / top-5 (%) and mean cross-entropy over the loader, summed over all workers."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for image, target in loader:
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        logits = model(image)
        c1, c5 = accuracy(logits, target)
        totals += torch.tensor([c1, c5, float(F.cross_entropy(logits, target, reduction="sum")), len(target)],
                               dtype=torch.float64)
    all_reduce_sum(totals)
    model.train(was_training)
    n = max(totals[3].item(), 1.0)
    return {"top1": 100.0 * totals[0].item() / n, "top5": 100.0 * totals[1].item() / n,
            "loss": totals[2].item() / n, "count": int(totals[3].item())}


def _to_device(image, device: torch.device):
    """A batch of images, or the (weak, strong) views of a two-view batch, on ``device``."""
    if isinstance(image, (list, tuple)):
        return tuple(view.to(device, non_blocking=True) for view in image)
    return image.to(device, non_blocking=True)


def build_teacher(cfg, num_classes: int) -> Optional[nn.Module]:
    """The frozen teacher from its checkpoint; None for vanilla training."""
    from .models import build_model, load_teacher_weights, resolve_teacher_checkpoint

    if cfg.DISTILLER.TYPE == "NONE":
        return None
    name = cfg.DISTILLER.TEACHER
    teacher = build_model(name, num_classes)
    path = cfg.TEACHER.CKPT or resolve_teacher_checkpoint(cfg.TEACHER.ROOT, name)
    load_teacher_weights(teacher, path)
    return deepkd_api.prepare_teacher(teacher, fold_bn=cfg.TEACHER.FOLD_BN)


def _config_changes(saved_yaml: str, cfg) -> List[str]:
    """``KEY: old -> new`` for every setting that differs from the checkpoint's configuration."""
    import yaml

    if not saved_yaml:
        return []
    old, new = flatten(yaml.safe_load(saved_yaml) or {}), flatten(yaml.safe_load(cfg.dump()))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class _Writers:
    """Rank-0 outputs: worklog, metrics.jsonl, TensorBoard. On other ranks every call is a no-op."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.out_dir = out_dir
        self.tensorboard = tensorboard
        self.tb = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)

    def _tb(self):
        if self.tb is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"))
        return self.tb

    def log(self, msg: str, echo: bool = True) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        with open(os.path.join(self.out_dir, "worklog.txt"), "a") as f:
            f.write(line + "\n")
        if echo:
            print(line, flush=True)

    def record(self, entry: Dict, step: int) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        tb = self._tb()
        if tb is not None:
            for key, value in entry.items():
                if key not in ("type", "epoch", "iter") and isinstance(value, (int, float)):
                    tb.add_scalar(key, value, step)
            tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class ClsTrainer:
    """Builds data, models, distiller and optimizer from ``cfg`` and trains.

    ``resume=True`` continues from ``<output dir>/latest.pth``: student, optimizer (all DeepKD
    momentum buffers), top-k schedule, epoch, best accuracy and every worker's RNG state, so
    the run continues exactly as an uninterrupted one would.
    """

    def __init__(self, cfg, resume: bool = False, dist_info: Optional[DistInfo] = None):
        from .models import build_model

        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.DEVICE)
        self.device = self.dist.device
        self.out_dir = output_dir(cfg)
        check_output_dir(self.out_dir)
        self.writers = _Writers(self.out_dir, self.dist.is_main, cfg.LOG.TENSORBOARD)
        if self.dist.is_main:  # a kill during a save leaves its temporary file behind
            for name in remove_leftover_temp_files(self.out_dir):
                self.writers.log(f"removed {name}, left in {self.out_dir} by an interrupted checkpoint save")
        if cfg.DETERMINISTIC:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.SEED)  # identical initialisation on every worker

        # Two-view methods (MLKD, CRLD) get a weak and a strong view of each training image.
        train_set, val_set, self.num_classes = build_datasets(cfg, two_views=distiller_class(cfg).needs_two_views)
        validate_cfg(cfg, self.num_classes)  # top-k range against the real class count
        self.train_loader, self.val_loader = build_loaders(
            cfg, train_set, val_set, self.dist.rank, self.dist.world, pin_memory=self.device.type == "cuda")

        student = build_model(cfg.DISTILLER.STUDENT, self.num_classes)
        if cfg.FINETUNE.STUDENT_WEIGHTS:  # fine-tuning: a pretrained student (before GPD widens it)
            from .models import load_teacher_weights

            load_teacher_weights(student, cfg.FINETUNE.STUDENT_WEIGHTS)
        self.gpd = bool(cfg.GPD.ENABLED)
        if self.gpd:  # the GPD shared model: student and dynamic teacher in one (distillers/gpd.py)
            student = widen_student(cfg, student)
        # GPD clips the summed gradient (released: norm 5); 0 / GPD off: no clip.
        self.clip_norm = cfg.GPD.CLIP_GRAD_NORM if self.gpd else 0.0
        teacher = build_teacher(cfg, self.num_classes)
        self.distiller = build_distiller(cfg, student, teacher, num_classes=self.num_classes).to(self.device)
        self.student = self.distiller.student
        # Trained: the student and the method's own training-only modules (DiffKD's denoisers);
        # only the student's weights are ever exported.
        self.params = list(self.student.parameters()) + self.distiller.extra_parameters()
        if self.dist.distributed:
            deepkd_api.broadcast_parameters(self.student)
        self.ema = build_ema(cfg, self.student)  # after the broadcast: the same start on every worker
        self.topk_schedule = build_topk_schedule(cfg, self.num_classes)
        self.decoupled = decoupled(cfg.DEEPKD)
        self.optimizer = deepkd_api.build_optimizer(cfg, self.params, self.decoupled)
        self.gsnr = (build_gsnr_meter(cfg.DEEPKD, self.student.named_parameters(), len(self.train_loader))
                     if cfg.DEEPKD.GSNR.ENABLED else None)
        # Mixed precision: autocast forward; fp16 adds one loss scale over every component.
        self.amp_dtype = amp_dtype(cfg.AMP.DTYPE) if cfg.AMP.ENABLED else None
        self.scaler = ComponentGradScaler() if self.amp_dtype is torch.float16 else None
        # The losses are checked (averaged over workers, with epoch and iteration) before the step.
        self.decoupled_step = (build_decoupled_step(
            cfg.DEEPKD, self.optimizer, grad_hook=self.gsnr.gradient_hook if self.gsnr is not None else None,
            check_finite=False, scaler=self.scaler, clip_norm=self.clip_norm) if self.decoupled else None)

        self.start_epoch = 0
        self.best_top1 = -1.0
        self.best_epoch = -1
        self.iteration = 0
        # Each worker gets its own augmentation stream (after the shared initialisation).
        torch.manual_seed(cfg.SEED * 1_000 + self.dist.rank + 1)
        if resume:
            self.resume()

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch: int) -> Dict:
        rng = all_gather_object(capture_rng_state())  # every worker's stream, indexed by rank
        average = getattr(self.optimizer, "average_buffers_", None)
        if average is not None:  # DEEPKD.DIST_MODE update: the workers' buffers -> the global ones
            average()
        return {
            "epoch": epoch,  # number of finished epochs
            "iteration": self.iteration,
            "model": self.student.state_dict(),
            "distiller": self.distiller.extra_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "topk_schedule": self.topk_schedule.state_dict() if self.topk_schedule else None,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "rng": rng,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": ema_state(self.ema),
            "world_size": self.dist.world,
            "config": self.cfg.dump(),
        }

    def resume(self, path: Optional[str] = None) -> None:
        path = path or os.path.join(self.out_dir, "latest.pth")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (start without --resume)")
        try:
            state = load_checkpoint(path)
        except ValueError as exc:
            raise ValueError(f"--resume: {exc}. Start without --resume (a new run), or restore {path} "
                             "from a copy") from None
        self.student.load_state_dict(state["model"])
        extra, own = state.get("distiller", {}), self.distiller.extra_state_dict()
        if set(extra) != set(own):
            raise ValueError(
                f"{path}: the distiller's training-only modules differ from this run's: missing "
                f"{sorted(set(own) - set(extra))[:5]}, unexpected {sorted(set(extra) - set(own))[:5]}")
        if own:
            self.distiller.load_state_dict(extra, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"--resume: {path} holds no EMA model but EMA.ENABLED is on; resume with "
                                 "EMA.ENABLED False, or start a new run")
            load_ema_state(self.ema, state["ema"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.topk_schedule is not None and state.get("topk_schedule"):
            self.topk_schedule.load_state_dict(state["topk_schedule"])
        self.start_epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])
        self.best_top1 = float(state["best_top1"])
        self.best_epoch = int(state["best_epoch"])
        rng = state["rng"]
        if int(state.get("world_size", 1)) == self.dist.world:
            restore_rng_state(rng[self.dist.rank])
        else:
            self.writers.log(f"resume: checkpoint from {state.get('world_size')} workers, now {self.dist.world}; "
                             "random streams restart (the run will not match an uninterrupted one exactly)")
        changed = _config_changes(state.get("config", ""), self.cfg)
        if changed:
            self.writers.log("resume: configuration differs from the checkpoint's: " + "; ".join(changed))
        self.writers.log(f"resumed from {path} after epoch {self.start_epoch} (best top-1 {self.best_top1:.2f})")

    def _save(self, epoch: int, metrics: Dict[str, float]) -> None:
        state = self.state_dict(epoch)  # collective: every rank takes part
        if not self.dist.is_main:
            return
        atomic_save(state, os.path.join(self.out_dir, "latest.pth"))
        periodic = epoch % self.cfg.LOG.SAVE_EVERY == 0 or epoch == self.cfg.SOLVER.EPOCHS
        if not (metrics.get("is_best") or periodic):
            return
        # Student-only files hold the plain student (GPD: exported from the shared model, core.gpd.export).
        weights = plain_student(self.student).state_dict() if self.gpd else state["model"]
        student_only = {"model": weights, "epoch": epoch, "top1": metrics.get("top1")}
        if metrics.get("is_best"):
            atomic_save(state, os.path.join(self.out_dir, "best.pth"))
            best = student_only
            if metrics.get("best_source") == "ema":  # the EMA model scored the best epoch
                best = {"model": plain_student(self.ema.module).state_dict(), "epoch": epoch,
                        "top1": metrics.get("ema_top1"), "source": "ema"}
            atomic_save(best, os.path.join(self.out_dir, "student_best.pth"))
        if periodic:
            atomic_save(student_only, os.path.join(self.out_dir, f"ckpt_epoch_{epoch}.pth"))

    # ------------------------------------------------------------------ training
    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _checked_values(self, losses: Dict[str, torch.Tensor], epoch: int, it: int) -> Dict[str, float]:
        """Loss values averaged over the workers; every worker stops together on a NaN/inf."""
        try:
            return check_finite_losses(
                losses, f"at epoch {epoch + 1}, iteration {it + 1}",
                hint="Training stopped before the update; checkpoints (latest.pth) hold the last finished epoch, "
                     "if any. Lower SOLVER.LR or check the data and teacher.")
        except FloatingPointError as exc:
            self.writers.log(f"ERROR {exc}")
            raise NonFiniteLossError(str(exc)) from None

    def train_step(self, image, target: torch.Tensor, ctx: StepContext, epoch: int, it: int):
        """One optimisation step; returns (logits, {component: loss averaged over workers}).

        ``image`` is a batch, or its ``(weak, strong)`` views for a two-view distiller.
        """
        with autocast(self.device, self.amp_dtype):
            logits, losses = self.distiller(image, target, ctx)
        values = self._checked_values(losses, epoch, it)
        measuring = self.gsnr is not None and self.gsnr.begin(self.iteration)
        skip = False
        if self.decoupled:
            self.decoupled_step(self.optimizer.component_losses(**self.distiller.buffer_losses(losses)))
        else:
            if measuring:
                deepkd_api.observe_plain_components(self.gsnr, losses, list(self.student.parameters()))
            self.optimizer.zero_grad(set_to_none=True)
            total = sum(losses.values())
            (total if self.scaler is None else total * self.scaler.scale).backward()
            if self.dist.distributed:
                deepkd_api.average_gradients(self.params)
            if self.scaler is not None:
                skip = self.scaler.update(self.scaler.unscale_([p.grad for p in self.params]))
            if self.clip_norm > 0 and not skip:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        if not skip:  # (the decoupled step folds nothing on an fp16 overflow: step() has nothing to apply)
            self.optimizer.step()
        if self.ema is not None:  # after every step, as the release (timm's ModelEmaV2.update)
            self.ema.update(self.student)
        if measuring:
            if self.decoupled:
                self.gsnr.observe_buffers(self.optimizer)
            scalars = self.gsnr.end()
            if scalars:
                self.writers.record({"type": "gsnr", "epoch": epoch + 1, "iter": self.iteration, **scalars},
                                    self.iteration)
        return logits, values

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg = self.cfg
        self.distiller.train()
        steps = len(self.train_loader)
        sums: Dict[str, float] = {}
        correct = torch.zeros(2, dtype=torch.float64)
        progress_bar = None
        loader = self.train_loader(epoch)
        if self.dist.is_main and cfg.LOG.PROGRESS_BAR:
            from tqdm import tqdm

            progress_bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.SOLVER.EPOCHS}", leave=False,
                                dynamic_ncols=True)
        for it, (image, target) in enumerate(loader):
            if it >= steps:
                break
            image, target = _to_device(image, self.device), target.to(self.device, non_blocking=True)
            self._set_lr(lr_at(cfg, epoch + it / steps))
            progress = (epoch + it / steps) / cfg.SOLVER.EPOCHS
            k = self.topk_schedule.topk_arg(progress) if self.topk_schedule is not None else None
            ctx = StepContext(epoch=epoch + 1, topk=k)
            logits, values = self.train_step(image, target, ctx, epoch, it)
            self.iteration += 1
            for name, v in values.items():
                sums[name] = sums.get(name, 0.0) + v
            correct += torch.tensor([accuracy(logits.detach(), target, ks=(1,))[0], len(target)],
                                    dtype=torch.float64)
            if progress_bar is not None:
                progress_bar.update(1)
                progress_bar.set_postfix({n: f"{v:.3f}" for n, v in values.items()})
        if progress_bar is not None:
            progress_bar.close()
        all_reduce_sum(correct)
        out = {f"train/{n}": v / steps for n, v in sums.items()}
        out["train/loss"] = sum(sums.values()) / steps
        out["train/top1"] = 100.0 * correct[0].item() / max(correct[1].item(), 1.0)
        out["lr"] = lr_at(cfg, epoch)
        if self.topk_schedule is not None:
            out["topk/K"] = float(self.topk_schedule.k_at(self.topk_schedule.last_progress))
        return out

    # ------------------------------------------------------------------ main loop
    def train(self, stop_after: Optional[int] = None) -> Dict[str, float]:
        """Train to SOLVER.EPOCHS (or only until ``stop_after`` epochs are finished; resume later)."""
        cfg = self.cfg
        end = cfg.SOLVER.EPOCHS if stop_after is None else min(int(stop_after), cfg.SOLVER.EPOCHS)
        if self.dist.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                f.write(cfg.dump())
        self.writers.log(
            f"start {experiment_name(cfg)}: {cfg.DISTILLER.TYPE} "
            f"{cfg.DISTILLER.TEACHER if cfg.DISTILLER.TYPE != 'NONE' else '-'} -> {cfg.DISTILLER.STUDENT}, DeepKD "
            f"{'on (' + cfg.DEEPKD.OPTIMIZER + ', ' + cfg.DEEPKD.COMPAT + ')' if cfg.DEEPKD.ENABLED else 'off'}, "
            f"{cfg.DATASET.TYPE} "
            f"({self.num_classes} classes), {self.dist.world} worker(s) on {self.device}, "
            f"epochs {self.start_epoch + 1}..{end} of {cfg.SOLVER.EPOCHS}, output {self.out_dir}")
        last_eval: Dict[str, float] = {}
        try:
            for epoch in range(self.start_epoch, end):
                t0 = time.time()
                metrics = self.train_epoch(epoch)
                finished = self.start_epoch = epoch + 1
                if self.dist.distributed:  # batch-norm statistics: rank 0's, the ones checkpointed
                    deepkd_api.broadcast_parameters(self.student)
                if finished % cfg.LOG.EVAL_EVERY == 0 or finished == cfg.SOLVER.EPOCHS:
                    last_eval = evaluate(self.student, self.val_loader, self.device)
                    metrics.update({"val/top1": last_eval["top1"], "val/top5": last_eval["top5"],
                                    "val/loss": last_eval["loss"]})
                    if self.gpd:  # the dynamic teacher: how far ahead of the student it is
                        with at_width(self.student, DYNAMIC_TEACHER):
                            metrics["val/dt_top1"] = evaluate(self.student, self.val_loader, self.device)["top1"]
                    score, source = last_eval["top1"], "model"
                    if self.ema is not None:  # evaluated as the release does, both widths with GPD
                        # (an evaluation pass draws a loader seed: the training streams must not move,
                        # so turning EMA on leaves the model's training unchanged)
                        with preserve_rng_state():
                            last_eval["ema_top1"] = evaluate(self.ema.module, self.val_loader, self.device)["top1"]
                            if self.gpd:
                                with at_width(self.ema.module, DYNAMIC_TEACHER):
                                    metrics["val/ema_dt_top1"] = evaluate(self.ema.module, self.val_loader,
                                                                          self.device)["top1"]
                        metrics["val/ema_top1"] = last_eval["ema_top1"]
                        if last_eval["ema_top1"] > score:  # the release's best metric: max(model, EMA)
                            score, source = last_eval["ema_top1"], "ema"
                    if score > self.best_top1:
                        self.best_top1, self.best_epoch = score, finished
                        metrics["is_best"] = True
                        metrics["best_source"] = source
                metrics["time"] = time.time() - t0
                self._save(finished, {"top1": last_eval.get("top1"), "ema_top1": last_eval.get("ema_top1"),
                                      "is_best": metrics.pop("is_best", False),
                                      "best_source": metrics.pop("best_source", None)})
                self.writers.record({"type": "epoch", "epoch": finished, **metrics}, finished)
                self.writers.log(
                    f"epoch {finished}/{cfg.SOLVER.EPOCHS} "
                    + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                    + f" best={self.best_top1:.2f}@{self.best_epoch}")
        finally:
            self.writers.close()
        barrier()
        summary = {"best_top1": self.best_top1, "best_epoch": self.best_epoch,
                   "last_top1": last_eval.get("top1", float("nan")),
                   "last_top5": last_eval.get("top5", float("nan"))}
        if self.ema is not None:
            summary["last_ema_top1"] = last_eval.get("ema_top1", float("nan"))
        self.writers.log(f"done: best top-1 {self.best_top1:.2f} at epoch {self.best_epoch}, "
                         f"last top-1 {summary['last_top1']:.2f}")
        return summary
