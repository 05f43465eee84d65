"""Command-line plumbing shared by ``train_net.py`` and ``tools/train_cls.py`` (pure Python).

- ``pull_trailing_flags``: argparse's REMAINDER puts ``--resume`` typed after the ``KEY VALUE``
  overrides into the overrides; this takes the known switches back out, wherever they are.
- ``run_cli``: runs a main function and turns configuration and input errors into one line on
  stderr and exit code 1; the traceback only with ``--debug`` or ``DEEPKD_DEBUG=1``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Iterable, List, Sequence, Set, Tuple, Type

__all__ = ["DEBUG_ENV", "OneLineErrors", "debug_requested", "format_error", "pull_trailing_flags", "run_cli"]

DEBUG_ENV = "DEEPKD_DEBUG"


def pull_trailing_flags(opts: Sequence[str], flags: Iterable[str]) -> Tuple[List[str], Set[str]]:
    """``(overrides without the flags, flags found)``.

    Only tokens in ``flags`` are taken out; any other ``--option`` among the overrides, or an odd
    number of override tokens, is a ValueError naming it (options go before the overrides).
    """
    known = set(flags)
    kept, found = [], set()
    for token in opts:
        if token in known:
            found.add(token)
        else:
            kept.append(token)
    for i in range(0, len(kept), 2):
        if kept[i].startswith("--"):
            raise ValueError(
                f"option {kept[i]!r} is among the KEY VALUE overrides: put options before the overrides"
            )
    if len(kept) % 2:
        raise ValueError(
            f"overrides must come in KEY VALUE pairs: {kept[-1]!r} has no value ({len(kept)} override tokens)"
        )
    return kept, found


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """``--debug`` among the arguments or DEEPKD_DEBUG set to anything but "" / "0"."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def format_error(exc: BaseException) -> str:
    """One line: the message (a KeyError's argument without its quotes), newlines folded."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def run_cli(
    main: Callable[[], int | None],
    prog: str,
    errors: Tuple[Type[BaseException], ...],
    debug: bool = False,
) -> int:
    """``main()``; an exception of ``errors`` prints ``prog: error: <message>`` and returns 1."""
    try:
        main()
    except errors as exc:
        if debug or debug_requested():
            raise
        print(f"{prog}: error: {format_error(exc)}  (full traceback: --debug or {DEBUG_ENV}=1)",
              file=sys.stderr, flush=True)
        return 1
    return 0


class OneLineErrors(logging.Filter):
    """A log filter for a trainer's "Exception during training:" record (detectron2 logs the
    traceback of any exception in the loop): a user error of ``errors`` is logged as one line."""

    def __init__(self, errors: Tuple[Type[BaseException], ...]):
        super().__init__()
        self.errors = errors

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.errors):
            record.msg, record.args, record.exc_info, record.exc_text = f"{record.msg} {format_error(exc)}", (), None, None
        return True
