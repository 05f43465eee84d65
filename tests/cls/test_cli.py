"""tools/train_cls.py on bad input: one line naming the file, exit code 1, no traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.toolload import load_tool

REPO = Path(__file__).resolve().parents[2]


def test_classifier_errors_are_one_line(tmp_path, capsys):
    """tools/train_cls.py: a text file as the teacher, a damaged latest.pth with --resume (typed
    after the overrides)."""
    train_cls = load_tool("train_cls")
    text = tmp_path / "teacher.txt"
    text.write_text("hello\n")
    rc = train_cls.main(["--cfg", str(REPO / "configs/cls/digits/kd.yaml"), "TEACHER.CKPT", str(text),
                         "OUTPUT_DIR", str(tmp_path / "kd")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "teacher.txt" in err and "not a torch file" in err
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}}, run / "latest.pth")
    shutil.copy(run / "latest.pth", run / "full.pth")
    with open(run / "latest.pth", "r+b") as f:
        f.truncate(60)
    rc = train_cls.main(["--cfg", str(REPO / "configs/cls/digits/teacher.yaml"), "OUTPUT_DIR", str(run), "--resume"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "--resume" in err and "latest.pth" in err and "damaged" in err
