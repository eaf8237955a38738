"""What a sweep and its jobs say to each other: the job's results and errors, and the override quoting.

Both sides import this module and nothing of each other's: the sweepers (:mod:`src.sweeps.grid`,
:mod:`src.sweeps.study`) read :class:`Outcome`s made from what a job returned or raised (:func:`job_outcome`), and
the job side (:mod:`src.sweeps.job`) raises :class:`JobFailed` and :class:`JobSkipped`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from src.config import literal


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
    """A string as a quoted value of Hydra's override grammar that the job reads back as it is: its quotes and a
    final backslash escaped for the grammar, and ``${`` for OmegaConf (:func:`src.config.literal`), as the text
    is resolved already (an output directory, a study name, a pack's configs)."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", literal(value))
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def env_overrides(env: dict[str, Optional[str]]) -> list[str]:
    """Overrides that set environment variables for one job only (Hydra restores them after)."""
    return [f"++hydra.job.env_set.{key}={quote(value)}" for key, value in env.items() if value is not None]


def visible_overrides(overrides: Sequence[str]) -> list[str]:
    """A job's overrides without the sweep's own (hydra.*), as printed and recorded."""
    return [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]


def job_outcome(number: int, overrides: Sequence[str], ret) -> Outcome:
    """Read a Hydra JobReturn: the job's return value, or the exception it raised."""
    from hydra.core.utils import JobStatus

    shown = visible_overrides(overrides)
    if ret.status != JobStatus.COMPLETED:
        import optuna

        exc = ret._return_value  # JobReturn.return_value would re-raise it
        if isinstance(exc, optuna.TrialPruned):
            return Outcome(number, shown, "PRUNED", reason=str(exc))
        if isinstance(exc, JobSkipped):
            return Outcome(number, shown, "SKIPPED", reason=str(exc))
        run_id = exc.run_id if isinstance(exc, JobFailed) else None
        reason = str(exc) if isinstance(exc, JobFailed) else f"{type(exc).__name__}: {exc}"
        return Outcome(number, shown, "FAILED", run_id=run_id, reason=reason)
    value = ret.return_value
    if isinstance(value, dict) and "metrics" in value:  # src.train.main in a multirun
        return Outcome(number, shown, "FINISHED", metrics=dict(value["metrics"]), run_id=value.get("run_id"))
    return Outcome(number, shown, "FINISHED", metrics={"objective": value})  # any other task function


def pack_outcomes(numbers: Sequence[int], overrides: Sequence[Sequence[str]], ret) -> list[Outcome]:
    """Read the JobReturn of a pack (``{"pack": [one result per job]}``, :func:`src.sweeps.job.run_pack_job`):
    one Outcome per job; a pack job that raised fails each of its jobs with the reason."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.COMPLETED:
        failed = job_outcome(numbers[0], overrides[0], ret)
        return [
            Outcome(n, visible_overrides(o), failed.status, run_id=None, reason=failed.reason)
            for n, o in zip(numbers, overrides)
        ]
    outcomes = []
    for number, shown, result in zip(numbers, overrides, ret.return_value["pack"]):
        shown = visible_overrides(shown)
        status = result.get("status")
        if status == "ok":
            outcomes.append(
                Outcome(number, shown, "FINISHED", metrics=dict(result["metrics"]), run_id=result["run_id"])
            )
        elif status == "pruned":
            outcomes.append(Outcome(number, shown, "PRUNED", reason=result.get("message")))
        elif status == "skipped":
            outcomes.append(Outcome(number, shown, "SKIPPED", reason=result.get("message")))
        else:
            reason = f"{result.get('error_type')}: {result.get('message')}"
            outcomes.append(Outcome(number, shown, "FAILED", run_id=result.get("run_id"), reason=reason))
    return outcomes


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
