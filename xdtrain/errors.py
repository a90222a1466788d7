"""User-facing errors and the wrapper every command runs under.

A :class:`UserError` is a problem with the user's input (a config, a path, a data set) that
the user can fix; commands print it as one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """An error the user can fix; its message names the file and what to do."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's ``main``; turn :class:`UserError` and Ctrl-C into a one-line exit."""
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: partial outputs were left under temporary names; rerun to resume",
            file=sys.stderr,
        )
        return 130
