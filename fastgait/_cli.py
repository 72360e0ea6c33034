"""Shared error handling of the command-line tools: a bad input is one ``error: ...`` line, exit 2.

Every ``python -m fastgait.*`` entry point goes through :func:`cli_main`. Exit codes:
0 done; 1 the job ran and failed (a diverging run, an internal error); 2 a bad input (config,
file, folder, device, disk full) — one line naming it and the fix; 130 interrupted. ``--debug``
(or ``FASTGAIT_DEBUG=1``) re-raises instead, with the full traceback.
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable, Optional, Sequence

DEBUG_FLAG = "--debug"


class InputError(ValueError):
    """A bad input the user can fix (the message says how)."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (torch's messages span several)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = " ".join(str(text).split())
    return text or type(error).__name__


def is_disk_full(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def describe(error: BaseException) -> tuple[str, int]:
    """``(message, exit code)`` for an exception that reached a CLI."""
    import yaml

    from .engine.trainer import NonFiniteLossError, TrainingInterrupted

    if isinstance(error, TrainingInterrupted):
        return "", 130
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(error, NonFiniteLossError):
        return one_line(error), 1
    if is_disk_full(error):
        where = getattr(error, "filename", None)
        return (f"no space left on device{f' writing {where}' if where else ''} ({one_line(error)[:200]}); "
                "free some space or write to another folder (--output)"), 2
    if isinstance(error, (ValueError, LookupError, OSError, yaml.YAMLError, TypeError)):
        return one_line(error), 2
    if isinstance(error, RuntimeError) and "checkpoint" in str(error):
        return one_line(error), 2
    return (f"internal error ({type(error).__name__}: {one_line(error)[:500]}); "
            f"run again with {DEBUG_FLAG} for the traceback and report it"), 1


def cli_main(function: Callable[[list[str]], Optional[int]]) -> Callable[[Optional[Sequence[str]]], int]:
    """Wrap a CLI ``main(argv)``: strips ``--debug``, turns exceptions into one ``error:`` line."""

    @functools.wraps(function)
    def main(argv: Optional[Sequence[str]] = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = DEBUG_FLAG in argv or os.environ.get("FASTGAIT_DEBUG", "") not in ("", "0")
        argv = [a for a in argv if a != DEBUG_FLAG]
        try:
            code = function(argv)
        except SystemExit:  # argparse: its own usage + error line, exit 2
            raise
        except BaseException as error:  # noqa: BLE001 - every error becomes one line unless --debug
            if debug and not isinstance(error, KeyboardInterrupt) and type(error).__name__ != "TrainingInterrupted":
                raise
            message, code = describe(error)
            if message:
                print(f"error: {message}" if code != 130 else message, file=sys.stderr, flush=True)
            return code
        return 0 if code is None else int(code)

    return main
