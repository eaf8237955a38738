"""The project's one family of user-facing errors, and the tail every command line shares.

A :class:`UserError` is something the person at the keyboard can fix (a config key, a data row, a run id, a
model path, a store): the commands print it as ``error: ...`` and exit 2, without a traceback (:func:`run_cli`,
:func:`exit_on_user_error`). A :class:`ProblemsError` lists every problem found, so one attempt shows them all.
A library's exception becomes one of these where it is raised, by the code that knows which file or key it
concerns; anything else keeps its traceback, since it is a bug to report. Ctrl-C or SIGTERM is no bug either:
one line and the shell's exit code for the signal (:func:`report_interrupt`).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Optional, TypeVar

from src.logger import say

T = TypeVar("T")
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix; the message is fit to print without a traceback."""


class ProblemsError(UserError, ValueError):
    """Every problem found in one input, one per line under ``title``."""

    title = "invalid input"

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__(f"{self.title}:\n" + "\n".join(f"  - {p}" for p in self.problems))


class StoreError(UserError):
    """A store (MLflow's, Optuna's) that cannot be opened or written: corrupt, read-only, or a deleted experiment."""


def first_line(exc: BaseException) -> str:
    """A library error's first line: SQLAlchemy and transformers append pages of background below it."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def cause_line(exc: BaseException) -> str:
    """The first line of the innermost cause, under a library's wrappers (SQLAlchemy's ``orig``, ``raise ... from``):
    a database's own words, such as "attempt to write a readonly database"."""
    while getattr(exc, "orig", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "orig", None) or exc.__cause__
    return first_line(exc)


def report(exc: UserError) -> int:
    """Say ``error: <message>`` (on stderr, and in a run's train.log); return the exit code of a user error."""
    say(f"error: {exc}", logging.ERROR)
    return USER_ERROR_EXIT


def run_cli(body: Callable[[], Optional[int]]) -> int:
    """Run a command's body and return its exit code: 2, with the message on stderr, for a :class:`UserError`."""
    try:
        return body() or 0
    except UserError as exc:
        return report(exc)


def report_interrupt(exc: KeyboardInterrupt) -> int:
    """Say ``interrupted (SIGINT): run <id> ended KILLED`` on stderr; return 128 + the signal's number, as a
    shell reports a process its signal ended. ``exc.signum`` (SIGTERM, set by ``src.tracking``) defaults to
    Ctrl-C's SIGINT; ``exc.ended`` (run id, status) is set by ``tracking.tracked_run`` once the run is closed."""
    signum = signal.Signals(getattr(exc, "signum", signal.SIGINT))
    ended = getattr(exc, "ended", None)
    where = f": run {ended[0]} ended {ended[1]}" if ended else ""
    say(f"interrupted ({signum.name}){where}", logging.WARNING)
    return 128 + signum.value


def exit_on_user_error(body: Callable[[], T]) -> T:
    """Run ``body`` inside Hydra (``src.train``): a :class:`UserError` exits 2 with its one line, Ctrl-C or
    SIGTERM exits 130 or 143 with one line (:func:`report_interrupt`); Hydra would print any exception that
    reaches it with a traceback."""
    try:
        return body()
    except UserError as exc:
        sys.exit(report(exc))
    except KeyboardInterrupt as exc:
        sys.exit(report_interrupt(exc))
