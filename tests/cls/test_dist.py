"""Two-process classification training (gloo on CPU): the workers agree and the model learns."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepkd_det.core.dist import free_port

MODES = {
    "deepkd_dkd": dict(DISTILLER__TYPE="DKD", DEEPKD__ENABLED=True),  # DEEPKD.DIST_MODE update (the default)
    "deepkd_dkd_components": dict(DISTILLER__TYPE="DKD", DEEPKD__ENABLED=True, DEEPKD__DIST_MODE="components"),
    "kd": dict(DISTILLER__TYPE="KD"),
}


def _worker(rank, world, port, root, cfgs):
    from deepkd_det.cls.engine import ClsTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for mode, cfg in cfgs.items():
            trainer = ClsTrainer(cfg)
            assert trainer.dist.world == world and trainer.dist.rank == rank
            assert len(trainer.train_loader) == 8  # 256 images, 16 per worker and step
            summary = trainer.train()
            torch.save({"model": trainer.student.state_dict(), "summary": summary},
                       os.path.join(root, f"{mode}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
def test_two_workers_agree_and_learn(tmp_path, tiny_cfg, teacher_ckpt):
    from deepkd_det.cls.config import load_cfg
    from deepkd_det.cls.data import build_datasets, build_loaders
    from deepkd_det.cls.engine import evaluate
    from deepkd_det.cls.models import build_model

    cfgs = {mode: tiny_cfg(os.path.join(tmp_path, mode), DISTILLER__TEACHER="resnet8", TEACHER__CKPT=teacher_ckpt,
                           SOLVER__EPOCHS=4, SOLVER__LR=0.02, SOLVER__LR_DECAY_STAGES=[3], **opts)
            for mode, opts in MODES.items()}
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), cfgs), nprocs=2, join=True)

    for mode in MODES:
        r0 = torch.load(tmp_path / f"{mode}_rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{mode}_rank1.pt", weights_only=True)
        for key, value in r0["model"].items():
            assert torch.equal(value, r1["model"][key]), (mode, key)
        assert r0["summary"] == r1["summary"]
        assert r0["summary"]["last_top1"] > 35.0, (mode, r0["summary"])
        # The sharded evaluation (each worker half the images, counts summed) equals a
        # single-process evaluation of the same weights on the whole validation set.
        cfg = load_cfg(str(tmp_path / mode / "config.yaml"))
        train_set, val_set, num_classes = build_datasets(cfg)
        _, val_loader = build_loaders(cfg, train_set, val_set)
        model = build_model(cfg.DISTILLER.STUDENT, num_classes)
        model.load_state_dict(r0["model"])
        single = evaluate(model, val_loader, torch.device("cpu"))
        assert single["top1"] == pytest.approx(r0["summary"]["last_top1"])
        # rank 0 alone wrote the outputs
        log = (tmp_path / mode / "worklog.txt").read_text()
        assert log.count("start ") == 1 and "2 worker(s)" in log
        saved = torch.load(tmp_path / mode / "latest.pth", weights_only=True)
        assert saved["world_size"] == 2 and len(saved["rng"]) == 2
        for key, value in saved["model"].items():
            assert torch.equal(value, r0["model"][key])
    # One all-reduce of the update per step (update) or one per component (components): the same training.
    update = torch.load(tmp_path / "deepkd_dkd_rank0.pt", weights_only=True)["model"]
    components = torch.load(tmp_path / "deepkd_dkd_components_rank0.pt", weights_only=True)["model"]
    for key, value in update.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, components[key], rtol=1e-4, atol=1e-5, msg=key)
