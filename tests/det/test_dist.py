"""Multi-process detection training on CPU: torchrun + gloo, with and without DeepKD."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from deepkd_det.core.dist import free_port
from deepkd_det.det.data import generate_shapes_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "DEEPKD" / "demo"
pytestmark = pytest.mark.dist


def _torchrun(config, out, shapes_root, *opts):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(REPO / "train_net.py"), "--config-file", str(config),
        "OUTPUT_DIR", str(out),
        "DATASETS.SHAPES.ROOT", shapes_root, "DATASETS.SHAPES.NUM_TRAIN", "8", "DATASETS.SHAPES.NUM_VAL", "2",
        "DATASETS.SHAPES.IMAGE_SIZE", "64", "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)", "SOLVER.CHECKPOINT_PERIOD", "100",
        "TEACHER.MODEL.WEIGHTS", "", "TEACHER.ALLOW_RANDOM_INIT", "True",
        *opts,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _rank_digests(out):
    digests = {}
    for rank, name in ((0, "log.txt"), (1, "log.txt.rank1")):
        text = (out / name).read_text()
        assert "World size: 2" in text
        found = re.findall(r"parameters identical on all 2 processes \(sha256 ([0-9a-f]{64})\)", text)
        assert len(found) == 1, f"rank {rank}: no parameter digest in {name}"
        digests[rank] = found[0]
    return digests


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    generate_shapes_dataset(root, num_train=8, num_val=2, image_size=64, seed=0)
    return root


def _check_run(out, deepkd):
    digests = _rank_digests(out)
    assert digests[0] == digests[1]
    with open(out / "metrics.json") as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    assert last["iteration"] == 2
    if deepkd:
        assert "loss_tckd" in last and "loss_nckd" in last and "kd/topk_k" in last


def test_two_processes_train_and_agree(tmp_path, shapes_root):
    # teacher.yaml: DDP on CPU (device_ids=None). Each rank starts from its own seed (SEED + rank),
    # so equal final weights need the initial broadcast and the gradient averaging to work.
    out = tmp_path / "dist"
    _torchrun(DEMO / "teacher.yaml", out, shapes_root)
    _check_run(out, deepkd=False)


def test_deepkd_update_and_component_modes_agree(tmp_path, shapes_root):
    # DeepKD: no DDP wrapper. DEEPKD.DIST_MODE update (the default: each rank folds its own
    # gradients, one all-reduce of the update per step) and components (one all-reduce per
    # component) give the same weights and, averaged over the ranks at the checkpoint, the same
    # momentum buffers.
    final = {}
    for mode in ("update", "components"):
        out = tmp_path / mode
        _torchrun(DEMO / "student-deepkd-dkd.yaml", out, shapes_root, "DEEPKD.DIST_MODE", mode)
        _check_run(out, deepkd=True)
        final[mode] = torch.load(out / "model_final.pth", weights_only=False)
    a, b = final["update"], final["components"]
    for key, value in a["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, b["model"][key], rtol=1e-4, atol=1e-6, msg=key)
    opt_a, opt_b = (x["trainer"]["_trainer"]["optimizer"]["state"] for x in (a, b))
    assert opt_a and set(opt_a) == set(opt_b)
    for k, state in opt_a.items():
        assert set(state) == set(opt_b[k])
        for key, value in state.items():
            if key.startswith("scaled_buffer_"):  # the true buffer m_c = stored / its scale (core/optim)
                scale = key[len("scaled_buffer_"):] + "_scale"
                torch.testing.assert_close(value / state[scale], opt_b[k][key] / opt_b[k][scale], rtol=1e-4,
                                           atol=1e-6, msg=key)


def test_cpu_multi_process_without_torchrun_points_to_it(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA, detectron2's launcher is the right path")
    from detectron2.engine import default_argument_parser

    import train_net
    from deepkd_det.det.engine.launch import launch_main

    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    args = default_argument_parser().parse_args(["--num-gpus", "2"])
    with pytest.raises(SystemExit, match="torch.distributed.run --nproc_per_node 2"):
        launch_main(train_net.main, args)
