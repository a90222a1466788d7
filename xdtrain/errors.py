"""User-facing errors and the wrapper every command runs under.

A :class:`UserError` is a problem with the user's input (a config, a path, a data set) that
the user can fix; commands print it as one line and exit with status 2, never a traceback.
A command stopped by Ctrl-C or by a stop signal (:class:`Stopped`) says in one line how to
continue.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the bold and colours torch puts in some messages


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message, without terminal colours, at most ``limit``
    characters; the exception's type name when the message is empty. For the parenthesis
    of a one-line :class:`UserError` that wraps a library's exception."""
    text = _ANSI.sub("", str(exc)).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class UserError(Exception):
    """An error the user can fix; its message names the file and what to do.

    ``quiet`` (set by :func:`xdtrain.distributed.agree`): another rank prints the message."""

    quiet = False


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the command that was interrupted needs to continue (its message);
    ``quiet``: another rank says it."""

    def __init__(self, advice: str, quiet: bool = False):
        super().__init__(advice)
        self.quiet = quiet


class Stopped(Exception):
    """A stop signal (SIGTERM, SIGUSR1, SIGUSR2: a scheduler's preemption, requeue, cancel or
    coming time limit) that the command obeyed after saving what it needs to continue (its
    message). ``quiet``: another rank says it.

    The command exits with 128 + the signal number, the shell's status for "ended by that
    signal": schedulers and queues read it as interrupted, neither finished nor failed."""

    def __init__(self, advice: str, signum: int, quiet: bool = False):
        super().__init__(advice)
        self.signum, self.quiet = signum, quiet


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's ``main``; turn :class:`UserError`, Ctrl-C and :class:`Stopped` into a
    one-line exit."""
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        if not exc.quiet:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        if not exc.quiet:
            print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt as exc:
        advice = str(exc) or (
            "partial outputs were left under temporary names; rerun the same command to resume"
        )
        if not getattr(exc, "quiet", False):
            print(f"interrupted: {advice}", file=sys.stderr)
        return 130
