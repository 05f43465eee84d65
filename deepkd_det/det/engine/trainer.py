"""DeepKDTrainer: detectron2's DefaultTrainer with the DeepKD decoupled step.

With ``DEEPKD.ENABLED`` each iteration runs one forward and the decoupled step of
``deepkd_det.core`` (three gradient components, three momentum buffers); otherwise
detectron2's ordinary step (sum of the losses, torch SGD) — for plain Faster R-CNN
(``KD.TYPE NONE``, e.g. to train a teacher) and plain KD/DKD. Everything else is
DefaultTrainer's: param groups (norm / bias weight decay, bias lr factor), WarmupMultiStepLR,
periodic checkpoints and evaluation (COCOEvaluator), metrics.json, TensorBoard, console.

Additions: atomic checkpoints that hold the optimizer (all momentum buffers), scheduler, top-k
schedule, RNG and data-position state, so ``--resume`` continues as an uninterrupted run, but
not the frozen teacher when it is read from a file at every start; temporary files of an
interrupted save removed at start-up; ``metrics.json`` rows after the resumed checkpoint
removed; losses checked and named before any update (detectron2's own non-finite check inside
the forward reported the same way), and no checkpoint of a model with non-finite weights; DDP on CPU (``device_ids=None``); no DDP wrapper
for the decoupled step (it all-reduces each component itself).
"""

from __future__ import annotations

import logging
import os
import weakref

import torch
from detectron2.data import MetadataCatalog, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine.train_loop import AMPTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules
from torch.nn.parallel import DistributedDataParallel

from deepkd_det.core.amp import ComponentGradScaler, amp_dtype
from deepkd_det.core.io import remove_leftover_temp_files
from deepkd_det.core.settings import build_decoupled_step, build_gsnr_meter, decoupled
from deepkd_det.det.data import (
    add_data_config,
    check_mask_annotations,
    check_num_classes,
    register_datasets_from_cfg,
    resolve_num_classes,
)

from ..checkpoint import DeepKDCheckpointer
from ..modeling.weights import TEACHER_PREFIX
from .decoupled import broadcast_initial_parameters, build_deepkd_optimizer
from .gsnr import GSNRHook
from .resume import (
    ResumableTrainingSampler,
    RNGStateHook,
    isolate_loader_rng,
    preserve_rng_state,
    restore_rng_state,
    trim_metrics_after,
)
from .steps import CheckedSimpleTrainer, DecoupledStepTrainer, FiniteWeightsCheck, last_checkpoint_note
from .sync_check import ParameterSyncCheck

__all__ = ["DeepKDTrainer", "deepkd_enabled", "teacher_read_from_file", "uses_fast_coco_eval", "wrap_ddp"]

logger = logging.getLogger(__name__)


def deepkd_enabled(cfg) -> bool:
    """Whether the decoupled DeepKD/DOT update runs (DEEPKD.ENABLED and DEEPKD.DECOUPLE)."""
    dk = cfg.get("DEEPKD")
    return bool(dk is not None and decoupled(dk))


def _iterations_per_epoch(cfg, sampler) -> int:
    """One pass over the training images (DEEPKD.GSNR.PERIOD 0 measures once per epoch)."""
    size = getattr(sampler, "_size", None)
    if not size:
        return max(cfg.SOLVER.MAX_ITER // 10, 1)
    return max(-(-int(size) // cfg.SOLVER.IMS_PER_BATCH), 1)


def uses_fast_coco_eval() -> bool:
    """detectron2's fast COCOeval is compiled C++; the pure-Python v0.6 install has a shim."""
    try:
        import detectron2._C as compiled
    except ImportError:
        return False
    return not getattr(compiled, "__deepkd_shim__", False)


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel with >1 process; ``device_ids=None`` on CPU (v0.6's
    ``create_ddp_model`` passes ``[local_rank]``, which fails for CPU modules)."""
    if comm.get_world_size() == 1:
        return model
    on_gpu = next(model.parameters()).device.type == "cuda"
    device_ids = [comm.get_local_rank()] if on_gpu else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


class DeepKDTrainer(DefaultTrainer):
    """DefaultTrainer whose step is DeepKD's decoupled step when DEEPKD.ENABLED.

    Use it like DefaultTrainer: ``trainer = DeepKDTrainer(cfg); trainer.resume_or_load(resume);
    trainer.train()``. Datasets of DATASETS.REGISTER and the embedded shapes set are registered
    (and checked) here.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        cfg = cfg.clone()
        cfg.defrost()
        add_data_config(cfg)
        register_datasets_from_cfg(cfg)
        resolve_num_classes(cfg)
        cfg.freeze()
        check_num_classes(cfg, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        check_mask_annotations(cfg, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        if comm.is_main_process():
            for name in remove_leftover_temp_files(cfg.OUTPUT_DIR):
                logger.info(f"removed {name}, left in {cfg.OUTPUT_DIR} by an interrupted checkpoint save")
        self.deepkd = deepkd_enabled(cfg)

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader, self.train_sampler = self.build_resumable_train_loader(cfg)

        self.gsnr_hook = None
        amp = amp_dtype(cfg.SOLVER.AMP.DTYPE, "SOLVER.AMP.DTYPE") if cfg.SOLVER.AMP.ENABLED else None
        if self.deepkd:
            broadcast_initial_parameters(model)
            # fp16: one loss scale over the three components (deepkd_det/core/amp.py).
            scaler = ComponentGradScaler() if amp is torch.float16 else None
            # The trainer checks the losses itself (named, with the iteration) before the step.
            step = build_decoupled_step(cfg.DEEPKD, optimizer, check_finite=False, scaler=scaler)
            if cfg.DEEPKD.GSNR.ENABLED:
                named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                meter = build_gsnr_meter(cfg.DEEPKD, named, _iterations_per_epoch(cfg, self.train_sampler))
                self.gsnr_hook = GSNRHook(step, meter, cfg.OUTPUT_DIR)
            self._trainer = DecoupledStepTrainer(model, data_loader, optimizer, step, amp_dtype=amp)
        else:
            model = wrap_ddp(model)
            if amp is torch.float16:
                self._trainer = AMPTrainer(model, data_loader, optimizer)
            else:
                self._trainer = CheckedSimpleTrainer(model, data_loader, optimizer, amp_dtype=amp)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        checkpointables = {"trainer": weakref.proxy(self)}
        schedule = getattr(_unwrap(model), "topk_schedule", None)
        if schedule is not None:
            checkpointables["topk_schedule"] = schedule
        self.checkpointer = DeepKDCheckpointer(model, cfg.OUTPUT_DIR, **checkpointables)
        if getattr(_unwrap(model), "teacher", None) is not None and teacher_read_from_file(cfg):
            # The frozen teacher is read from its file at every start: checkpoints hold the student
            # (with its buffers) and the trainer state only.
            self.checkpointer.exclude_prefixes = (TEACHER_PREFIX,)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------ builders

    @classmethod
    def build_optimizer(cls, cfg, model):
        if deepkd_enabled(cfg):
            return build_deepkd_optimizer(cfg, model)
        return super().build_optimizer(cfg, model)

    @classmethod
    def build_resumable_train_loader(cls, cfg):
        """The training loader, and its sampler when it can be resumed mid-stream (else None)."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning(
                f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN}: --resume restarts its index stream"
            )
            return cls.build_train_loader(cfg), None
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        sampler = ResumableTrainingSampler(len(dataset))
        loader = build_detection_train_loader(cfg, dataset=dataset, sampler=sampler)
        if not isolate_loader_rng(loader, sampler.seed + comm.get_rank()):
            logger.warning("no torch DataLoader found in the training loader: --resume may not be bit-exact")
        return loader, sampler

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type != "coco":
            raise NotImplementedError(
                f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; DeepKDTrainer evaluates "
                "COCO-format datasets (override build_evaluator for others)"
            )
        tasks = ["bbox"]
        if cfg.MODEL.MASK_ON:
            tasks.append("segm")
        if cfg.MODEL.KEYPOINT_ON:
            tasks.append("keypoints")
        return COCOEvaluator(
            dataset_name,
            tasks=tuple(tasks),
            distributed=True,
            output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"),
            use_fast_impl=uses_fast_coco_eval(),
        )

    def build_hooks(self):
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as DefaultTrainer: PreciseBN's own loader, no workers
        ret = [
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            hooks.PreciseBN(
                cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(cfg), cfg.TEST.PRECISE_BN.NUM_ITER
            )
            if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model)
            else None,
            self.gsnr_hook,
        ]
        # On every rank, right before the checkpointer: gathers all ranks' RNG states into it.
        self.rng_hook = RNGStateHook(cfg.SOLVER.CHECKPOINT_PERIOD, self.train_sampler)
        ret.append(self.rng_hook)
        # Every rank (the weights are equal): a diverged model is never saved as a checkpoint.
        ret.append(FiniteWeightsCheck(cfg.SOLVER.CHECKPOINT_PERIOD, cfg.OUTPUT_DIR))
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))

        def test_and_save_results():
            # Evaluation must not move the training RNG streams (resume exactness).
            with preserve_rng_state():
                self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        ret.append(ParameterSyncCheck())  # every rank: the processes must end with equal weights
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=20))
        return ret

    def train(self):
        try:
            return super().train()
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc} {last_checkpoint_note(self.cfg.OUTPUT_DIR)}") from None

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test, with the datasets of cfg registered (and checked) first."""
        register_datasets_from_cfg(cfg)
        return super().test(cfg, model, evaluators)

    # ------------------------------------------------------------------ state

    def state_dict(self):
        ret = super().state_dict()
        # detectron2 v0.6's DefaultTrainer does not save the optimizer; this is the key later
        # versions use for it.
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        # TrainerBase's part (iteration, hooks) called directly: after v0.6, DefaultTrainer's
        # load_state_dict reads state_dict["_trainer"] unconditionally (a KeyError for a
        # checkpoint without it); v0.6 has no override. Same behaviour on both.
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("checkpoint has no optimizer state; momentum buffers start from zero")

    def resume_or_load(self, resume=True):
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        pending = self.rng_hook.take_pending()
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1
            if comm.is_main_process():
                # Rows a killed run wrote after its last checkpoint are written again from here.
                trim_metrics_after(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter)
            self._resume_data_position(pending)
            if pending is not None:
                self._restore_rank_rng(pending)

    def _resume_data_position(self, pending):
        if self.train_sampler is None:
            return
        seed = pending.get("sampler_seed") if pending else None
        per_rank_batch = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        self.train_sampler.set_position(
            self.train_sampler.seed if seed is None else seed, self.start_iter * per_rank_batch
        )
        # A fresh iterator, so that the sampler starts at the new position.
        inner = self._trainer
        if hasattr(inner, "_data_loader_iter_obj"):  # detectron2 > v0.6: created lazily
            inner._data_loader_iter_obj = None
            inner._data_loader_iter  # noqa: B018 - create it now, before the RNG is restored
        else:
            inner._data_loader_iter = iter(inner.data_loader)

    def _restore_rank_rng(self, pending):
        states = pending.get("per_rank", [])
        if len(states) == comm.get_world_size():
            restore_rng_state(states[comm.get_rank()])
        else:
            logger.warning(
                f"checkpoint holds RNG states of {len(states)} processes, this run has "
                f"{comm.get_world_size()}: random streams are not restored"
            )


def teacher_read_from_file(cfg) -> bool:
    """Whether the teacher is loaded from a file at build time (TEACHER.MODEL.WEIGHTS, or the
    teacher keys of MODEL.WEIGHTS, which the build requires unless TEACHER.ALLOW_RANDOM_INIT).
    A randomly initialised test teacher cannot be rebuilt: it stays in the checkpoints."""
    return bool(cfg.TEACHER.MODEL.WEIGHTS) or not cfg.TEACHER.ALLOW_RANDOM_INIT


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model
