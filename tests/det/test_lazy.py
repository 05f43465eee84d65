"""The LazyConfig entry point (tools/lazy_train_net.py): the DEEPKD node of the yacs config in
LazyConfig form, its start-up refusals, and train_net.py's engine (same weights, exact resume)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.engine import HookBase, default_argument_parser  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import train_net  # noqa: E402
from deepkd_det.core.settings import DEEPKD_DEFAULTS, deepkd_settings_dict  # noqa: E402
from deepkd_det.det.config import get_deepkd_cfg  # noqa: E402
from deepkd_det.det.data import generate_shapes_dataset  # noqa: E402
from deepkd_det.det.engine import DeepKDTrainer  # noqa: E402
from deepkd_det.det.engine.lazy import LazyDeepKDTrainer  # noqa: E402
from deepkd_det.det.lazy import load_lazy_config, validate_lazy_config  # noqa: E402
from tests.test_deepkd_schema import BAD  # noqa: E402
from tests.toolload import load_tool  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
YACS_DEMO = REPO / "configs" / "DEEPKD" / "demo"
LAZY_DEMO = REPO / "configs" / "DEEPKD" / "lazy" / "demo"
DKD = "student_deepkd_dkd.py"
RANDOM_TEACHER_YACS = ("TEACHER.MODEL.WEIGHTS", "", "TEACHER.ALLOW_RANDOM_INIT", "True")
RANDOM_TEACHER_LAZY = ("model.teacher.weights=", "model.teacher.allow_random_init=true")


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    generate_shapes_dataset(root, num_train=8, num_val=2, image_size=64, seed=0)
    return root


def _yacs_args(config, out, shapes_root, *opts, resume=False):
    tiny = [
        "OUTPUT_DIR", str(out),
        "DATASETS.SHAPES.ROOT", shapes_root, "DATASETS.SHAPES.NUM_TRAIN", "8", "DATASETS.SHAPES.NUM_VAL", "2",
        "DATASETS.SHAPES.IMAGE_SIZE", "64",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "(3,)", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100",
        "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
    ]
    argv = ["--config-file", str(config)] + (["--resume"] if resume else [])
    return default_argument_parser().parse_args(argv + tiny + [str(o) for o in opts])


def _lazy_argv(config, out, shapes_root, *opts):
    """The same tiny run as _yacs_args, in LazyConfig overrides."""
    tiny = [
        f"train.output_dir={out}",
        f"datasets.SHAPES.ROOT={shapes_root}", "datasets.SHAPES.NUM_TRAIN=8", "datasets.SHAPES.NUM_VAL=2",
        "datasets.SHAPES.IMAGE_SIZE=64",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.train.mapper.augmentations.0.max_size=64",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=64",
        "dataloader.train.total_batch_size=2", "optimizer.lr=0.01",
        "lr_multiplier.warmup_iters=0", "lr_multiplier.steps=[3]", "train.max_iter=4",
        "train.checkpointer.period=100", "train.eval_period=0", "dataloader.evaluator=null",
    ]
    return ["--config-file", str(config)] + tiny + [str(o) for o in opts]


def _lazy_trainer(argv):
    tool = load_tool("lazy_train_net")
    args = tool.parse_args(argv)
    cfg, deepkd, settings = tool.setup(args)
    trainer = LazyDeepKDTrainer(cfg, deepkd, settings)
    trainer.resume_or_load(resume=args.resume)
    return trainer


def _final(out):
    return torch.load(Path(out) / "model_final.pth", weights_only=True)


def _max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


# ---------------------------------------------------------------- the DEEPKD node


def test_lazy_deepkd_node_has_the_yacs_nodes_keys_and_defaults():
    lazy = OmegaConf.create(deepkd_settings_dict())  # what LazyConfig.load makes of `deepkd = ...`
    assert _flat(OmegaConf.to_container(lazy)) == _flat(get_deepkd_cfg().DEEPKD) == _flat(DEEPKD_DEFAULTS)
    # The demo config's node, loaded by detectron2's LazyConfig, read back as the yacs node.
    cfg = load_lazy_config(str(LAZY_DEMO / "shapes.py"))
    deepkd, _ = validate_lazy_config(cfg, "shapes.py")
    assert _flat(deepkd) == _flat(get_deepkd_cfg().DEEPKD)
    # An override reaches the node with the yacs type (int K, float delta).
    cfg = load_lazy_config(str(LAZY_DEMO / "shapes.py"), ["deepkd.TOPK.K_START=2", "deepkd.DELTA_NCG=0.025"])
    deepkd, _ = validate_lazy_config(cfg, "shapes.py")
    assert deepkd.TOPK.K_START == 2 and deepkd.DELTA_NCG == 0.025


def _lazy_override(key, value):
    if isinstance(value, str):
        return f"deepkd.{key}={value}"
    return f"deepkd.{key}={value!r}".replace("(", "[").replace(")", "]")


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_lazy_node_refuses_what_the_yacs_node_refuses_with_the_same_message(overrides, message):
    opts = ["optimizer.momentum=0.9", "model.roi_heads.num_classes=9", "deepkd.ENABLED=true"]
    opts += [_lazy_override(k, v) for k, v in overrides.items()]
    cfg = load_lazy_config(str(LAZY_DEMO / "shapes.py"), opts)
    with pytest.raises(ValueError) as info:
        validate_lazy_config(cfg, "shapes.py")
    lazy_message = message.replace("DEEPKD.", "deepkd.").replace("SOLVER.MOMENTUM", "optimizer.momentum")
    assert lazy_message in str(info.value)


# ---------------------------------------------------------------- start-up refusals: one line


def _cli_error(capsys, argv):
    tool = load_tool("lazy_train_net")
    assert tool.cli(argv) == 1
    err = capsys.readouterr().err
    # (torch may log a line of its own about CUDA at the first model build in a process, and a
    # logger an earlier test bound to its captured stream reports that stream closed.)
    ours = [line for line in err.splitlines() if line.startswith("lazy_train_net.py: error: ")]
    assert len(ours) == 1, err
    message = ours[0][len("lazy_train_net.py: error: "):].split("  (full traceback")[0]
    assert err.count(message) == 1, err  # a traceback would repeat it as "SomeError: <message>"
    return ours[0]


@pytest.mark.parametrize("config,opts,named", [
    ("shapes.py", ["deepkd.TOPK.K_STRAT=3"],
     "unknown config key deepkd.TOPK.K_STRAT (did you mean deepkd.TOPK.K_START?)"),
    (DKD, ["deepkd.DELTA_TOG=0.2"],
     "TOG momentum optimizer.momentum + deepkd.DELTA_TOG = 0.8 + 0.2 = 1 is outside [0, 1)"),
    (DKD, ["optimizer.momentum=0.95", "deepkd.DELTA_TCG=-0.96"],
     "TCG momentum optimizer.momentum + deepkd.DELTA_TCG = 0.95 + -0.96 = -0.01 is outside [0, 1)"),
    (DKD, ["model.teacher.weights=/nonexistent/teacher.pth"],
     "model.teacher.weights '/nonexistent/teacher.pth' does not exist"),
    (DKD, ["model.max_iter=1"], "model.max_iter is 1 but train.max_iter is 4"),
    (DKD, ["model.parts.0.name=logitz"], "model.parts[0]: unknown part 'logitz'"),
    (DKD, ["model.parts.0.ALPHAA=2.0"], "model.parts[0] (logits): unknown config key ALPHAA (did you mean ALPHA?)"),
    (DKD, ["model.parts.0.TYPE=NONE"], "model.parts: DEEPKD.ENABLED needs a distillation loss"),
    ("shapes.py", ["deepkd.ENABLED=true"], "deepkd.ENABLED needs distillation losses, but model is not distill_detector"),
    ("shapes.py", ["train.max_iters=10"], "unknown config key train.max_iters (did you mean train.max_iter?)"),
    ("shapes.py", ["train.max_iter=0"], "train.max_iter must be a positive integer, got 0"),
    ("shapes.py", ["train.init_checkpoint=/nonexistent/student.pth"],
     "train.init_checkpoint '/nonexistent/student.pth' does not exist"),
    ("shapes.py", ["train.amp.enabled=true", "train.amp.dtype=fp8"],
     "train.amp.dtype must be one of ('fp16', 'bf16'), got 'fp8'"),
    ("shapes.py", ["lr_multiplier.steps=[10]"], "lr_multiplier.steps [10] must increase and lie below train.max_iter=4"),
])
def test_startup_refusals_are_one_line_naming_the_key(tmp_path, shapes_root, capsys, config, opts, named):
    out = tmp_path / "out"
    line = _cli_error(capsys, _lazy_argv(LAZY_DEMO / config, out, shapes_root, *opts))
    assert named in line
    assert not out.exists()  # refused before anything was written


def test_a_teacher_without_weights_is_refused_naming_the_keys(tmp_path, shapes_root, capsys):
    line = _cli_error(capsys, _lazy_argv(LAZY_DEMO / DKD, tmp_path / "out", shapes_root, "model.teacher.weights="))
    assert ("no teacher weights: set model.teacher.weights to a detectron2 checkpoint of the teacher, or "
            "train.init_checkpoint to a combined file with teacher.* keys") in line


def test_a_config_without_max_iter_is_refused(tmp_path, capsys):
    config = tmp_path / "no_max_iter.py"
    text = (LAZY_DEMO / "shapes.py").read_text()
    assert "    max_iter=300,\n" in text
    config.write_text(text.replace("    max_iter=300,\n", ""))
    line = _cli_error(capsys, ["--config-file", str(config), f"train.output_dir={tmp_path / 'o'}"])
    assert "train.max_iter is not set (no default: state it in the config)" in line


# ---------------------------------------------------------------- the engine of train_net.py


def test_yacs_and_lazy_entry_points_train_the_same_deepkd_dkd_student(tmp_path, shapes_root):
    """The same tiny DeepKD-DKD run (same seed, same generated data, random test teacher) through
    train_net.py's yaml and through the LazyConfig entry point: identical weights, buffers, K."""
    yacs, lazy = tmp_path / "yacs", tmp_path / "lazy"
    trainer = DeepKDTrainer(train_net.setup(_yacs_args(YACS_DEMO / "student-deepkd-dkd.yaml", yacs, shapes_root,
                                                       *RANDOM_TEACHER_YACS)))
    trainer.resume_or_load(resume=False)
    trainer.train()
    lazy_trainer = _lazy_trainer(_lazy_argv(LAZY_DEMO / "student_deepkd_dkd.py", lazy, shapes_root,
                                            *RANDOM_TEACHER_LAZY))
    # The engine of train_net.py: the decoupled step over the core DeepKD optimizer.
    assert type(lazy_trainer._trainer).__name__ == "DecoupledStepTrainer"
    assert type(lazy_trainer.optimizer).__name__ == "DeepKDOptimizer"
    assert lazy_trainer.model.max_iter == 4  # train.max_iter, not a default
    assert lazy_trainer.model.loss_components == {"loss_tckd": "tcg", "loss_nckd": "ncg"}
    lazy_trainer.train()
    a, b = _final(yacs), _final(lazy)
    assert a["iteration"] == b["iteration"] == 3
    assert _max_abs_diff(a["model"], b["model"]) == 0.0
    assert a["topk_schedule"] == b["topk_schedule"]
    opt_a, opt_b = a["trainer"]["_trainer"]["optimizer"]["state"], b["trainer"]["_trainer"]["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and any("scaled_buffer_ncg" in st for st in opt_a.values())
    for i in opt_a:
        for name, value in opt_a[i].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt_b[i][name]), (i, name)

    # --eval-only of the same weights (the student alone): the yacs and the lazy evaluation agree.
    weights = str(yacs / "model_final.pth")
    yacs_results = train_net.evaluate(train_net.setup(_yacs_args(
        YACS_DEMO / "student-deepkd-dkd.yaml", tmp_path / "eval_yacs", shapes_root, "DATASETS.TEST", "('deepkd_shapes_val',)",
        "MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *RANDOM_TEACHER_YACS)))
    tool = load_tool("lazy_train_net")
    args = tool.parse_args(_lazy_argv(LAZY_DEMO / DKD, tmp_path / "eval_lazy", shapes_root,
                                      "dataloader.evaluator={_target_: detectron2.evaluation.COCOEvaluator, "
                                      "dataset_name: deepkd_shapes_val, tasks: [bbox]}",
                                      "model.student.roi_heads.box_predictor.test_score_thresh=0.0",
                                      f"train.init_checkpoint={weights}", "--eval-only"))
    lazy_results = tool.main(args)
    assert 0.0 <= lazy_results["bbox"]["AP50"] <= 100.0  # the 4-iteration model's boxes were scored
    assert lazy_results["bbox"]["AP50"] == yacs_results["bbox"]["AP50"]
    assert lazy_results["bbox"]["AP"] == yacs_results["bbox"]["AP"]


def test_yacs_and_lazy_entry_points_train_the_same_plain_detector(tmp_path, shapes_root):
    """No distillation (detectron2's summed-loss step, CheckedSimpleTrainer): the same weights too."""
    yacs, lazy = tmp_path / "yacs", tmp_path / "lazy"
    short_yacs = ("SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)")
    trainer = DeepKDTrainer(train_net.setup(_yacs_args(YACS_DEMO / "teacher.yaml", yacs, shapes_root, *short_yacs)))
    trainer.resume_or_load(resume=False)
    trainer.train()
    lazy_trainer = _lazy_trainer(_lazy_argv(LAZY_DEMO / "shapes.py", lazy, shapes_root, "train.max_iter=2",
                                            "lr_multiplier.steps=[1]"))
    assert type(lazy_trainer._trainer) is type(trainer._trainer)
    assert type(lazy_trainer.optimizer) is torch.optim.SGD
    lazy_trainer.train()
    a, b = _final(yacs), _final(lazy)
    assert a["iteration"] == b["iteration"] == 1
    assert _max_abs_diff(a["model"], b["model"]) == 0.0


class _Crash(HookBase):
    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            raise KeyboardInterrupt(f"simulated kill at iteration {self.at}")


def test_lazy_run_resumes_exactly_after_a_kill(tmp_path, shapes_root):
    opts = ["train.max_iter=3", "lr_multiplier.steps=[2]", "train.checkpointer.period=2", *RANDOM_TEACHER_LAZY]
    config = LAZY_DEMO / "student_deepkd_dkd.py"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _lazy_trainer(_lazy_argv(config, whole, shapes_root, *opts)).train()
    first = _lazy_trainer(_lazy_argv(config, parts, shapes_root, *opts))
    first.register_hooks([_Crash(2)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (parts / "last_checkpoint").read_text() == "model_0000001.pth"
    resumed = _lazy_trainer(_lazy_argv(config, parts, shapes_root, *opts) + ["--resume"])
    assert resumed.start_iter == 2  # iteration 2 runs again, after the kill
    resumed.train()
    a, b = _final(whole), _final(parts)
    assert _max_abs_diff(a["model"], b["model"]) == 0.0
    assert a["topk_schedule"] == b["topk_schedule"]
    buffers_a, buffers_b = (x["trainer"]["_trainer"]["optimizer"]["state"] for x in (a, b))
    for i in buffers_a:
        for name, value in buffers_a[i].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, buffers_b[i][name]), (i, name)
    mid = torch.load(parts / "model_0000001.pth", weights_only=True)
    assert _max_abs_diff(mid["model"], b["model"]) > 0  # it trained after the resume
    assert os.path.isfile(parts / "config.yaml")  # detectron2's default_setup saved the LazyConfig


# ---------------------------------------------------------------- the COCO pairs


@pytest.mark.parametrize("pair", ["R18-R101", "R50-R101", "MV2-R50"])
def test_lazy_pair_configs_build_the_yacs_pairs(tmp_path, pair):
    """configs/DEEPKD/lazy/DKD-<pair>.py against configs/DEEPKD/DKD-<pair>.yaml: the same student
    and teacher (state-dict keys, shapes, trained parameters, input format, normalisation), the
    same parts, top-k schedule, DEEPKD node, solver and data settings."""
    from detectron2.config import instantiate
    from detectron2.solver import build_lr_scheduler

    from deepkd_det.det.config import merge_config_file

    ycfg = get_deepkd_cfg()
    merge_config_file(ycfg, str(REPO / "configs" / "DEEPKD" / f"DKD-{pair}.yaml"))
    ycfg.MODEL.WEIGHTS, ycfg.TEACHER.ALLOW_RANDOM_INIT, ycfg.MODEL.DEVICE = "", True, "cpu"
    cfg = load_lazy_config(str(REPO / "configs" / "DEEPKD" / "lazy" / f"DKD-{pair}.py"), [
        "train.init_checkpoint=", "model.teacher.allow_random_init=true", "train.device=cpu",
        f"train.output_dir={tmp_path}"])
    deepkd, settings = validate_lazy_config(cfg, pair)
    assert _flat(deepkd) == _flat(ycfg.DEEPKD) and deepkd.ENABLED
    y_model, l_model = DeepKDTrainer.build_model(ycfg), instantiate(cfg.model)

    def described(model):
        return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}

    assert described(y_model) == described(l_model)
    assert ({n for n, p in y_model.named_parameters() if p.requires_grad}
            == {n for n, p in l_model.named_parameters() if p.requires_grad})
    for y, lz in ((y_model, l_model), (y_model.teacher, l_model.teacher)):
        assert y.input_format == lz.input_format
        assert torch.equal(y.pixel_mean, lz.pixel_mean) and torch.equal(y.pixel_std, lz.pixel_std)
    assert [p.name for p in y_model.parts] == [p.name for p in l_model.parts] == ["logits"]
    y_part, l_part = y_model.parts[0], l_model.parts[0]
    assert vars(y_part).keys() == vars(l_part).keys()
    for key, value in vars(y_part).items():
        if key != "topk_schedule":
            assert value == vars(l_part)[key], key
    assert y_model.max_iter == l_model.max_iter == ycfg.SOLVER.MAX_ITER == settings.max_iter
    assert [y_model.topk_schedule.k_at(p / 10) for p in range(11)] == [l_model.topk_schedule.k_at(p / 10)
                                                                        for p in range(11)]
    # Solver: lr, momentum, weight decay, the multiplier at every step boundary.
    opt = cfg.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay) == (ycfg.SOLVER.BASE_LR, ycfg.SOLVER.MOMENTUM,
                                                       ycfg.SOLVER.WEIGHT_DECAY)
    multiplier = instantiate(cfg.lr_multiplier)
    y_sched = build_lr_scheduler(ycfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    for where in (0, 500, 999, 1000, 59999, 60000, 80000, 89999):
        assert multiplier(where / ycfg.SOLVER.MAX_ITER) == pytest.approx(y_sched._multiplier(where / ycfg.SOLVER.MAX_ITER))
    # Data: datasets, batch, sizes, channel order; checkpoints.
    train = cfg.dataloader.train
    assert [train.dataset.names] == list(ycfg.DATASETS.TRAIN)
    assert train.total_batch_size == ycfg.SOLVER.IMS_PER_BATCH
    resize = train.mapper.augmentations[0]
    assert (tuple(resize.short_edge_length), resize.max_size) == (tuple(ycfg.INPUT.MIN_SIZE_TRAIN), ycfg.INPUT.MAX_SIZE_TRAIN)
    assert train.mapper.image_format == cfg.dataloader.test.mapper.image_format == ycfg.INPUT.FORMAT
    assert settings.checkpoint_period == ycfg.SOLVER.CHECKPOINT_PERIOD
    as_written = load_lazy_config(str(REPO / "configs" / "DEEPKD" / "lazy" / f"DKD-{pair}.py"))
    assert as_written.train.init_checkpoint == merge_config_file(get_deepkd_cfg(), str(
        REPO / "configs" / "DEEPKD" / f"DKD-{pair}.yaml")).MODEL.WEIGHTS  # the combined release file
    assert os.path.basename(ycfg.OUTPUT_DIR) == os.path.basename(as_written.train.output_dir)


# ---------------------------------------------------------------- FCOS


def test_fcos_student_trains_with_diffkd_is_evaluated_and_resumes_exactly(tmp_path, shapes_root):
    """An FCOS student (a LazyConfig-only detectron2 model) distilled by DiffKD on its FPN levels
    through the LazyConfig entry point: COCOEvaluator runs mid-training, and a killed run resumes
    to the same weights as an uninterrupted one (the dense detector's loss-normaliser average is
    checkpointed with the trainer state, and the engine runs detectron2's TorchScript focal loss
    unoptimised: docs/lazyconfig.md)."""
    pytest.importorskip("detectron2.modeling.meta_arch.fcos")
    opts = ["train.checkpointer.period=2", *RANDOM_TEACHER_LAZY, "model.parts.0.DIFFKD.IN_FEATURES=[p5,p6,p7]"]
    evaluator = ["train.eval_period=2", "dataloader.evaluator={_target_: detectron2.evaluation.COCOEvaluator, "
                 "dataset_name: deepkd_shapes_val, tasks: [bbox]}"]
    config = LAZY_DEMO / "fcos_diffkd.py"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    trainer = _lazy_trainer(_lazy_argv(config, whole, shapes_root, *opts, *evaluator))
    assert type(trainer.model.student).__name__ == "FCOS" and [p.name for p in trainer.model.parts] == ["diffkd"]
    trainer.train()
    assert set(trainer._last_eval_results["bbox"]) >= {"AP", "AP50"}  # detectron2's COCOEvaluator
    first = _lazy_trainer(_lazy_argv(config, parts, shapes_root, *opts))
    first.register_hooks([_Crash(3)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = _lazy_trainer(_lazy_argv(config, parts, shapes_root, *opts) + ["--resume"])
    assert resumed.start_iter == 2
    resumed.train()
    a, b = _final(whole), _final(parts)
    assert any(k.startswith("diffkd.") for k in a["model"])  # the training-only DiffKD modules are saved
    assert _max_abs_diff(a["model"], b["model"]) == 0.0
    mid = torch.load(parts / "model_0000001.pth", weights_only=True)
    assert _max_abs_diff(mid["model"], b["model"]) > 0


def test_vitdet_teacher_distils_an_r50_fpn_student_through_the_feature_parts(tmp_path):
    """configs/DEEPKD/lazy/DiffKD-ViTDetB-R50.py (detectron2 after v0.6: ViT): the ViTDet-B Mask
    R-CNN teacher and the R-50-FPN student pair their P2-P6 levels by stride, and one training
    forward gives finite DiffKD losses with the teacher frozen."""
    pytest.importorskip("timm")  # detectron2's ViT uses it
    pytest.importorskip("detectron2.modeling.backbone.vit")
    from detectron2.config import instantiate
    from detectron2.utils.events import EventStorage

    from tests.det.tiny import make_batch

    cfg = load_lazy_config(str(REPO / "configs" / "DEEPKD" / "lazy" / "DiffKD-ViTDetB-R50.py"), [
        "train.init_checkpoint=", "model.teacher.weights=", "model.teacher.allow_random_init=true",
        "train.device=cpu", f"train.output_dir={tmp_path}"])
    validate_lazy_config(cfg, "DiffKD-ViTDetB-R50.py")
    model = instantiate(cfg.model).train()
    assert type(model.teacher.model.backbone).__name__ == "SimpleFeaturePyramid"
    assert [p.name for p in model.parts] == ["diffkd"]
    assert model.part("diffkd").levels == {f"p{i}": f"p{i}" for i in range(2, 7)}
    with EventStorage(0):
        losses = model(make_batch(n=2, h=128, w=128, num_classes=80))
    for key in ("loss_diffkd_kd", "loss_diffkd_diff", "loss_cls"):
        assert torch.isfinite(losses[key]), key
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_fcos_coco_pair_config_builds_the_table4_pair(tmp_path):
    """configs/DEEPKD/lazy/DiffKD-FCOS-R101-R50.py: detectron2's own FCOS R-50 1x config as the
    student, the same model at depth 101 as the teacher, DiffKD pairing P3-P7 (detectron2 after
    v0.6: v0.6's FCOSHead cannot build its GN head)."""
    import detectron2.modeling

    if not hasattr(detectron2.modeling, "ViT"):  # the ViTDet era: detectron2 after v0.6
        pytest.skip("detectron2 v0.6 cannot build detectron2's FCOS config (GN on the centerness layer)")
    from detectron2.config import instantiate

    cfg = load_lazy_config(str(REPO / "configs" / "DEEPKD" / "lazy" / "DiffKD-FCOS-R101-R50.py"), [
        "train.init_checkpoint=", "model.teacher.weights=", "model.teacher.allow_random_init=true",
        "train.device=cpu", f"train.output_dir={tmp_path}"])
    deepkd, settings = validate_lazy_config(cfg, "DiffKD-FCOS-R101-R50.py")
    assert not deepkd.ENABLED and settings.max_iter == 90000 and cfg.optimizer.lr == 0.01
    model = instantiate(cfg.model)
    assert type(model.student).__name__ == type(model.teacher.model).__name__ == "FCOS"
    assert model.part("diffkd").levels == {f"p{i}": f"p{i}" for i in range(3, 8)}
    assert len(model.teacher.model.backbone.bottom_up.res4) == 23 and len(model.backbone.bottom_up.res4) == 6
