"""What a sweep and its jobs say to each other: the job's results and errors, and the override quoting.

Both sides import this module and nothing of each other's: the sweepers (src/sweeping.py,
src/sweeping_optuna.py) read :class:`Outcome`s made from what a job returned or raised, and the job side
(src/sweeping_trial.py) raises :class:`JobFailed` and :class:`JobSkipped`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional


class JobFailed(RuntimeError):
    """The job's training raised; ``error_type`` names the original exception."""

    def __init__(self, error_type: str, message: str, run_id: Optional[str] = None):
        super().__init__(error_type, message, run_id)
        self.error_type, self.message, self.run_id = error_type, message, run_id

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


class JobSkipped(RuntimeError):
    """The config was not run: the feasibility check says it cannot fit in the GPU's free memory."""


@dataclass
class Outcome:
    """What became of one job."""

    number: int  # job number (grid) or trial number (Optuna)
    overrides: list[str]
    status: str  # FINISHED | FAILED | PRUNED | SKIPPED
    metrics: dict[str, Any] = field(default_factory=dict)
    run_id: Optional[str] = None
    reason: Optional[str] = None


def quote(value: str) -> str:
    """A string as a quoted value of Hydra's override grammar."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"
