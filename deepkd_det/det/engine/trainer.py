"""DeepKDTrainer: detectron2's DefaultTrainer with the DeepKD decoupled step.

With ``DEEPKD.ENABLED`` each iteration runs one forward and the decoupled step of
``deepkd_det.core`` (three gradient components, three momentum buffers); otherwise
detectron2's ordinary step (sum of the losses, torch SGD) — for plain Faster R-CNN
(``KD.TYPE NONE``, e.g. to train a teacher) and plain KD/DKD. Everything else is
DefaultTrainer's: param groups (norm / bias weight decay, bias lr factor), WarmupMultiStepLR,
periodic checkpoints and evaluation (COCOEvaluator), metrics.json, TensorBoard, console.

Additions: atomic checkpoints that hold the optimizer (all momentum buffers), scheduler, top-k
schedule, RNG and data-position state, a dense detector's loss normaliser (``dense_detectors``) and
TorchScript losses run unoptimised (``train``), so ``--resume`` continues as an uninterrupted run, but
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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from detectron2.data import MetadataCatalog, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, default_writers, hooks
from detectron2.engine.train_loop import AMPTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
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

from ..weights.checkpoint import DeepKDCheckpointer
from ..weights.layouts import TEACHER_PREFIX
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

__all__ = [
    "DeepKDEngine",
    "DeepKDTrainer",
    "dense_detectors",
    "EngineSettings",
    "coco_evaluator",
    "deepkd_enabled",
    "remove_interrupted_saves",
    "resumable_loader",
    "teacher_read_from_file",
    "uses_fast_coco_eval",
    "wrap_ddp",
]


def dense_detectors(model):
    """``(name, module)`` of the detectron2 dense detectors (RetinaNet, FCOS) in ``model``: the model
    itself, or the distillation wrapper's student. Their loss normaliser is an exponential moving
    average of the positive-anchor count held as a plain attribute (``loss_normalizer``), outside
    the state dict: the trainer's checkpoint state carries it, so that ``--resume`` continues with
    the value an uninterrupted run has."""
    model = getattr(model, "module", model)  # DDP
    found = [("model", model)] if isinstance(model, DenseDetector) else []
    student = getattr(model, "student", None)
    if isinstance(student, DenseDetector) and student is not model:
        found.append(("student", student))
    return found

logger = logging.getLogger(__name__)


def deepkd_enabled(cfg) -> bool:
    """Whether the decoupled DeepKD/DOT update runs (DEEPKD.ENABLED and DEEPKD.DECOUPLE)."""
    dk = cfg.get("DEEPKD")
    return bool(dk is not None and decoupled(dk))


def _iterations_per_epoch(settings, sampler) -> int:
    """One pass over the training images (DEEPKD.GSNR.PERIOD 0 measures once per epoch)."""
    size = getattr(sampler, "_size", None)
    if not size:
        return max(settings.max_iter // 10, 1)
    return max(-(-int(size) // settings.ims_per_batch), 1)


def uses_fast_coco_eval() -> bool:
    """detectron2's fast COCOeval is compiled C++; the pure-Python v0.6 install has a shim."""
    try:
        import detectron2._C as compiled
    except ImportError:
        return False
    return not getattr(compiled, "__deepkd_shim__", False)


def wrap_ddp(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """DistributedDataParallel with >1 process; ``device_ids=None`` on CPU (v0.6's
    ``create_ddp_model`` passes ``[local_rank]``, which fails for CPU modules). ``kwargs``:
    DistributedDataParallel's own (a LazyConfig's ``train.ddp``; broadcast_buffers False unless given)."""
    if comm.get_world_size() == 1:
        return model
    on_gpu = next(model.parameters()).device.type == "cuda"
    device_ids = [comm.get_local_rank()] if on_gpu else None
    kwargs.setdefault("broadcast_buffers", False)
    return DistributedDataParallel(model, device_ids=device_ids, **kwargs)


@dataclass(frozen=True)
class EngineSettings:
    """What the shared engine (:class:`DeepKDEngine`) reads, whichever config it came from:
    the yacs config of ``train_net.py`` (:meth:`from_yacs`) or a LazyConfig
    (``deepkd_det/det/lazy.py``)."""

    output_dir: str
    max_iter: int
    ims_per_batch: int  # all processes together (the data position of a resumed run)
    checkpoint_period: int
    eval_period: int
    deepkd: Any  # the DEEPKD node (core.settings): decoupled step, GSNR
    amp: Optional[torch.dtype] = None  # None: float32; fp16 (loss scale) or bf16 (autocast)
    init_weights: str = ""  # loaded when there is no checkpoint to resume from
    teacher_from_file: bool = True  # the frozen teacher is read from its file at every start
    log_period: int = 20
    max_to_keep: Optional[int] = None  # checkpoints kept by the PeriodicCheckpointer (None: all)
    ddp: Dict[str, Any] = field(default_factory=dict)  # extra DistributedDataParallel arguments

    @classmethod
    def from_yacs(cls, cfg) -> EngineSettings:
        return cls(
            output_dir=cfg.OUTPUT_DIR,
            max_iter=cfg.SOLVER.MAX_ITER,
            ims_per_batch=cfg.SOLVER.IMS_PER_BATCH,
            checkpoint_period=cfg.SOLVER.CHECKPOINT_PERIOD,
            eval_period=cfg.TEST.EVAL_PERIOD,
            deepkd=cfg.get("DEEPKD"),
            amp=amp_dtype(cfg.SOLVER.AMP.DTYPE, "SOLVER.AMP.DTYPE") if cfg.SOLVER.AMP.ENABLED else None,
            init_weights=cfg.MODEL.WEIGHTS,
            teacher_from_file=teacher_read_from_file(cfg),
        )


def remove_interrupted_saves(output_dir: str) -> None:
    """Temporary files of a checkpoint save that was killed, removed at start-up (main process)."""
    if comm.is_main_process():
        for name in remove_leftover_temp_files(output_dir):
            logger.info(f"removed {name}, left in {output_dir} by an interrupted checkpoint save")


class DeepKDEngine(DefaultTrainer):
    """The engine both entry points run (``train_net.py``: :class:`DeepKDTrainer`; the LazyConfig
    entry point: ``deepkd_det.det.engine.lazy.LazyDeepKDTrainer``): given a built model,
    optimizer, training loader and :class:`EngineSettings`, the step (decoupled DeepKD step, or
    detectron2's summed-loss step; AMP), the checkpointer and its teacher rule, the hooks
    (RNG state, finite weights, checkpoints, evaluation, parameter sync, writers) and the exact
    resume (data position, RNG). Subclasses build the parts from their config, call
    :meth:`setup_engine` and provide :meth:`evaluate_model`.
    """

    def setup_engine(self, settings: EngineSettings, model, optimizer, data_loader, train_sampler,
                     build_scheduler: Callable[[torch.optim.Optimizer], Any]) -> None:
        self.engine = settings
        self.train_sampler = train_sampler
        self.deepkd = bool(settings.deepkd is not None and decoupled(settings.deepkd))
        self.gsnr_hook = None
        amp = settings.amp
        if self.deepkd:
            broadcast_initial_parameters(model)
            # fp16: one loss scale over the three components (deepkd_det/core/amp.py).
            scaler = ComponentGradScaler() if amp is torch.float16 else None
            # The trainer checks the losses itself (named, with the iteration) before the step.
            step = build_decoupled_step(settings.deepkd, optimizer, check_finite=False, scaler=scaler)
            if settings.deepkd.GSNR.ENABLED:
                named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                per_epoch = _iterations_per_epoch(settings, train_sampler)
                meter = build_gsnr_meter(settings.deepkd, named, per_epoch)
                self.gsnr_hook = GSNRHook(step, meter, settings.output_dir)
            self._trainer = DecoupledStepTrainer(model, data_loader, optimizer, step, amp_dtype=amp)
        else:
            model = wrap_ddp(model, **settings.ddp)
            if amp is torch.float16:
                self._trainer = AMPTrainer(model, data_loader, optimizer)
            else:
                self._trainer = CheckedSimpleTrainer(model, data_loader, optimizer, amp_dtype=amp)

        self.scheduler = build_scheduler(optimizer)
        checkpointables = {"trainer": weakref.proxy(self)}
        schedule = getattr(_unwrap(model), "topk_schedule", None)
        if schedule is not None:
            checkpointables["topk_schedule"] = schedule
        self.checkpointer = DeepKDCheckpointer(model, settings.output_dir, **checkpointables)
        if getattr(_unwrap(model), "teacher", None) is not None and settings.teacher_from_file:
            # The frozen teacher is read from its file at every start: checkpoints hold the student
            # (with its buffers) and the trainer state only.
            self.checkpointer.exclude_prefixes = (TEACHER_PREFIX,)
        self.start_iter = 0
        self.max_iter = settings.max_iter
        self.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------ hooks

    def evaluate_model(self):
        """Evaluate ``self.model`` on the test datasets (the EvalHook's function)."""
        raise NotImplementedError

    def precise_bn_hook(self):
        """detectron2's PreciseBN hook, or None."""
        return None

    def build_hooks(self):
        settings = self.engine
        ret = [hooks.IterationTimer(), hooks.LRScheduler(), self.precise_bn_hook(), self.gsnr_hook]
        # On every rank, right before the checkpointer: gathers all ranks' RNG states into it.
        self.rng_hook = RNGStateHook(settings.checkpoint_period, self.train_sampler)
        ret.append(self.rng_hook)
        # Every rank (the weights are equal): a diverged model is never saved as a checkpoint.
        ret.append(FiniteWeightsCheck(settings.checkpoint_period, settings.output_dir))
        if comm.is_main_process():
            keep = {} if settings.max_to_keep is None else {"max_to_keep": settings.max_to_keep}
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, settings.checkpoint_period, **keep))

        def test_and_save_results():
            # Evaluation must not move the training RNG streams (resume exactness).
            with preserve_rng_state():
                self._last_eval_results = self.evaluate_model()
            return self._last_eval_results

        ret.append(hooks.EvalHook(settings.eval_period, test_and_save_results))
        ret.append(ParameterSyncCheck())  # every rank: the processes must end with equal weights
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=settings.log_period))
        return ret

    def build_writers(self):
        return default_writers(self.engine.output_dir, self.max_iter)

    def train(self):
        # TorchScript functions in the losses (detectron2's sigmoid_focal_loss_jit of RetinaNet /
        # FCOS) run unoptimised: the graph executor would switch to a fused graph after its first
        # profiling calls, whose backward rounds differently, so a resumed process (profiling
        # again from its first iteration) would not continue bit-exactly where an uninterrupted
        # run is already fused.
        try:
            with torch.jit.optimized_execution(False):
                return self.run_training()
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc} {last_checkpoint_note(self.engine.output_dir)}") from None

    def run_training(self):
        TrainerBase.train(self, self.start_iter, self.max_iter)
        return getattr(self, "_last_eval_results", None)

    # ------------------------------------------------------------------ state

    def state_dict(self):
        ret = TrainerBase.state_dict(self)
        # detectron2 v0.6's DefaultTrainer does not save the optimizer; this is the key later
        # versions use for it.
        ret["_trainer"] = self._trainer.state_dict()
        normalizers = {name: float(m.loss_normalizer) for name, m in dense_detectors(self._trainer.model)
                       if hasattr(m, "loss_normalizer")}
        if normalizers:
            ret["loss_normalizer"] = normalizers
        return ret

    def load_state_dict(self, state_dict):
        # TrainerBase's part (iteration, hooks) called directly: after v0.6, DefaultTrainer's
        # load_state_dict reads state_dict["_trainer"] unconditionally (a KeyError for a
        # checkpoint without it); v0.6 has no override. Same behaviour on both.
        TrainerBase.load_state_dict(self, state_dict)
        saved = state_dict.get("loss_normalizer", {})
        for name, m in dense_detectors(self._trainer.model):
            if name in saved:
                m.loss_normalizer = saved[name]
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("checkpoint has no optimizer state; momentum buffers start from zero")

    def resume_or_load(self, resume=True):
        self.checkpointer.resume_or_load(self.engine.init_weights, resume=resume)
        pending = self.rng_hook.take_pending()
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1
            if comm.is_main_process():
                # Rows a killed run wrote after its last checkpoint are written again from here.
                trim_metrics_after(os.path.join(self.engine.output_dir, "metrics.json"), self.start_iter)
            self._resume_data_position(pending)
            if pending is not None:
                self._restore_rank_rng(pending)

    def _resume_data_position(self, pending):
        if self.train_sampler is None:
            return
        seed = pending.get("sampler_seed") if pending else None
        per_rank_batch = self.engine.ims_per_batch // comm.get_world_size()
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


class DeepKDTrainer(DeepKDEngine):
    """DefaultTrainer whose step is DeepKD's decoupled step when DEEPKD.ENABLED (the engine of
    :class:`DeepKDEngine`, built from detectron2's yacs config).

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
        remove_interrupted_saves(cfg.OUTPUT_DIR)

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader, train_sampler = self.build_resumable_train_loader(cfg)
        self.cfg = cfg
        self.setup_engine(
            EngineSettings.from_yacs(cfg), model, optimizer, data_loader, train_sampler,
            lambda opt: self.build_lr_scheduler(cfg, opt),
        )

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
        return resumable_loader(lambda sampler: build_detection_train_loader(cfg, dataset=dataset, sampler=sampler),
                                len(dataset))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        tasks = ["bbox"]
        if cfg.MODEL.MASK_ON:
            tasks.append("segm")
        if cfg.MODEL.KEYPOINT_ON:
            tasks.append("keypoints")
        return coco_evaluator(dataset_name, tasks, output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))

    def precise_bn_hook(self):
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as DefaultTrainer: PreciseBN's own loader, no workers
        if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model):
            return hooks.PreciseBN(
                cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(cfg), cfg.TEST.PRECISE_BN.NUM_ITER
            )
        return None

    def evaluate_model(self):
        return self.test(self.cfg, self.model)

    def run_training(self):
        return DefaultTrainer.train(self)  # + detectron2's check of TEST.EXPECTED_RESULTS

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test, with the datasets of cfg registered (and checked) first."""
        register_datasets_from_cfg(cfg)
        return super().test(cfg, model, evaluators)


def resumable_loader(build: Callable[[ResumableTrainingSampler], Any], size: int):
    """``(loader, sampler)``: the training loader ``build(sampler)`` over a
    :class:`ResumableTrainingSampler` of ``size`` images, its torch DataLoaders given their own
    generators (so a resumed run's global RNG stream is not shifted)."""
    sampler = ResumableTrainingSampler(size)
    loader = build(sampler)
    if not isolate_loader_rng(loader, sampler.seed + comm.get_rank()):
        logger.warning("no torch DataLoader found in the training loader: --resume may not be bit-exact")
    return loader, sampler


def coco_evaluator(dataset_name: str, tasks, output_dir: str) -> COCOEvaluator:
    """detectron2's COCOEvaluator of ``tasks`` (distributed; the fast C++ COCOeval where it is
    compiled); a dataset of another evaluator_type is refused naming it."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if evaluator_type != "coco":
        raise NotImplementedError(
            f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; DeepKDTrainer evaluates "
            "COCO-format datasets (override build_evaluator for others)"
        )
    return COCOEvaluator(dataset_name, tasks=tuple(tasks), distributed=True, output_dir=output_dir,
                         use_fast_impl=uses_fast_coco_eval())


def teacher_read_from_file(cfg) -> bool:
    """Whether the teacher is loaded from a file at build time (TEACHER.MODEL.WEIGHTS, or the
    teacher keys of MODEL.WEIGHTS, which the build requires unless TEACHER.ALLOW_RANDOM_INIT).
    A randomly initialised test teacher cannot be rebuilt: it stays in the checkpoints."""
    return bool(cfg.TEACHER.MODEL.WEIGHTS) or not cfg.TEACHER.ALLOW_RANDOM_INIT


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model
