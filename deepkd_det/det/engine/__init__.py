"""detectron2 training engine of DeepKD: the trainer, its decoupled step, atomic checkpoints."""

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
    "CheckedSimpleTrainer",
    "DecoupledStepTrainer",
    "DeepKDTrainer",
    "RNGStateHook",
    "ResumableTrainingSampler",
    "capture_rng_state",
    "check_finite_losses",
    "deepkd_enabled",
    "init_torchrun_process_group",
    "launch_main",
    "preserve_rng_state",
    "restore_rng_state",
    "split_components",
    "started_by_torchrun",
    "uses_fast_coco_eval",
    "wrap_ddp",
]
