"""tools/train_cls.py on bad input: one line naming the file, exit code 1, no traceback."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
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


def _digest(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line(capsys, rc, *expected):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(("train_cls.py: error: ", "eval_cls.py: error: ")), err
    for text in expected:
        assert text in lines[0], (text, lines[0])


def test_bad_yaml_and_an_output_dir_under_a_file_are_one_line(tmp_path, capsys):
    """A config that does not parse, one whose top level is a list, OUTPUT_DIR under a file: one line
    naming the file or key, exit code 1, the earlier run's folder untouched."""
    train_cls = load_tool("train_cls")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "worklog.txt", "metrics.jsonl"):
        (run / name).write_text(f"earlier {name}\n")
    before = _digest(run)
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("SOLVER:\n  EPOCHS: [1\n")
    _one_line(capsys, train_cls.main(["--cfg", str(syntax), "OUTPUT_DIR", str(run)]), "syntax.yaml:3:", "not valid YAML")
    listed = tmp_path / "listed.yaml"
    listed.write_text("- SOLVER.EPOCHS\n- 1\n")
    _one_line(capsys, train_cls.main(["--cfg", str(listed), "OUTPUT_DIR", str(run)]), "listed.yaml", "a list")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _one_line(capsys, train_cls.main(["--cfg", str(REPO / "configs/cls/digits/teacher.yaml"),
                                      "OUTPUT_DIR", str(a_file / "run")]), "OUTPUT_DIR", "a_file", "not a folder")
    eval_cls = load_tool("eval_cls")
    _one_line(capsys, eval_cls.main(["--cfg", str(syntax), "--teacher"]), "syntax.yaml:3:", "not valid YAML")
    assert _digest(run) == before


def test_eval_tool_takes_options_after_the_overrides(tmp_path, capsys):
    """`--cfg CFG KEY VALUE --ckpt X` parses: the override is applied (an unknown key is named) and
    --ckpt is read (a missing file is named), rather than an argument error."""
    eval_cls = load_tool("eval_cls")
    cfg = str(REPO / "configs/cls/digits/dkd.yaml")
    _one_line(capsys, eval_cls.main(["--cfg", cfg, "DKD.BETTA", "2", "--ckpt", str(tmp_path / "x.pth")]), "DKD.BETTA")
    _one_line(capsys, eval_cls.main(["--cfg", cfg, "DATASET.DIGITS.SIZE", "8", "DATASET.DIGITS.TRAIN_LIMIT", "64",
                                     "--ckpt", str(tmp_path / "x.pth")]), "x.pth")


def test_a_save_killed_midway_leaves_a_temp_file_the_next_start_removes(tmp_path, capsys):
    """kill -9 of a process inside atomic_save: its temporary file stays; the trainer's next start in
    that folder removes it (and only it) and says so in the worklog."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.tmp").write_text("not ours\n")
    killer = ("import os, signal, torch\n"
              "from deepkd_det.core.io import atomic_write\n"
              "def write(f):\n"
              "    f.write(b'half a checkpoint')\n"
              "    f.flush()\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"atomic_write({str(run / 'latest.pth')!r}, write)\n")
    proc = subprocess.run([sys.executable, "-c", killer], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in run.iterdir() if p.name.startswith(".latest.pth.") and p.name.endswith(".tmp")]
    assert len(left) == 1 and not (run / "latest.pth").exists()
    train_cls = load_tool("train_cls")
    rc = train_cls.main(["--cfg", str(REPO / "configs/cls/digits/teacher.yaml"), "OUTPUT_DIR", str(run),
                         "DEVICE", "cpu", "DATASET.NUM_WORKERS", "0", "DATASET.DIGITS.SIZE", "8",
                         "DATASET.DIGITS.TRAIN_LIMIT", "64", "DISTILLER.STUDENT", "resnet8", "SOLVER.EPOCHS", "1",
                         "SOLVER.LR_DECAY_STAGES", "[1]", "LOG.PROGRESS_BAR", "False", "LOG.TENSORBOARD", "False"])
    assert rc == 0, capsys.readouterr().err
    assert not (run / left[0]).exists() and (run / "notes.tmp").exists() and (run / "latest.pth").is_file()
    assert f"removed {left[0]}" in (run / "worklog.txt").read_text()
