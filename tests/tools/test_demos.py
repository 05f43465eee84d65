"""The classification demo's --quick form end to end: the table, the summary and the picture are written."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cls_demo_quick_writes_table_summary_and_picture(tmp_path, capsys):
    demo = _load("cls_demo")
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--jobs", "1", "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
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


def test_compare_marks_only_differences_beyond_the_spread():
    demo = _load("cls_demo")
    far = demo.compare([95.0, 96.0, 97.0], [90.0, 91.0, 92.0])  # diff 5, stds 1 + 1
    near = demo.compare([92.0, 93.0, 94.0], [90.0, 91.0, 92.0])  # diff 2, stds 1 + 1
    assert far["exceeds"] and abs(far["diff"] - 5.0) < 1e-9 and abs(far["spread"] - 2.0) < 1e-9
    assert not near["exceeds"]
