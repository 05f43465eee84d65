"""The demos' --quick forms end to end: the table, the summary and the picture are written."""

import json
from pathlib import Path

import pytest
import torch

from tests.toolload import load_tool

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    return load_tool(name)


def _docs_with_blocks(tmp_path, name):
    """A README and a docs page holding the demo's block (with stale numbers), text around it."""
    begin, end = load_tool("demo_report").docs_block_markers(name)
    files = []
    for rel in ("README.md", "docs/demos.md"):
        path = tmp_path / "repo" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {path.name}\n\nbefore\n{begin}\n| stale | 1.00 |\n{end}\nafter\n")
        files.append(path)
    return files


def _check_docs(files, name, table):
    """Each file: the block holds the printed table (after its command line), the rest is as it was."""
    begin, end = load_tool("demo_report").docs_block_markers(name)
    for path in files:
        text = path.read_text()
        assert text.startswith(f"# {path.name}\n\nbefore\n{begin}\n")
        assert text.endswith(f"\n{end}\nafter\n") and "stale" not in text
        block = text.split(begin + "\n")[1].split("\n" + end)[0]
        assert block.startswith(f"Written by `python tools/{name}.py --quick")
        assert block.split("\n", 2)[2] == table.rstrip("\n")


def test_cls_demo_quick_writes_table_summary_and_picture(tmp_path, capsys):
    demo = _load("cls_demo")
    out = tmp_path / "demo"
    docs = _docs_with_blocks(tmp_path, "cls_demo")
    with pytest.raises(SystemExit):  # smoke-run numbers never go to the project's docs by default
        demo.main(["--quick", "--write-docs"])
    assert demo.main(["--quick", "--jobs", "1", "--out", str(out), "--write-docs", "--docs", *map(str, docs)]) == 0
    table = (out / "results.md").read_text()
    _check_docs(docs, "cls_demo", table)
    assert (docs[1].parent / "cls_demo.png").read_bytes() == (out / "cls_demo.png").read_bytes()
    for key in demo.QUICK_METHODS:
        assert f"| {demo.LABELS[key]} |" in table
    assert "vs vanilla" in table and "total time" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == set(demo.QUICK_METHODS)
    assert all(len(r["last_top1"]) == 2 for r in summary["results"].values())  # two seeds
    assert "deepkd_dkd - vanilla" in summary["comparisons"]
    png = (out / "cls_demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # The DeepKD run measured GSNR, which the picture plots.
    rows = [json.loads(line) for line in open(out / "deepkd_dkd" / "seed0" / "metrics.jsonl")]
    assert any(r["type"] == "gsnr" and "gsnr/tog" in r for r in rows)
    assert "| vanilla (CE) |" in capsys.readouterr().out


def test_det_demo_quick_writes_table_summary_and_picture(tmp_path, capsys):
    pytest.importorskip("detectron2")
    demo = _load("det_demo")
    out = tmp_path / "det"
    docs = _docs_with_blocks(tmp_path, "det_demo")
    assert demo.main(["--quick", "--jobs", "1", "--output", str(out), "--write-docs", "--docs", *map(str, docs)]) == 0
    table = (out / "results.md").read_text()
    _check_docs(docs, "det_demo", table)
    for key in demo.QUICK_METHODS:
        assert f"| {demo.LABELS[key]} |" in table
    assert "| teacher (all " in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == set(demo.QUICK_METHODS)
    assert all(len(r["AP"]) == len(summary["seeds"]) == 2 for r in summary["results"].values())
    assert "deepkd_dkd - vanilla" in summary["comparisons"]
    png = (out / "det_demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # The students trained on their own json of the first images; the curves the picture draws exist.
    few = json.loads((out / "data" / "annotations" / f"instances_train_first{summary['profile']['student_images']}.json").read_text())
    assert len(few["images"]) == summary["profile"]["student_images"] and len(few["categories"]) == 6
    agnostic = json.loads((out / "data_pretrain" / "annotations" / "instances_train_agnostic.json").read_text())
    assert [c["name"] for c in agnostic["categories"]] == ["shape"] and {a["category_id"] for a in agnostic["annotations"]} == {1}
    # Every run starts from the pre-trained detector without its one-class box predictor.
    init = torch.load(out / "pretrain" / "init.pth", weights_only=True)["model"]
    assert any(k.startswith("backbone.bottom_up.") for k in init) and any(k.startswith("proposal_generator.") for k in init)
    assert not any(k.startswith("roi_heads.box_predictor.") for k in init)
    curves = demo.read_curves(str(out / "deepkd_dkd" / "seed0"))
    assert curves["bbox/AP"] and curves["kd/topk_k"] and curves["gsnr/tog"] and curves["bsnr/ncg"]
    assert "[det_demo] table" in capsys.readouterr().out
    # A second run reuses the pre-training and the teacher (same settings) instead of training them
    # again; a student that diverges is a row of the table, not the end of the demo.
    argv = ["--jobs", "1", "--output", str(out), "--methods", "vanilla", "--seeds", "0", "--quick", "SOLVER.BASE_LR", "1000.0"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "pre-training: reusing" in printed and "teacher: reusing" in printed and "DIVERGED" in printed
    assert "| vanilla | - | - | - | diverged |" in (out / "results.md").read_text()
    assert json.loads((out / "summary.json").read_text())["results"]["vanilla"]["diverged"]["0"].startswith("non-finite loss")
    # The other families (--methods takes a family's name): each with its own teacher, trained from
    # the same pre-trained detector (a Mask R-CNN on the shapes' polygons, a RetinaNet), and each
    # row compared with its own family's vanilla student; the Faster R-CNN rows are not run.
    # (Kept small: 2 iterations a teacher and a student, one DDIM step in the RetinaNet student's DiffKD.)
    argv = ["--jobs", "1", "--output", str(out), "--methods", "mask", "retinanet", "--seeds", "0",
            "--set", "teacher_iters=2", "student_iters=2", "eval_period=2", "--quick", "KD.DIFFKD.INFERENCE_STEPS", "1"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "pre-training: reusing" in printed and "Mask R-CNN teacher: training" in printed
    assert "RetinaNet teacher: training" in printed and "[det_demo] teacher" not in printed
    table = (out / "results.md").read_text()
    for key in demo.FAMILY_METHODS["mask"] + demo.FAMILY_METHODS["retinanet"]:
        assert f"| {demo.LABELS[key]} |" in table
    assert "| Mask R-CNN teacher (all " in table and "| RetinaNet teacher (all " in table
    assert "| vanilla |" not in table and "| mask AP |" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["teachers"]) == {"mask", "retinanet"} and "mask_AP" in summary["teachers"]["mask"]
    assert "mask_AP" not in summary["teachers"]["retinanet"]
    assert {"mask_deepkd_dkd - mask_vanilla", "mask_deepkd_dkd - mask_vanilla (mask AP)",
            "retinanet_diffkd_deepkd_dkd - retinanet_vanilla"} <= set(summary["comparisons"])
    assert not any(name.endswith(" - vanilla") for name in summary["comparisons"])
    # The Mask R-CNN students were evaluated on segm; the RetinaNet student ran the dense DeepKD
    # (its top-k K) inside the distillation wrapper. The Mask R-CNN runs start from the pre-trained
    # detector; the RetinaNet ones from the RetinaNet pre-trained (class-agnostically) from it,
    # without its class-score layer.
    assert demo.read_curves(str(out / "mask_deepkd_dkd" / "seed0"))["segm/AP"]
    assert demo.read_curves(str(out / "retinanet_diffkd_deepkd_dkd" / "seed0"))["kd/topk_k"]
    for run, init in (("teacher_mask", "pretrain"), ("mask_deepkd_dkd/seed0", "pretrain"),
                      ("pretrain_retinanet", "pretrain"), ("teacher_retinanet", "pretrain_retinanet"),
                      ("retinanet_diffkd_deepkd_dkd/seed0", "pretrain_retinanet")):
        assert f"Loading from {out / init / 'init.pth'} ..." in (out / run / "log.txt").read_text(), run
    retinanet_init = torch.load(out / "pretrain_retinanet" / "init.pth", weights_only=True)["model"]
    assert any(k.startswith("head.cls_subnet.") for k in retinanet_init) and "head.bbox_pred.weight" in retinanet_init
    assert not any(k.startswith("head.cls_score.") for k in retinanet_init)
    assert (out / "det_demo_mask.png").is_file() and (out / "det_demo_retinanet.png").is_file()
