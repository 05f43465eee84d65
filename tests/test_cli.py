"""The shared command-line plumbing (deepkd_det/cli.py)."""

from __future__ import annotations

import pytest

from deepkd_det.cli import format_error, pull_trailing_flags, run_cli


def test_flags_after_the_overrides_are_taken_out():
    opts, found = pull_trailing_flags(["A.B", "1", "--resume", "C", "x y", "--eval-only"], ("--resume", "--eval-only"))
    assert opts == ["A.B", "1", "C", "x y"] and found == {"--resume", "--eval-only"}


@pytest.mark.parametrize("opts,message", [
    (["A.B", "1", "C.D"], "'C.D' has no value"),
    (["A.B", "1", "--num-gpus", "2"], "option '--num-gpus' is among the KEY VALUE overrides"),
])
def test_bad_override_lists_are_named(opts, message):
    with pytest.raises(ValueError, match=message):
        pull_trailing_flags(opts, ("--resume",))


def test_run_cli_prints_one_line_and_returns_1(capsys, monkeypatch):
    monkeypatch.delenv("DEEPKD_DEBUG", raising=False)

    def bad():
        raise KeyError("Non-existent config key: X.Y")

    assert run_cli(bad, "prog", (KeyError,)) == 1
    err = capsys.readouterr().err
    assert err.startswith("prog: error: Non-existent config key: X.Y") and err.count("\n") == 1
    monkeypatch.setenv("DEEPKD_DEBUG", "1")
    with pytest.raises(KeyError):
        run_cli(bad, "prog", (KeyError,))
    with pytest.raises(RuntimeError):  # not a user error: never hidden
        run_cli(lambda: (_ for _ in ()).throw(RuntimeError("bug")), "prog", (KeyError,))
    assert format_error(ValueError("a\n  b")) == "a b"
