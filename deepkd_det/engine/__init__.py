"""detectron2 training engine of DeepKD: the trainer, its decoupled step, atomic checkpoints."""

from .checkpoint import AtomicDetectionCheckpointer, AtomicSaveMixin, atomic_write, trainer_checkpointer_class
from .launch import init_torchrun_process_group, launch_main, started_by_torchrun
from .resume import (
    ResumableTrainingSampler,
    RNGStateHook,
    capture_rng_state,
    preserve_rng_state,
    restore_rng_state,
)
from .steps import CheckedSimpleTrainer, DecoupledStepTrainer, check_finite_losses, split_components
from .trainer import DeepKDTrainer, deepkd_enabled, uses_fast_coco_eval, wrap_ddp

__all__ = [
    "AtomicDetectionCheckpointer",
    "AtomicSaveMixin",
    "CheckedSimpleTrainer",
    "DecoupledStepTrainer",
    "DeepKDTrainer",
    "RNGStateHook",
    "ResumableTrainingSampler",
    "atomic_write",
    "capture_rng_state",
    "check_finite_losses",
    "deepkd_enabled",
    "init_torchrun_process_group",
    "launch_main",
    "preserve_rng_state",
    "restore_rng_state",
    "split_components",
    "started_by_torchrun",
    "trainer_checkpointer_class",
    "uses_fast_coco_eval",
    "wrap_ddp",
]
