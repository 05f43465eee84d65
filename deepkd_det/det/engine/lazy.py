"""The engine of ``train_net.py`` built from a LazyConfig (detectron2's Python configs).

:class:`LazyDeepKDTrainer` is a :class:`~deepkd_det.det.engine.trainer.DeepKDEngine`, like
``DeepKDTrainer``: the same step (decoupled DeepKD step or detectron2's, AMP), checkpointer and
teacher rule, hooks and exact resume. Only the builders differ: the model, the optimizer, the
training loader, the learning-rate multiplier and the evaluation come from the LazyConfig's
``model``, ``optimizer``, ``dataloader``, ``lr_multiplier`` and ``train`` nodes, and the DEEPKD
settings from its ``deepkd`` node (validated by ``deepkd_det/det/lazy.py`` first).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from detectron2.config import instantiate
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.solver import LRMultiplier
from detectron2.utils.logger import setup_logger

from deepkd_det.core.settings import build_decoupled_optimizer, decoupled

from .trainer import (
    DeepKDEngine,
    EngineSettings,
    remove_interrupted_saves,
    resumable_loader,
    uses_fast_coco_eval,
)

__all__ = ["LazyDeepKDTrainer", "build_lazy_optimizer", "build_lazy_train_loader", "lazy_evaluate"]

logger = logging.getLogger(__name__)


def _target_name(node) -> str:
    target = node.get("_target_") if hasattr(node, "get") else None
    if target is None:
        return ""
    return target if isinstance(target, str) else f"{target.__module__}.{target.__qualname__}"


def build_lazy_optimizer(cfg, model, deepkd) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``model``; with the decoupled DeepKD update (``deepkd``), the core
    optimizer of ``deepkd`` (DeepKD or DOT) over the same parameter groups, with the SGD node's
    lr, momentum and weight decay (what the yacs path takes from SOLVER)."""
    opt = cfg.optimizer
    opt.params.model = model
    if not decoupled(deepkd):
        return instantiate(opt)
    if not _target_name(opt).endswith("torch.optim.SGD") and not _target_name(opt).endswith("torch.optim.sgd.SGD"):
        raise ValueError(f"optimizer: deepkd.ENABLED (decoupled) replaces torch.optim.SGD by the DeepKD optimizer, "
                         f"but optimizer is {_target_name(opt) or opt!r}: use detectron2's SGD node "
                         "(configs/common/optim.py)")
    if opt.get("nesterov", False):
        raise ValueError("optimizer.nesterov is not supported with deepkd.ENABLED")
    params = instantiate(opt.params)
    return build_decoupled_optimizer(deepkd, params, lr=opt.lr, momentum=opt.get("momentum", 0.0),
                                     weight_decay=opt.get("weight_decay", 0.0))


def build_lazy_train_loader(cfg):
    """``(loader, sampler)`` of ``cfg.dataloader.train``: detectron2's ``build_detection_train_loader``
    node gets the engine's resumable sampler over its dataset (exact ``--resume``); any other
    loader is built as written, and its index stream restarts on ``--resume`` (a warning)."""
    node = cfg.dataloader.train
    if not _target_name(node).endswith("build_detection_train_loader") or "sampler" in node:
        logger.warning(f"dataloader.train is {_target_name(node) or 'not a LazyCall'} with its own sampler: "
                       "--resume restarts its index stream")
        return instantiate(node), None
    target = node._target_
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        target = locate(target)
    kwargs = {k: instantiate(node[k]) for k in node if k != "_target_"}
    dataset = kwargs.pop("dataset")
    return resumable_loader(lambda sampler: target(dataset=dataset, sampler=sampler, **kwargs), len(dataset))


def lazy_evaluate(cfg, model) -> Optional[dict]:
    """``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator`` (detectron2's
    ``do_test``); a COCOEvaluator without ``use_fast_impl`` / ``output_dir`` gets the engine's
    (the compiled COCOeval where it exists; ``<train.output_dir>/inference``). None when the
    config has no evaluator (or ``dataloader.evaluator=null``)."""
    if cfg.dataloader.get("evaluator") is None or cfg.dataloader.get("test") is None:
        return None  # absent, or dataloader.evaluator=null: no evaluation
    evaluator = cfg.dataloader.evaluator
    if _target_name(evaluator).endswith("COCOEvaluator") or evaluator.get("_target_") is COCOEvaluator:
        if "use_fast_impl" not in evaluator:
            evaluator.use_fast_impl = uses_fast_coco_eval()
        if "output_dir" not in evaluator:
            evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(evaluator))
    if results:
        print_csv_format(results)
    return results


class LazyDeepKDTrainer(DeepKDEngine):
    """The DeepKD engine built from a LazyConfig ``cfg`` (loaded and validated by
    ``deepkd_det.det.lazy.setup``) and its DEEPKD node ``deepkd`` (a yacs node, the object the
    core factories read). Use it like ``DeepKDTrainer``: ``trainer.resume_or_load(resume);
    trainer.train()``."""

    def __init__(self, cfg, deepkd, settings: EngineSettings):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        remove_interrupted_saves(settings.output_dir)
        # The order of the yacs trainer (model, optimizer, loader): the same random streams.
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        optimizer = build_lazy_optimizer(cfg, model, deepkd)
        data_loader, train_sampler = build_lazy_train_loader(cfg)
        self.cfg = cfg
        self.setup_engine(
            settings, model, optimizer, data_loader, train_sampler,
            lambda opt: LRMultiplier(opt, instantiate(cfg.lr_multiplier), settings.max_iter),
        )

    def evaluate_model(self) -> Any:
        return lazy_evaluate(self.cfg, self.model)
