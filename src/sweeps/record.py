"""The sweep's MLflow parent run: its outcomes, a progress line per job, the closing summary and the final status.

Shared by both sweepers (:mod:`src.sweeps.grid`, :mod:`src.sweeps.study`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from hydra.errors import CompactHydraException
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from src import console, tracking, ui_links
from src.config import OBJECTIVE_DEFAULTS, ConfigError
from src.sweeps.outcomes import (
    BEST_TAG,
    ERROR_TAG,
    ERROR_TYPE_TAG,
    PLANNED_TAG,
    SWEEP_ID_TAG,
    SWEEP_KIND_TAG,
    Outcome,
    Status,
    finite,
)
from src.sweeps.stale import mark_stale_runs

# The sweep's own lines: each job's launch and outcome, the summary. They are the sweep command's output, on
# stdout (errors on stderr), through a logger of their own: Hydra's logging setup for each in-process job resets the
# handlers of every logger below ``src``, so :func:`show` attaches its handler again when it is gone.
log = logging.getLogger("src.sweeps")


class _Streams(logging.Handler):
    """INFO to stdout, WARNING and above to stderr: the streams of the moment (a test may swap them)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


_HANDLER = _Streams()


def show(line: str, level: int = logging.INFO) -> None:
    """One line of the sweep's output (:data:`log`)."""
    if _HANDLER not in log.handlers:
        log.addHandler(_HANDLER)
        log.setLevel(logging.INFO)
        log.propagate = False
    log.log(level, line)


class SweepFailed(CompactHydraException):
    """Raised after the sweep, so the exit code says that jobs failed; the message is the summary."""


def _task_defaults(config: DictConfig) -> tuple[str, str]:
    """The task's default objective (metric, direction); the sweeper reads it before any job validates its config,
    so a missing or unknown ``data.task`` (``data=file`` without it) is a ConfigError here, not a traceback."""
    task = OmegaConf.select(config, "data.task", default=None, throw_on_missing=False)
    if task not in OBJECTIVE_DEFAULTS:
        raise ConfigError(
            [f"data.task: {'missing' if task is None else repr(task)}; one of {list(OBJECTIVE_DEFAULTS)}"]
        )
    return OBJECTIVE_DEFAULTS[task]


def objective_direction(config: DictConfig) -> str:
    """The direction of the config's objective: explicit, or the task's default."""
    return config.objective.direction or _task_defaults(config)[1]


_ABSENT = object()


def swept_keys(params: dict[str, Any]) -> list[str]:
    """The config keys a sweep varies, from its parent's params: a grid's job overrides or a study's space.
    Group choices (``quant=8bit``) are left out: their effect shows in fixed columns (``quant.bits``)."""
    if "jobs" in params:  # the keys whose value differs between jobs (every job repeats the command line's)
        values: dict[str, set[str]] = {}
        for job in params["jobs"]:
            for override in job.split():
                key, _, value = override.partition("=")
                values.setdefault(key.lstrip("+~"), set()).add(value)
        keys = [k for k, seen in values.items() if len(seen) > 1 or len(params["jobs"]) == 1]
    else:
        keys = list(params.get("space") or {})
    return [k for k in dict.fromkeys(keys) if "." in k and not k.startswith("hydra.")]


def named_keys(params: dict[str, Any], config: DictConfig) -> list[str]:
    """The config keys that tell a sweep's runs apart, for their names (:func:`src.tracking.run_name`): those
    whose value differs between a grid's jobs, a study's searched and derived keys. A grid of one job has none."""
    if len(params.get("jobs", ["", ""])) < 2:
        return []
    keys = [*swept_keys(params), *(params.get("derived") or {})]
    return [k for k in dict.fromkeys(keys) if OmegaConf.select(config, k, default=_ABSENT) is not _ABSENT]


def objective_name(config: DictConfig) -> str:
    """The metric behind a job's ``objective`` value (``eval_f1_macro``...): what sweep lines call it."""
    return config.objective.metric or _task_defaults(config)[0]


BestSoFar = tuple[Optional[str], Optional[float]]  # as text, and the best objective value (one objective)


class SweepRecord:
    """The sweep's MLflow parent run, its outcomes, a progress line per job and the closing summary.

    The parent run carries ``src.tracking``'s process tags and heartbeat, so ``src.doctor`` can
    close it if the sweep is killed outright; runs that a killed sweep left RUNNING are closed
    here, when the next sweep starts.
    """

    def __init__(
        self,
        *,
        kind: str,
        sweep_id: str,
        run_name: str,
        config: DictConfig,
        planned: int,
        params: dict[str, Any],
        resume_run_id: Optional[str] = None,
        prior: Optional[dict[Status, int]] = None,
    ):
        """``prior``: the jobs of a resumed sweep that ended before this run of it, by status, so that the
        parent's counts and summary describe the whole sweep."""
        self.kind, self.sweep_id, self.planned = kind, sweep_id, planned
        self.objective = objective_name(config)
        self.outcomes: list[Outcome] = []
        self.packs: list[dict[str, Any]] = []  # what each pack process trained (pack_ended), in order
        self.prior = {status: n for status, n in (prior or {}).items() if n}
        uri = tracking.tracking_uri(config.tracking.tracking_uri)
        experiment_id = tracking.ensure_experiment(config.tracking.experiment, uri)
        self.uri, self.experiment_id = uri, experiment_id
        for stale in mark_stale_runs(uri, config.tracking.experiment):
            show(f"[sweep {sweep_id}] marked run {stale.run_id} KILLED: {stale.reason}")
        self.client = MlflowClient(uri)
        self.run_id = self._resumed(resume_run_id) if resume_run_id else None
        if self.run_id is None:
            tags = {SWEEP_ID_TAG: sweep_id, SWEEP_KIND_TAG: kind}
            self.run_id = self._write(self.client.create_run, experiment_id, run_name=run_name, tags=tags).info.run_id
            for key, value in tracking.flatten({"sweep": params}).items():
                self._write(self.client.log_param, self.run_id, key, str(value)[: tracking.MAX_PARAM_LEN])
        for key, value in {**tracking.process_tags(), PLANNED_TAG: str(planned)}.items():
            self._write(self.client.set_tag, self.run_id, key, value)
        self.named = named_keys(params, config)
        self._save_view(config, params)
        self._heartbeat = contextlib.ExitStack()
        self._heartbeat.enter_context(tracking.heartbeat(uri, self.run_id))
        show(f"[sweep {sweep_id}] MLflow parent run {self.run_id} ({uri})")

    def _resumed(self, run_id: str) -> Optional[str]:
        """The parent run of an earlier run of this sweep, RUNNING again; None if it is deleted or elsewhere."""
        try:
            resumed = self._write(self.client.get_run, run_id)
            if resumed.info.lifecycle_stage != "active":
                return None
            self._write(self.client.update_run, run_id, status="RUNNING")
            for stale in (ERROR_TAG, ERROR_TYPE_TAG):  # the interruption is over; the run goes on
                if stale in resumed.data.tags:
                    self._write(self.client.delete_tag, run_id, stale)
            return run_id
        except MlflowException:
            return None  # deleted, or another store: start a new parent run

    def _save_view(self, config: DictConfig, params: dict[str, Any]) -> None:
        """One click in the UI: this sweep's runs, best first, with their params and metrics as columns."""
        swept = [k for k in swept_keys(params) if OmegaConf.select(config, k, default=_ABSENT) is not _ABSENT]
        view = ui_links.sweep_view_state(self.sweep_id, self.objective, objective_direction(config), swept)
        view_tag = ui_links.SHARED_VIEW_PREFIX + ui_links.sweep_view_key(self.sweep_id)
        self._write(self.client.set_experiment_tag, self.experiment_id, view_tag, view)

    @staticmethod
    def _write(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return tracking.retry_locked(fn, *args, **kwargs)  # parallel jobs share an SQLite store

    def job_env(self) -> dict[str, str]:
        return {
            tracking.PARENT_RUN_ENV: self.run_id,
            tracking.SWEEP_ID_ENV: self.sweep_id,
            tracking.SWEEP_KEYS_ENV: ",".join(self.named),
        }

    def starting(self, number: int, overrides: Sequence[str], gpu: Optional[str]) -> None:
        """Print the launch of one job with its own overrides (Hydra's launch lines, which also show the
        sweep's internal ``hydra.job.env_set`` overrides, are silenced in conf/config.yaml)."""
        where = f" on GPU {gpu}" if gpu is not None else ""
        show(f"[sweep {self.sweep_id}] {self.label} #{number} starting{where}: {' '.join(overrides)}")

    def add(self, outcome: Outcome, done: int, best_so_far: Callable[[], BestSoFar]) -> None:
        """Record one outcome and print ``job k/N``: its status, value and the best so far."""
        self.outcomes.append(outcome)
        best, best_value = best_so_far()
        step = sum(self.prior.values()) + len(self.outcomes)  # a resumed sweep's history goes on
        metrics = [_metric(f"jobs_{status.label.lower()}", count, step) for status, count in self.counts().items()]
        if finite(best_value):
            metrics.append(_metric("best_objective", best_value, step))
        self._write(self.client.log_batch, self.run_id, metrics=metrics)
        value = outcome.metrics.get("objective")
        shown = f"{self.objective}={value:.4g}" if finite(value) else (outcome.reason or "")
        status = outcome.status.label
        line = f"[sweep {self.sweep_id}] {self.label} {done}/{self.planned} (#{outcome.number}) {status} {shown}"
        show(line + (f" | best so far: {best}" if best else ""))

    def pack_ended(self, stats: dict[str, Any]) -> None:
        """Print and log what one pack trained on its one base load (:meth:`src.packs.model.Pack.stats`): the
        parent run's ``pack_processes`` and ``pack_trials_trained`` metrics, and ``summary.json``'s ``packs``."""
        self.packs.append(stats)
        step = len(self.packs)
        trained = sum(int(p.get("trained", 0)) for p in self.packs)
        metrics = [_metric("pack_processes", step, step), _metric("pack_trials_trained", trained, step)]
        self._write(self.client.log_batch, self.run_id, metrics=metrics)
        show(f"[sweep {self.sweep_id}] pack {step}: {pack_line(stats)}")

    @property
    def label(self) -> str:
        """What the sweep's lines call one job."""
        return "trial" if self.kind == "optuna" else "job"

    def counts(self) -> dict[Status, int]:
        return {s: self.prior.get(s, 0) + sum(o.status is s for o in self.outcomes) for s in Status}

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is Status.FAILED]

    def failure_message(self, stopped: bool) -> str:
        numbers = ", ".join(f"#{o.number}" for o in self.failed())
        why = "stopped: too many failures; " if stopped else ""
        return f"sweep {self.sweep_id}: {why}{len(self.failed())} job(s) failed ({numbers}); see the summary above"

    def summary(self, best: Optional[str]) -> str:
        counts = ", ".join(f"{n} {s.label.lower()}" for s, n in self.counts().items() if n)
        total = sum(self.counts().values())
        here = f", {len(self.outcomes)} of them in this run of it" if self.prior else " ran here"
        lines = [f"sweep {self.sweep_id}: {total} job(s){here} ({counts or 'none'}); MLflow parent run {self.run_id}"]
        for o in self.outcomes:
            if o.status in (Status.FAILED, Status.SKIPPED):
                run = f" [run {o.run_id}]" if o.run_id else ""
                lines.append(f"  {o.status.label} #{o.number} {' '.join(o.overrides)}{run}: {(o.reason or '')[:500]}")
        if self.packs:
            trained = ", ".join(str(p.get("trained", 0)) for p in self.packs)
            lines.append(f"  packs: {len(self.packs)} base load(s), trials trained by each: {trained}")
        if best:
            lines.append(f"  best: {best}")
        lines.append(f"  view: {console.view_hint(self.uri, self.experiment_id, self.run_id)}")
        lines.append(f"  compare in the UI: {console.sweep_view_hint(self.uri, self.experiment_id, self.sweep_id)}")
        return "\n".join(lines)

    def finish(
        self,
        status: str,
        best: Optional[str],
        artifacts: Optional[dict[str, Any]] = None,
        files: Sequence[tuple[Path, Optional[str]]] = (),
        metrics: Optional[dict[str, float]] = None,
    ) -> str:
        """Log the summary, artifacts and ``metrics``, end the parent run with ``status``, and return the summary."""
        text = self.summary(best)
        payload = {
            "sweep_id": self.sweep_id,
            "kind": self.kind,
            "planned": self.planned,
            "counts": {s.label: n for s, n in self.counts().items()},
            "best": best,
            "jobs": [o.to_json() for o in self.outcomes],
            "packs": self.packs,
        }
        write = self._write
        write(self.client.log_dict, self.run_id, json.loads(json.dumps(payload, default=str)), "summary.json")
        write(self.client.log_text, self.run_id, text + "\n", "summary.txt")
        for name, obj in (artifacts or {}).items():
            write(self.client.log_dict, self.run_id, json.loads(json.dumps(obj, default=str)), name)
        for local, folder in files:
            write(self.client.log_artifact, self.run_id, str(local), folder)
        if metrics:
            write(self.client.log_batch, self.run_id, metrics=[_metric(k, v, 0) for k, v in metrics.items()])
        if best:
            write(self.client.set_tag, self.run_id, BEST_TAG, best[: tracking.MAX_TAG_LEN])
        self._heartbeat.close()
        write(self.client.set_terminated, self.run_id, status)
        show(text)
        return text

    def end_early(self, exc: BaseException) -> None:
        """End the parent run when the sweep itself stops: KILLED on SIGTERM or Ctrl-C, else FAILED."""
        self._heartbeat.close()
        self._write(self.client.set_tag, self.run_id, ERROR_TAG, f"{type(exc).__name__}: {exc}"[: tracking.MAX_TAG_LEN])
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        self._write(self.client.set_terminated, self.run_id, status)


def pack_line(stats: dict[str, Any]) -> str:
    """One pack's stats as the sweep prints them."""
    line = (
        f"trained {stats.get('trained', 0)} trial(s) in {stats.get('slots', '?')} slot(s) on one base load; "
        f"{stats.get('joint_steps', 0)} joint steps of {stats.get('trials_per_step', 0):.2f} trials on average, "
        f"{stats.get('padding_share', 0.0):.1%} of their tokens padding, {stats.get('wall_s', 0.0):.1f} s"
    )
    return line


def _metric(key: str, value: float, step: int):
    return Metric(key, float(value), int(time.time() * 1000), step)


def final_status(record: SweepRecord, stopped: bool) -> str:
    """FAILED when every job failed or the failure budget stopped the sweep, else FINISHED."""
    ran = record.outcomes
    if stopped or (ran and all(o.status in (Status.FAILED, Status.SKIPPED) for o in ran) and record.failed()):
        return "FAILED"
    return "FINISHED"


def failure_budget_exceeded(failed: int, planned: int, max_failure_rate: float) -> bool:
    return max_failure_rate < 1.0 and failed > max_failure_rate * planned


def install_sigterm_handler():
    """SIGTERM raises (as Ctrl-C does), so the sweep records what it was doing before exiting."""
    try:
        return signal.signal(signal.SIGTERM, tracking._raise_terminated)
    except ValueError:  # not the main thread
        return None


def restore_sigterm_handler(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
