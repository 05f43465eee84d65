"""The detection engine through train_net.py's code paths, on generated shapes (64 px, CPU)."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.engine import HookBase, default_argument_parser  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
import train_net  # noqa: E402
from deepkd_det.det.data import generate_shapes_dataset, shapes_split_paths  # noqa: E402
from deepkd_det.det.engine import DeepKDTrainer  # noqa: E402
from deepkd_det.det.weights import checkpoint as ckpt_module  # noqa: E402
from deepkd_det.det.weights.checkpoint import DeepKDCheckpointer  # noqa: E402
from tests.det.tiny import get_tiny_cfg  # noqa: E402

DEMO = REPO / "configs" / "DEEPKD" / "demo"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    # The settings _args puts in DATASETS.SHAPES (seed 0 from the demo base config).
    generate_shapes_dataset(root, num_train=8, num_val=2, image_size=64, seed=0)
    return root


def _args(config, out, shapes_root, *opts, resume=False, eval_only=False):
    argv = ["--config-file", str(config)]
    if resume:
        argv.append("--resume")
    if eval_only:
        argv.append("--eval-only")
    tiny = [
        "OUTPUT_DIR", str(out),
        "DATASETS.SHAPES.ROOT", shapes_root, "DATASETS.SHAPES.NUM_TRAIN", "8", "DATASETS.SHAPES.NUM_VAL", "2",
        "DATASETS.SHAPES.IMAGE_SIZE", "64",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "(3,)", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100",
        "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
        "TEACHER.MODEL.WEIGHTS", "", "TEACHER.ALLOW_RANDOM_INIT", "True",
    ]
    return default_argument_parser().parse_args(argv + tiny + [str(o) for o in opts])


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _trainer(args):
    cfg = train_net.setup(args)
    trainer = DeepKDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer


def test_deepkd_iterations_log_components_and_k(tmp_path, shapes_root):
    out = tmp_path / "run"
    gsnr = ["DEEPKD.GSNR.ENABLED", "True", "DEEPKD.GSNR.PERIOD", "2", "DEEPKD.GSNR.WINDOW", "2"]
    trainer = _trainer(_args(DEMO / "student-deepkd-dkd.yaml", out, shapes_root, *gsnr))
    teacher_before = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    trainer.train()

    last = _metrics(out)[-1]
    assert last["iteration"] == 3
    for key in ("loss_tckd", "loss_nckd", "loss_cls", "loss_rpn_cls", "total_loss"):
        assert math.isfinite(last[key]), key
    # K follows DEEPKD.TOPK (linear 2 -> 3 over the first 60%): at iteration 3 of 4, progress 0.75.
    assert last["kd/topk_k"] == trainer.model.topk_schedule.k_at(3 / 4) == 3
    # Three buffers per trained parameter, none for the frozen teacher; the teacher did not move.
    opt = trainer.optimizer
    assert type(opt).__name__ == "DeepKDOptimizer"
    trained = [p for g in opt.param_groups for p in g["params"]]
    teacher_ids = {id(p) for p in trainer.model.teacher.parameters()}
    assert trained and not teacher_ids & {id(p) for p in trained}
    head = trainer.model.roi_heads.box_predictor.cls_score.weight
    assert {"scaled_buffer_tog", "scaled_buffer_tcg", "scaled_buffer_ncg"} <= set(opt.state[head])
    for k, v in trainer.model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    moved = [k for k, v in trainer.model.backbone.state_dict().items() if not torch.equal(v, student_before[k])]
    assert moved, "the student did not train"
    # The final checkpoint is weights-only loadable and holds the buffers and the schedule.
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["topk_schedule"]["mode"] == "linear"
    states = final["trainer"]["_trainer"]["optimizer"]["state"]
    assert any("scaled_buffer_ncg" in s for s in states.values())
    # GSNR windows of 2 iterations every 2: reported at iterations 1 and 3 (metrics.json, written
    # every 20 iterations, keeps the latest; gsnr_per_layer.jsonl every window).
    for key in ("gsnr/tog", "gsnr/tcg", "gsnr/ncg", "bsnr/tog", "bsnr/tcg", "bsnr/ncg"):
        assert math.isfinite(last[key]) and last[key] > 0, key
    with open(out / "gsnr_per_layer.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["iter"] for r in rows] == [1, 3] and rows[1]["gsnr/ncg"] == last["gsnr/ncg"]
    layers = [r["per_layer"] for r in rows]
    # The distillation terms live on the box head logits: they never reach the RPN head.
    rpn = "proposal_generator.rpn_head.conv.weight"
    assert rpn in layers[0]["gsnr/tog"] and rpn not in layers[0]["gsnr/tcg"] and rpn not in layers[0]["gsnr/ncg"]
    assert "roi_heads.box_predictor.cls_score.weight" in layers[0]["gsnr/tcg"]


def test_dot_optimizer_trains_the_detector_with_two_buffers(tmp_path, shapes_root):
    out = tmp_path / "dot"
    dot = ["DEEPKD.OPTIMIZER", "dot", "DEEPKD.DOT_DELTA", "0.05", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)"]
    trainer = _trainer(_args(DEMO / "student-deepkd-dkd.yaml", out, shapes_root, *dot))
    head = trainer.model.roi_heads.box_predictor.cls_score.weight
    rpn = trainer.model.proposal_generator.rpn_head.conv.weight
    head_before = head.detach().clone()
    trainer.train()
    opt = trainer.optimizer
    assert type(opt).__name__ == "DOTOptimizer"
    mu = trainer.cfg.SOLVER.MOMENTUM
    assert opt._momenta(opt.param_groups[0]) == pytest.approx({"task": mu - 0.05, "kd": mu + 0.05})
    # TCKD + NCKD share the distillation buffer; it exists only where the KD terms reach.
    assert {"scaled_buffer_task", "scaled_buffer_kd"} <= set(opt.state[head])
    assert "scaled_buffer_kd" not in opt.state[rpn] and "scaled_buffer_task" in opt.state[rpn]
    assert not torch.equal(head.detach(), head_before)
    assert math.isfinite(_metrics(out)[-1]["loss_tckd"])


def test_deepkd_param_groups_are_detectron2s():
    cfg = get_tiny_cfg(kd_type="DKD", deepkd=True)
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.BIAS_LR_FACTOR = 2.0
    cfg.SOLVER.WEIGHT_DECAY_BIAS = 0.0
    model = DeepKDTrainer.build_model(cfg)
    ours = DeepKDTrainer.build_optimizer(cfg, model)
    plain = build_optimizer(cfg, model)

    def groups(opt):
        return sorted(
            (tuple(sorted(id(p) for p in g["params"])), g["lr"], g["weight_decay"]) for g in opt.param_groups
        )

    assert groups(ours) == groups(plain)
    assert {g["lr"] for g in ours.param_groups} == {0.01, 0.02}
    assert {g["weight_decay"] for g in ours.param_groups} == {0.0, cfg.SOLVER.WEIGHT_DECAY}


class _Crash(HookBase):
    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            raise KeyboardInterrupt(f"simulated kill at iteration {self.at}")


@pytest.mark.parametrize("config", ["student-deepkd-dkd.yaml", "teacher.yaml"])
def test_resume_continues_exactly(tmp_path, shapes_root, config):
    opts = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.STEPS", "(4,)"]
    # Evaluation in the middle must not disturb the random streams of training.
    opts += ["DATASETS.TEST", "('deepkd_shapes_val',)", "TEST.EVAL_PERIOD", "3"]
    whole = tmp_path / "whole"
    _trainer(_args(DEMO / config, whole, shapes_root, *opts)).train()

    parts = tmp_path / "parts"
    first = _trainer(_args(DEMO / config, parts, shapes_root, *opts))
    first.register_hooks([_Crash(4)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (parts / "last_checkpoint").read_text() == "model_0000002.pth"
    resumed = _trainer(_args(DEMO / config, parts, shapes_root, *opts, resume=True))
    assert resumed.start_iter == 3
    resumed.train()

    a = torch.load(whole / "model_final.pth", weights_only=True)
    b = torch.load(parts / "model_final.pth", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a = a["trainer"]["_trainer"]["optimizer"]
    opt_b = b["trainer"]["_trainer"]["optimizer"]
    for idx, state in opt_a["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt_b["state"][idx][name]), (idx, name)
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    # ... and it did not just reproduce an untrained model: the weights moved from iteration 2.
    mid = torch.load(parts / "model_0000002.pth", weights_only=True)
    assert any(not torch.equal(mid["model"][k], b["model"][k]) for k in b["model"])


@pytest.mark.parametrize("config,bad", [("student-deepkd-dkd.yaml", "loss_nckd"), ("teacher.yaml", "loss_cls")])
def test_non_finite_loss_is_named_and_nothing_is_corrupted(tmp_path, shapes_root, config, bad):
    out = tmp_path / "nan"
    trainer = _trainer(_args(DEMO / config, out, shapes_root, "SOLVER.CHECKPOINT_PERIOD", "2"))
    model = trainer.model
    forward = model.forward

    def poisoned(batched_inputs):
        losses = forward(batched_inputs)
        if model.training and trainer.iter == 2:
            losses[bad] = losses[bad] * float("nan")
        return losses

    model.forward = poisoned
    with pytest.raises(FloatingPointError, match=rf"iteration 2.*{bad}=nan"):
        trainer.train()
    # The checkpoint of iteration 1 is intact and equals the model: the NaN step updated nothing.
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    saved = torch.load(out / "model_0000001.pth", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        if k.startswith("teacher.") or "running_" in k or "num_batches" in k:
            continue  # BN statistics moved in the forward pass that produced the NaN
        assert torch.equal(v, saved[k]), k
    assert _metrics(out)  # metrics.json is intact JSON


def test_eval_only_reports_bbox_ap(tmp_path, shapes_root, capsys):
    out = tmp_path / "train"
    train_net.main(_args(DEMO / "teacher.yaml", out, shapes_root, "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)"))
    weights = out / "model_final.pth"
    results = train_net.main(
        _args(
            DEMO / "student-deepkd-dkd.yaml", tmp_path / "eval", shapes_root,
            "MODEL.WEIGHTS", weights, "DATASETS.TEST", "('deepkd_shapes_val',)",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", eval_only=True,
        )
    )
    ap = results["bbox"]["AP"]
    assert math.isfinite(ap) and 0.0 <= ap <= 100.0
    assert f"bbox AP {ap:.2f}" in capsys.readouterr().out
    assert (tmp_path / "eval" / "inference" / "coco_instances_results.json").exists()


def test_custom_dataset_trains_from_register_key(tmp_path, shapes_root):
    json_file, image_dir = shapes_split_paths(shapes_root, "train")
    out = tmp_path / "custom"
    train_net.main(
        _args(
            DEMO / "teacher.yaml", out, shapes_root,
            "DATASETS.REGISTER", f"[['my_shapes', '{json_file}', '{image_dir}']]",
            "DATASETS.TRAIN", "('my_shapes',)", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)",
        )
    )
    assert _metrics(out)[-1]["iteration"] == 1


def test_missing_dataset_fails_before_training(tmp_path, shapes_root):
    args = _args(
        DEMO / "teacher.yaml", tmp_path / "x", shapes_root,
        "DATASETS.REGISTER", f"[['lost', '{tmp_path / 'lost.json'}', '{tmp_path}']]", "DATASETS.TRAIN", "('lost',)",
    )
    with pytest.raises(FileNotFoundError, match=r"'lost'.*lost\.json.*does not exist"):
        train_net.main(args)
    assert not glob.glob(str(tmp_path / "x" / "*.pth"))


def test_atomic_checkpoint_survives_a_crash_during_save(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    ckpt = DeepKDCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_a")
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    real_save = torch.save

    def crash_midway(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)  # half a file on disk, then the process "dies"
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt_module.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_b")  # a new file
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_a")  # overwriting the tagged file
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)

    assert (tmp_path / "last_checkpoint").read_text() == "model_a.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_a.pth"]  # no half file, no temp file
    fresh = torch.nn.Linear(3, 2)
    DeepKDCheckpointer(fresh, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good[k])


def test_untrusted_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Crash(1)}, path)  # a Python object inside
    with pytest.raises(RuntimeError, match="weights_only"):
        DeepKDCheckpointer(torch.nn.Linear(1, 1), save_dir=str(tmp_path)).load(str(path))


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "DEEPKD" / "**" / "*.yaml"), recursive=True)))
def test_configs_merge_and_validate(path):
    args = default_argument_parser().parse_args(["--config-file", path])
    from detectron2.config import get_cfg

    from deepkd_det.det.config import add_deepkd_config, merge_config_file, validate_deepkd_config
    from deepkd_det.det.data import add_data_config

    cfg = add_data_config(add_deepkd_config(get_cfg()))
    merge_config_file(cfg, args.config_file)  # as train_net.py merges (relative TEACHER.CONFIG_FILE)
    validate_deepkd_config(cfg)
    if "demo" not in path and os.path.basename(path).startswith(("DKD-", "KD-")):  # the paper settings
        assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (16, 0.02, 90000)
        assert tuple(cfg.SOLVER.STEPS) == (60000, 80000)
        assert (cfg.KD.ALPHA, cfg.KD.BETA, cfg.KD.TEMPERATURE) == (1.0, 0.25, 1.0)
        from deepkd_det.det.config import resolve_teacher_cfg

        assert resolve_teacher_cfg(cfg).MODEL.RESNETS.DEPTH == (50 if "MV2" in path else 101)


def _post_v06_trainer_state(monkeypatch):
    """DefaultTrainer's state_dict / load_state_dict as detectron2 main has them
    (detectron2/engine/defaults.py after v0.6; v0.6 has neither): written out again here."""
    from detectron2.engine import DefaultTrainer
    from detectron2.engine.train_loop import TrainerBase

    def state_dict(self):
        ret = TrainerBase.state_dict(self)
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)
        self._trainer.load_state_dict(state_dict["_trainer"])  # unconditional, as there

    monkeypatch.setattr(DefaultTrainer, "state_dict", state_dict, raising=False)
    monkeypatch.setattr(DefaultTrainer, "load_state_dict", load_state_dict, raising=False)


@pytest.mark.parametrize("post_v06", [False, True], ids=["v0.6", "main"])
def test_resume_through_current_detectron2s_calls(tmp_path, shapes_root, monkeypatch, post_v06):
    if post_v06:
        _post_v06_trainer_state(monkeypatch)
    out = tmp_path / "run"
    opts = ("SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.CHECKPOINT_PERIOD", "1")
    _trainer(_args(DEMO / "student-deepkd-dkd.yaml", out, shapes_root, *opts)).train()
    saved = torch.load(out / "model_0000000.pth", weights_only=True)
    assert saved["trainer"]["_trainer"]["optimizer"]["state"]  # the momentum buffers are in the file

    resumed = _trainer(_args(DEMO / "student-deepkd-dkd.yaml", out, shapes_root, *opts, resume=True))
    assert resumed.start_iter == 2
    live = resumed._trainer.state_dict()["optimizer"]["state"]
    final = torch.load(out / "model_final.pth", weights_only=True)["trainer"]["_trainer"]["optimizer"]["state"]
    assert live.keys() == final.keys()
    for i in live:
        for name, v in live[i].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, final[i][name]), (i, name)

    # A checkpoint without "_trainer" (no optimizer state): the intended warning, not a KeyError.
    saved["trainer"].pop("_trainer")
    torch.save(saved, out / "model_0000000.pth")
    (out / "last_checkpoint").write_text("model_0000000.pth")
    from deepkd_det.det.engine import trainer as trainer_module

    warned = []
    monkeypatch.setattr(trainer_module.logger, "warning", lambda msg, *a: warned.append(msg % a if a else msg))
    again = _trainer(_args(DEMO / "student-deepkd-dkd.yaml", out, shapes_root, *opts, resume=True))
    assert again.start_iter == 1
    assert any("checkpoint has no optimizer state" in w for w in warned)
