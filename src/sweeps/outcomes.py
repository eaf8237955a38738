"""What a sweep and its jobs say to each other: a job's :class:`JobResult`, the names of the tags and attributes
they share, and the override quoting.

Both sides import this module and nothing of each other's: the job side (:mod:`src.sweeps.job`) writes a
:class:`JobResult` (``job_result.json``) or raises :class:`JobFailed` and :class:`JobSkipped`; the sweepers
(:mod:`src.sweeps.grid`, :mod:`src.sweeps.study`) read :class:`Outcome`s made from what a job returned or raised
(:func:`job_outcome`, :func:`pack_outcomes`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Optional

from src.config import literal

# MLflow tags of a sweep's runs. A job's run: its Optuna study and trial, the pruned mark (the run ends KILLED,
# tagged PRUNED: nothing went wrong, the sweep stopped it), the feasibility note. The parent run: its sweep,
# kind, planned jobs and best job. Both: the error that ended them (src.tracking writes a job's).
STUDY_TAG, TRIAL_TAG = "optuna_study", "optuna_trial"
STATUS_TAG, PRUNED_TAG_VALUE = "status", "PRUNED"
FEASIBILITY_TAG = "feasibility"
SWEEP_ID_TAG, SWEEP_KIND_TAG, PLANNED_TAG, BEST_TAG = "sweep_id", "sweep_kind", "planned_jobs", "best"
ERROR_TAG, ERROR_TYPE_TAG = "error", "error_type"

# Optuna trial user attrs the sweeper writes. Trials that take no place in n_trials: a repeated proposal answered
# from an earlier trial (DUPLICATE_OF) and one asked beyond n_trials by a worker racing others (OVER_BUDGET). A
# trial that reached its own failure carries FAIL_REASON (SKIPPED too, when the feasibility check skipped it); an
# interrupted one, which carries none, is retried as RETRY_OF; ADOPTED marks a trial whose run finished after its
# sweep stopped. OVERRIDES and RUN_ID tell where its run is; OWNER_* the sweep process that runs it.
DUPLICATE_OF_ATTR, OVER_BUDGET_ATTR = "duplicate_of", "over_budget"
FAIL_REASON_ATTR, SKIPPED_ATTR, RETRY_OF_ATTR, ADOPTED_ATTR = "fail_reason", "skipped", "retry_of", "adopted"
OVERRIDES_ATTR, RUN_ID_ATTR = "overrides", "mlflow_run_id"
OWNER_HOST_ATTR, OWNER_PID_ATTR, OWNER_START_ATTR = "sweeper_host", "sweeper_pid", "sweeper_start"
# Optuna study user attrs: the MLflow parent run, and the config every trial shares (see study.definition).
PARENT_RUN_ATTR, DEFINITION_ATTR = "mlflow_parent_run_id", "definition"


class JobFailed(RuntimeError):
    """The job's training raised; ``error_type`` names the original exception."""

    def __init__(self, error_type: str, message: str, run_id: Optional[str] = None):
        super().__init__(error_type, message, run_id)
        self.error_type, self.message, self.run_id = error_type, message, run_id

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


class JobSkipped(RuntimeError):
    """The config was not run: the feasibility check says it cannot fit in the GPU's free memory."""


class Status(Enum):
    """How a job ended. The value is its word in ``job_result.json``; :attr:`label` the sweep's word for it."""

    OK = "ok"
    FAILED = "failed"
    PRUNED = "pruned"
    SKIPPED = "skipped"

    @property
    def label(self) -> str:
        """As the sweep's lines, summary and parent-run counts (``jobs_finished``...) show it."""
        return "FINISHED" if self is Status.OK else self.name


@dataclass
class JobResult:
    """What one job (or one member of a pack) reports: its status, its run and final metrics (OK: ``objective``
    is the value the run returned, which may be None or NaN: the sweeper decides), or why it did not finish."""

    status: Status
    run_id: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error_type: Optional[str] = None  # FAILED: the exception's type
    message: Optional[str] = None  # FAILED, PRUNED, SKIPPED: why
    traceback: Optional[str] = None  # FAILED in a trial process: where

    @classmethod
    def of_exception(cls, exc: BaseException, traceback: Optional[str] = None) -> JobResult:
        """The result of a job that raised: pruned, skipped, or failed (a :class:`JobFailed` keeps its run)."""
        import optuna

        if isinstance(exc, optuna.TrialPruned):
            return cls(Status.PRUNED, message=str(exc))
        if isinstance(exc, JobSkipped):
            return cls(Status.SKIPPED, message=str(exc))
        if isinstance(exc, JobFailed):
            return cls(Status.FAILED, exc.run_id, error_type=exc.error_type, message=exc.message, traceback=traceback)
        return cls(Status.FAILED, error_type=type(exc).__name__, message=str(exc), traceback=traceback)

    @property
    def reason(self) -> Optional[str]:
        if self.status is Status.FAILED:
            return f"{self.error_type}: {self.message}"
        return self.message

    def to_json(self) -> dict[str, Any]:
        """As ``job_result.json`` and a pack's results hold it: ``{"status": "ok", "run_id", "metrics"}`` or
        ``{"status": "failed" | "pruned" | "skipped", "message", ...}``."""
        data = {key: value for key, value in asdict(self).items() if value is not None and value != {}}
        if self.status is Status.OK:
            data["metrics"] = dict(self.metrics)
        if self.status is Status.FAILED:
            data.setdefault("run_id", None)
        return {**data, "status": self.status.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobResult:
        """Read :meth:`to_json`'s form back; a result without a known status (a pack's trial that never reported)
        is FAILED."""
        known = {key: data.get(key) for key in ("run_id", "error_type", "message", "traceback")}
        status = data.get("status")
        status = Status(status) if status in {s.value for s in Status} else Status.FAILED
        return cls(status, metrics=dict(data.get("metrics") or {}), **known)

    def raise_unless_ok(self) -> dict[str, Any]:
        """An OK result's ``{"run_id", "metrics"}`` (what a job returns to Hydra); else the job's exception."""
        if self.status is Status.OK:
            return {"run_id": self.run_id, "metrics": self.metrics}
        if self.status is Status.PRUNED:
            import optuna

            raise optuna.TrialPruned(self.message)
        if self.status is Status.SKIPPED:
            raise JobSkipped(self.message)
        raise JobFailed(self.error_type or "", self.message or "", self.run_id)


@dataclass
class Outcome:
    """What became of one job, as the sweeper records it."""

    number: int  # job number (grid) or trial number (Optuna)
    overrides: list[str]
    status: Status
    metrics: dict[str, Any] = field(default_factory=dict)
    run_id: Optional[str] = None
    reason: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        """As the parent run's ``summary.json`` lists it, the status by its label."""
        return {**asdict(self), "status": self.status.label}


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
    if ret.status != JobStatus.COMPLETED:  # JobReturn.return_value would re-raise the exception
        return outcome_of(number, shown, JobResult.of_exception(ret._return_value))
    value = ret.return_value
    if isinstance(value, dict) and "metrics" in value:  # src.train.main in a multirun
        return Outcome(number, shown, Status.OK, metrics=dict(value["metrics"]), run_id=value.get("run_id"))
    return Outcome(number, shown, Status.OK, metrics={"objective": value})  # any other task function


def outcome_of(number: int, shown: list[str], result: JobResult) -> Outcome:
    return Outcome(number, shown, result.status, dict(result.metrics), result.run_id, result.reason)


def pack_outcomes(numbers: Sequence[int], overrides: Sequence[Sequence[str]], ret) -> list[Outcome]:
    """Read the JobReturn of a pack (``{"pack": [one JobResult.to_json() per job]}``,
    :func:`src.sweeps.job.run_pack_job`): one Outcome per job; a pack job that raised fails each of its jobs with
    the reason."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.COMPLETED:
        failed = job_outcome(numbers[0], overrides[0], ret)
        return [
            Outcome(n, visible_overrides(o), failed.status, run_id=None, reason=failed.reason)
            for n, o in zip(numbers, overrides)
        ]
    return [
        outcome_of(number, visible_overrides(shown), JobResult.from_json(result))
        for number, shown, result in zip(numbers, overrides, ret.return_value["pack"])
    ]


def pack_stats(ret) -> list[dict[str, Any]]:
    """What each pack of a pack job trained (``{"packs": [...]}`` of :func:`src.sweeps.job.run_pack_job`); none
    where the job raised or its process died before it wrote them."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.COMPLETED or not isinstance(ret.return_value, dict):
        return []
    return list(ret.return_value.get("packs") or [])


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
