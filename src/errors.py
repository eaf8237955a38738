"""The project's one family of user-facing errors, and the tail every command line shares.

A :class:`UserError` is something the person at the keyboard can fix (a config key, a data row, a run id):
the commands print it as ``error: ...`` and exit 2, without a traceback (:func:`run_cli`). A
:class:`ProblemsError` lists every problem found, so one attempt shows them all.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Optional


class UserError(Exception):
    """A problem the user can fix; the message is fit to print without a traceback."""


class ProblemsError(UserError, ValueError):
    """Every problem found in one input, one per line under ``title``."""

    title = "invalid input"

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__(f"{self.title}:\n" + "\n".join(f"  - {p}" for p in self.problems))


def run_cli(body: Callable[[], Optional[int]]) -> int:
    """Run a command's body and return its exit code: 2, with the message on stderr, for a :class:`UserError`."""
    try:
        return body() or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
