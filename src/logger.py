"""The project logger: ``log`` (the ``src`` logger) and :func:`say`, one line for the user.

A leaf module (no project import), so that every module can log, also those that :mod:`src.console` reaches
through :mod:`src.tracking`. ``print`` is only for a command's stdout payload (tests/regression/test_logging_rule.py).
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("src")


class _Stderr(logging.StreamHandler):
    """Bare lines on ``sys.stderr`` as it is when each line is written (a test's capture swaps it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


_STDERR = _Stderr()


def say(message: str, level: int = logging.INFO) -> None:
    """One line for the user: through the ``src`` logger where the process set that logger up to show it (a run's
    Hydra job logging, :func:`src.console.log_to_file`), else bare on stderr, so that a command without logging,
    or with only someone else's (Hydra's own ``[HYDRA]`` lines on stdout in a sweep's parent process), shows it
    as it is. ``level`` files it in a run's train.log: ``logging.WARNING`` for a note or warning,
    ``logging.ERROR`` for an error."""
    if logging.NOTSET < log.level <= logging.INFO and log.hasHandlers():
        log.log(level, message)
    else:
        _STDERR.handle(log.makeRecord(log.name, level, __file__, 0, message, None, None))
