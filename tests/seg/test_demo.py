"""The segmentation demo's --quick form end to end: table, summary and picture are written."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_seg_demo_quick_writes_table_summary_and_picture(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("seg_demo", ROOT / "tools" / "seg_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--jobs", "1", "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    for key in demo.QUICK_METHODS:
        assert f"| {demo.LABELS[key]} |" in table
    assert "vs vanilla" in table and "total time" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == set(demo.QUICK_METHODS)
    assert all(len(r["mIoU"]) == 2 for r in summary["results"].values())  # two seeds
    assert "deepkd_dkd - vanilla" in summary["comparisons"]
    png = (out / "seg_demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # A second run reuses the finished teacher.
    assert demo.main(["--quick", "--jobs", "1", "--out", str(out), "--methods", "vanilla", "--seeds", "0"]) == 0
    assert "teacher: reusing" in capsys.readouterr().out
