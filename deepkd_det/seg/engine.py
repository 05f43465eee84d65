"""The segmentation trainer: iterations, poly learning rate, mIoU, atomic checkpoints, exact resume.

``SegTrainer(cfg, resume=False).train()`` runs one experiment; everything goes to ``OUTPUT_DIR``:

    config.yaml        the merged configuration
    metrics.jsonl      {"type": "train", "iter", losses, lr, K} every LOG.PERIOD iterations and
                       {"type": "eval", "iter", "mIoU", "mACC", "pACC", "IoU-<class>"...} every TEST.EVAL_PERIOD
    latest.pth         full state after the last checkpointed iteration (--resume): student, the
                       method's own modules (DiffKD's denoiser), optimizer (every DeepKD buffer),
                       top-k schedule, iteration and the RNG state
    student_final.pth  the student only, {"model": state_dict, "iteration", "mIoU"} (also a teacher file)

Exact resume: the batch and the augmentation of iteration i depend only on (SEED, i)
(``data.iteration_batches``), the global RNG (dropout, DiffKD's noise) is restored from the
checkpoint, and the metrics rows a killed run wrote after its checkpoint are dropped, so a resumed
run writes the same weights and rows as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

import torch
import torch.nn as nn

from deepkd_det.core.io import atomic_save, atomic_write, load_weights_only, remove_leftover_temp_files
from deepkd_det.core.rng import capture_rng_state, restore_rng_state
from deepkd_det.core.settings import (
    build_decoupled_optimizer,
    build_decoupled_step,
    build_topk_schedule,
    decoupled,
)
from deepkd_det.core.settings import topk_rank as core_topk_rank
from deepkd_det.core.step import check_finite_losses
from deepkd_det.core.teacher import prepare_teacher

from .config import validate_seg_cfg
from .data import SegTrainSet, build_seg_datasets, collate, eval_tensors, iteration_batches
from .distill import SegDistiller
from .evaluation import ConfusionMatrix
from .models import build_seg_model

__all__ = ["NonFiniteLossError", "SegTrainer", "build_teacher", "evaluate_miou", "poly_lr"]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; training stops before the update."""


def poly_lr(base_lr: float, it: int, max_iter: int, power: float) -> float:
    return base_lr * (1.0 - it / max_iter) ** power


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("DEVICE cuda: no CUDA device is available (use DEVICE cpu)")
    return torch.device(name)


@torch.no_grad()
def evaluate_miou(model: nn.Module, dataset, classes, mean, std, device, miou_classes: str = "union") -> Dict[str, float]:
    """mIoU (detectron2's SemSegEvaluator definition, ``evaluation``) of ``model`` on ``dataset``, full size."""
    was = model.training
    model.eval()
    conf = ConfusionMatrix(len(classes))
    for i in range(len(dataset)):
        x, y = eval_tensors(*dataset[i], mean, std)
        conf.update(model(x[None].to(device)).argmax(dim=1)[0].cpu(), y)
    model.train(was)
    return conf.compute(classes, miou_classes)


def build_teacher(cfg, num_classes: int) -> nn.Module:
    """The frozen teacher of ``cfg.TEACHER`` with its weights; every mismatch is one error naming the file."""
    t = cfg.TEACHER
    path = t.CKPT
    state = load_weights_only(path)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"TEACHER.CKPT {path}: not a state dict (or {{'model': state_dict}})")
    head = state.get("head.classifier.weight")
    if head is not None and head.shape[0] != num_classes:
        raise ValueError(f"TEACHER.CKPT {path}: the teacher predicts {head.shape[0]} classes, the data has "
                         f"{num_classes}: teacher and student class counts must agree")
    teacher = build_seg_model(t.BACKBONE, t.HEAD, num_classes, width=t.WIDTH, head_channels=t.HEAD_CHANNELS,
                              aspp_rates=t.ASPP_RATES)
    own = teacher.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"TEACHER.CKPT {path} does not fit TEACHER {t.BACKBONE}/{t.HEAD}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shape {wrong[:4]}")
    teacher.load_state_dict(state)
    return prepare_teacher(teacher, fold_bn=False)


class SegTrainer:
    def __init__(self, cfg, resume: bool = False):
        self.cfg = cfg
        self.device = _device(cfg.DEVICE)
        self.out_dir = cfg.OUTPUT_DIR
        torch.manual_seed(cfg.SEED)
        self.train_set, self.val_set, self.classes = build_seg_datasets(cfg)
        self.num_classes = len(self.classes)
        validate_seg_cfg(cfg, self.num_classes)  # the top-k range against the real class count
        m = cfg.MODEL
        student = build_seg_model(m.BACKBONE, m.HEAD, self.num_classes, width=m.WIDTH, head_channels=m.HEAD_CHANNELS,
                                  aspp_rates=m.ASPP_RATES, pretrained=m.PRETRAINED)
        method = cfg.DISTILLER.TYPE
        teacher = build_teacher(cfg, self.num_classes).to(self.device) if method != "NONE" else None
        params = {"NONE": None, "KD": cfg.KD, "DKD": cfg.DKD, "DIFFKD": cfg.DIFFKD}[method]
        self.distiller = SegDistiller(student, teacher, method, params, core_topk_rank(cfg.DEEPKD)).to(self.device)
        self.student = self.distiller.student
        self.params = list(self.student.parameters()) + self.distiller.extra_parameters()
        s = cfg.SOLVER
        self.decoupled = decoupled(cfg.DEEPKD)
        if self.decoupled:
            self.optimizer = build_decoupled_optimizer(cfg.DEEPKD, self.params, lr=s.BASE_LR, momentum=s.MOMENTUM,
                                                       weight_decay=s.WEIGHT_DECAY)
            self.step = build_decoupled_step(cfg.DEEPKD, self.optimizer, check_finite=False)
        else:
            self.optimizer = torch.optim.SGD(self.params, lr=s.BASE_LR, momentum=s.MOMENTUM,
                                             weight_decay=s.WEIGHT_DECAY)
        self.topk_schedule = build_topk_schedule(cfg.DEEPKD, self.num_classes - 1)
        self.iteration = 0
        self.last_eval: Dict[str, float] = {}
        torch.manual_seed(cfg.SEED * 1000 + 1)  # the training stream (dropout, DiffKD noise)
        i = cfg.INPUT
        self.train_data = SegTrainSet(self.train_set, scale_range=i.SCALE_RANGE, crop=i.CROP_SIZE, flip=i.FLIP,
                                      mean=i.MEAN, std=i.STD)
        if resume:
            self.resume()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        return {"iteration": self.iteration, "model": self.student.state_dict(),
                "distiller": self.distiller.extra_state_dict(), "optimizer": self.optimizer.state_dict(),
                "topk_schedule": self.topk_schedule.state_dict() if self.topk_schedule else None,
                "last_eval": self.last_eval, "rng": capture_rng_state(), "config": self.cfg.dump()}

    def resume(self) -> None:
        path = os.path.join(self.out_dir, "latest.pth")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (start without --resume)")
        try:
            state = load_weights_only(path)
        except ValueError as exc:
            raise ValueError(f"--resume: {exc}") from None
        self.student.load_state_dict(state["model"])
        extra = state.get("distiller", {})
        if set(extra) != set(self.distiller.extra_state_dict()):
            raise ValueError(f"--resume: {path} was written by another method (its training-only modules differ)")
        if extra:
            self.distiller.load_state_dict(extra, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.topk_schedule is not None and state.get("topk_schedule"):
            self.topk_schedule.load_state_dict(state["topk_schedule"])
        self.iteration = int(state["iteration"])
        self.last_eval = dict(state.get("last_eval") or {})
        restore_rng_state(state["rng"])
        self._truncate_metrics(self.iteration)

    def _truncate_metrics(self, iteration: int) -> None:
        """Drop the rows a killed run wrote after its last checkpoint (they will be written again)."""
        path = os.path.join(self.out_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("iter", 0) <= iteration]
        atomic_write(path, lambda f: f.writelines(rows), mode="w")

    def _record(self, row: Dict) -> None:
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ training
    def train_step(self, image, label) -> Dict[str, float]:
        cfg = self.cfg
        progress = self.iteration / cfg.SOLVER.MAX_ITER
        k = self.topk_schedule.topk_arg(progress) if self.topk_schedule is not None else None
        _, losses = self.distiller.forward_train(image, label, k, self.iteration)
        try:
            values = check_finite_losses(losses, f"at iteration {self.iteration + 1}",
                                         hint="Training stopped before the update; latest.pth holds the last "
                                              "checkpoint. Lower SOLVER.BASE_LR or check the data and teacher.")
        except FloatingPointError as exc:
            raise NonFiniteLossError(str(exc)) from None
        if self.decoupled:
            self.step(self.optimizer.component_losses(**losses))
        else:
            self.optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
        self.optimizer.step()
        if self.topk_schedule is not None:
            values["K"] = float(self.topk_schedule.k_at(progress))
        return values

    def evaluate(self) -> Dict[str, float]:
        i = self.cfg.INPUT
        return evaluate_miou(self.student, self.val_set, self.classes, i.MEAN, i.STD, self.device,
                             self.cfg.TEST.MIOU_CLASSES)

    def train(self, stop_after: Optional[int] = None) -> Dict[str, float]:
        cfg, s = self.cfg, self.cfg.SOLVER
        end = s.MAX_ITER if stop_after is None else min(int(stop_after), s.MAX_ITER)
        os.makedirs(self.out_dir, exist_ok=True)
        remove_leftover_temp_files(self.out_dir)
        with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        loader = torch.utils.data.DataLoader(
            self.train_data, batch_sampler=iteration_batches(len(self.train_set), s.IMS_PER_BATCH, cfg.SEED,
                                                             self.iteration, end),
            num_workers=cfg.DATASET.NUM_WORKERS, collate_fn=collate,
            # Its own generator: a loader's iterator draws a seed, which must not move the global stream.
            generator=torch.Generator().manual_seed(cfg.SEED))
        self.distiller.train()
        t0 = time.time()
        for image, label in loader:
            lr = poly_lr(s.BASE_LR, self.iteration, s.MAX_ITER, s.POLY_POWER)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            values = self.train_step(image.to(self.device), label.to(self.device))
            self.iteration += 1
            it = self.iteration
            if it % cfg.LOG.PERIOD == 0 or it == s.MAX_ITER:
                self._record({"type": "train", "iter": it, "lr": lr, **values, "time": time.time() - t0})
            if it % cfg.TEST.EVAL_PERIOD == 0 or it == s.MAX_ITER:
                self.last_eval = self.evaluate()
                self._record({"type": "eval", "iter": it, **self.last_eval})
            if it % s.CHECKPOINT_PERIOD == 0 or it == s.MAX_ITER:
                atomic_save(self.state_dict(), os.path.join(self.out_dir, "latest.pth"))
            if it == s.MAX_ITER:
                atomic_save({"model": self.student.state_dict(), "iteration": it,
                             "mIoU": self.last_eval.get("mIoU")}, os.path.join(self.out_dir, "student_final.pth"))
        return {"iteration": self.iteration, "mIoU": self.last_eval.get("mIoU", float("nan"))}
