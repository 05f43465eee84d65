"""Starting one or several training processes: detectron2's ``launch`` or ``torchrun``.

detectron2's ``launch`` spawns one process per GPU, and v0.6's asserts CUDA. On CPU (or
whenever the processes are started by ``torchrun``), the environment already names the rank
and world size: the process group is initialised here (gloo on CPU, nccl with GPUs) together
with detectron2's per-machine process group, and ``main`` runs in the current process.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from detectron2.utils import comm

from deepkd_det.core.dist import init_distributed

__all__ = [
    "USER_ERRORS",
    "init_torchrun_process_group",
    "launch_main",
    "parse_entry_args",
    "run_entry_point",
    "started_by_torchrun",
]

# A user's mistake (a key, a file, a diverged run): one line, exit 1 (deepkd_det/cli.py).
USER_ERRORS = (ValueError, KeyError, OSError, FloatingPointError)

logger = logging.getLogger(__name__)

_TORCHRUN_HINT = (
    "detectron2's launcher needs one CUDA GPU per process. On CPU start the processes with torchrun, "
    "e.g.  python -m torch.distributed.run --nproc_per_node {n} train_net.py --config-file ... "
    "(gloo backend; --num-gpus is then ignored)"
)


def started_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def _set_local_process_group(local_world_size: int) -> None:
    """detectron2's per-machine group (for get_local_rank / get_local_size)."""
    if hasattr(comm, "create_local_process_group"):  # detectron2 after v0.6
        comm.create_local_process_group(local_world_size)
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % local_world_size != 0:
        raise ValueError(f"world size {world} is not a multiple of the local world size {local_world_size}")
    for machine in range(world // local_world_size):
        ranks = list(range(machine * local_world_size, (machine + 1) * local_world_size))
        group = dist.new_group(ranks)  # every rank must create every group
        if rank in ranks:
            comm._LOCAL_PROCESS_GROUP = group


def init_torchrun_process_group(timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from torchrun's environment (no-op if already done), with
    detectron2's per-machine process group."""
    if dist.is_available() and dist.is_initialized():
        return
    init_distributed("auto", timeout_minutes=timeout_minutes)
    if not dist.is_initialized():  # torchrun with a single process
        return
    _set_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    comm.synchronize()


def launch_main(main_func, args):
    """Run ``main_func(args)`` under torchrun's process group, or through detectron2's launch."""
    if started_by_torchrun():
        init_torchrun_process_group()
        if getattr(args, "num_gpus", 1) > 1:
            logger.warning("started by torchrun: --num-gpus is ignored (torchrun's --nproc_per_node decides)")
        try:
            return main_func(args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    from detectron2.engine import launch

    if args.num_gpus > 1 and not torch.cuda.is_available():
        raise SystemExit(_TORCHRUN_HINT.format(n=args.num_gpus))
    return launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


def parse_entry_args(argv=None):
    """detectron2's command line (``default_argument_parser``) plus ``--debug``."""
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser()
    parser.add_argument("--debug", action="store_true", help="full tracebacks of errors (also DEEPKD_DEBUG=1)")
    return parser.parse_args(argv)


def run_entry_point(main_func, name: str, argv=None) -> int:
    """What ``train_net.py`` and ``tools/lazy_train_net.py`` do from their command line: parse it,
    run ``main_func`` on one or more processes (``launch_main``), and turn a user's mistake into
    one line naming it (``--debug``: the traceback). Returns the exit status."""
    import sys

    from deepkd_det.cli import OneLineErrors, debug_requested, run_cli

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_entry_args(argv)
    debug = args.debug or debug_requested(argv)
    if not debug:
        logging.getLogger("detectron2.engine.train_loop").addFilter(OneLineErrors(USER_ERRORS))
    print("Command Line Args:", args)
    return run_cli(lambda: launch_main(main_func, args), name, USER_ERRORS, debug=debug)
