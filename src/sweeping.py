"""Sweeps: Hydra multirun grids and Optuna studies, each recorded as one MLflow parent run.

    python -m src.train --multirun lora.r=8,16 lora=attn_qv,all_linear quant=4bit,8bit   # a grid
    python -m src.train -cd sweeps -cn seed_table                                         # explicit rows
    python -m src.train -cd sweeps -cn rank_alpha hydra.sweeper.n_trials=40               # an Optuna study

Two Hydra sweepers, registered in Hydra's ConfigStore under ``hydra/sweeper``:

- ``lora_grid`` (the default in ``conf/config.yaml``): Hydra's basic sweeper (the cartesian product
  of the command line's ``a=1,2`` sweeps) plus ``rows``, a list of explicit jobs.
- ``lora_optuna`` (:mod:`src.sweeping_optuna`): an Optuna study; option names follow
  hydra-optuna-sweeper's (``n_trials``, ``n_jobs``, ``direction``, ``storage``, ``study_name``,
  ``sampler``, ``params``), which pins optuna<3.

Both create the MLflow parent run before launching; each job's run nests under it through the
environment that ``hydra.job.env_set`` gives the job (``LORA_SWEEP_PARENT_RUN_ID``,
``LORA_SWEEP_ID``, read by :func:`src.tracking.tracked_run`). Jobs go through Hydra's launcher,
so the basic, joblib and submitit launchers all work; a job runs in a fresh process unless
``hydra.sweeper.isolate=false`` (:mod:`src.sweeping_trial`). A failing job never stops the sweep
(unless ``max_failure_rate`` is exceeded): it is recorded, the sweep goes on, and at the end a
summary names every failure and the exit code is 1. Parallel jobs (``n_jobs`` / ``max_batch_size``
with a parallel launcher) are pinned to their own GPUs through ``CUDA_VISIBLE_DEVICES``: one each, or
``train.nproc_per_node`` each for a DDP job; a batch holds only as many jobs as the GPUs can take.

Hydra only instantiates sweepers found under the ``hydra_plugins`` namespace: the classes Hydra
sees are the thin subclasses in ``hydra_plugins/lora_sweeps/sweepers.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from omegaconf import MISSING, DictConfig, OmegaConf

from src import console, tracking
from src.config import OBJECTIVE_DEFAULTS
from src.sweep_records import JobFailed, JobSkipped, Outcome, quote  # noqa: F401  quote: the sweepers' API

PLUGIN_MODULE = "hydra_plugins.lora_sweeps.sweepers"


class SweepFailed(CompactHydraException):
    """Raised after the sweep, so the exit code says that jobs failed; the message is the summary."""


# ---------------------------------------------------------------------------------------------
# Configs (hydra/sweeper=lora_grid | lora_optuna); every default lives here
# ---------------------------------------------------------------------------------------------


@dataclass
class FeasibilityConf:
    """Before a job trains, src.plan's peak-memory estimate is compared with its GPU's free memory."""

    mode: str = "shrink"  # off | skip (record the reason, run nothing) | shrink (halve micro-batch, double accum)
    available_gpu_mem_gb: Optional[float] = None  # null: measure the job's GPU (CPU: no check); a number to force one


@dataclass
class GridSweeperConf:
    _target_: str = f"{PLUGIN_MODULE}.GridSweeper"
    params: Optional[dict[str, str]] = None  # like Hydra's basic sweeper: {lora.r: "8,16"}
    rows: Optional[list[str]] = None  # explicit jobs, each the overrides of one job as on the command line
    max_batch_size: Optional[int] = None  # jobs handed to the launcher at once; null: one per GPU (1 on CPU)
    max_failure_rate: float = 1.0  # stop once more than this fraction of all jobs has failed (1.0: never)
    isolate: bool = True  # each job in a fresh process
    feasibility: FeasibilityConf = field(default_factory=FeasibilityConf)


@dataclass
class OptunaSweeperConf:
    _target_: str = f"{PLUGIN_MODULE}.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds the sampler and pruner itself; jobs rebuild the pruner
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "nop"}])
    sampler: Any = MISSING  # hydra/sweeper/sampler: tpe | random | nsgaii, or another optuna.samplers class
    pruner: Any = MISSING  # hydra/sweeper/pruner: nop | median | hyperband, or another optuna.pruners class
    n_trials: int = 20  # trials in the study in total, counting earlier runs of the same study
    n_jobs: int = 1  # trials handed to the launcher at once (parallel with a parallel launcher)
    direction: Any = None  # minimize | maximize; null: the config's objective direction
    directions: Optional[list[Optional[str]]] = None  # multi-objective, one per metric; null items: as above
    metrics: list[str] = field(default_factory=lambda: ["objective"])  # "objective" or final MLflow metrics
    storage: Optional[str] = None  # SQLAlchemy URL or journal file path; null: sqlite:///<project>/optuna.db
    study_name: Optional[str] = None  # null: <config name>-<hash of the command's overrides and search space>
    params: Optional[dict[str, str]] = None  # search space, in Hydra's override grammar: choice(...), interval(...)
    derived: Optional[dict[str, str]] = None  # keys computed from params: {lora.alpha: lora.alpha_ratio * lora.r}
    max_failure_rate: float = 0.5  # stop once more than this fraction of n_trials has failed
    # Several workers on one study (RDB storage only): each RUNNING trial beats every heartbeat_interval
    # seconds; one silent for grace_period (null: 2 x interval) is failed and retried by another worker.
    heartbeat_interval: Optional[int] = None
    grace_period: Optional[int] = None
    isolate: bool = True
    feasibility: FeasibilityConf = field(default_factory=FeasibilityConf)


SAMPLERS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler", "seed": None},
}
PRUNERS = {
    "nop": {"_target_": "optuna.pruners.NopPruner"},
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 0},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1, "reduction_factor": 3},
}


# hydra/launcher=slurm: each trial one SLURM job with one GPU (hydra-submitit-launcher); set
# hydra.launcher.partition=... Start the same command on several nodes with a shared study
# (hydra.sweeper.storage=postgresql+psycopg://..., study_name, heartbeat_interval) to split n_trials.
# hydra/launcher=local: submitit's local executor, a job (process) per trial as on SLURM, no cluster.
LAUNCHERS = {
    "slurm": {
        "defaults": ["submitit_slurm", "_self_"],
        "timeout_min": 720,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": 1,
        "cpus_per_task": 8,
        "mem_gb": 64,
        "array_parallelism": 64,
        "setup": ["export TOKENIZERS_PARALLELISM=false"],
    },
    "local": {"defaults": ["submitit_local", "_self_"], "timeout_min": 120, "gpus_per_node": 0, "cpus_per_task": 1},
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in LAUNCHERS.items():
        cs.store(group="hydra/launcher", name=name, node=node, provider="lora-sweeps")
    cs.store(group="hydra/sweeper", name="lora_grid", node=GridSweeperConf, provider="lora-sweeps")
    cs.store(group="hydra/sweeper", name="lora_optuna", node=OptunaSweeperConf, provider="lora-sweeps")
    for name, node in SAMPLERS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="lora-sweeps")
    for name, node in PRUNERS.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="lora-sweeps")


# ---------------------------------------------------------------------------------------------
# Placement: parallel jobs get their own GPUs (train.nproc_per_node each)
# ---------------------------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """GPU ids as CUDA_VISIBLE_DEVICES would name them (without creating a CUDA context)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def batch_size(requested: Optional[int], gpus: Sequence[str], gpus_per_job: int = 1) -> int:
    """Jobs to launch at once: as requested (default: as many as the GPUs hold, or 1 on CPU), never more
    than the GPUs hold at ``gpus_per_job`` each (``train.nproc_per_node``)."""
    if gpus and gpus_per_job > len(gpus):
        raise ValueError(f"a job needs {gpus_per_job} GPUs (train.nproc_per_node) but only {len(gpus)} are visible")
    fit = len(gpus) // gpus_per_job
    size = requested or max(1, fit)
    if size < 1:
        raise ValueError(f"the batch size must be >= 1, got {requested}")
    return min(size, fit) if gpus else size


def assign_gpus(
    num_jobs: int, gpus: Sequence[str], gpus_per_job: Optional[Sequence[int]] = None
) -> list[Optional[str]]:
    """Each job's CUDA_VISIBLE_DEVICES when launched together: disjoint GPUs, ``gpus_per_job[i]`` of them for
    job i (one each by default); None for all on CPU."""
    if not gpus:
        return [None] * num_jobs
    counts = list(gpus_per_job) if gpus_per_job is not None else [1] * num_jobs
    if sum(counts) > len(gpus):
        raise ValueError(
            f"{num_jobs} parallel jobs need {sum(counts)} GPUs but only {len(gpus)} are visible: jobs would share a GPU"
        )
    starts = [sum(counts[:i]) for i in range(num_jobs)]
    return [",".join(gpus[start : start + count]) for start, count in zip(starts, counts)]


def gpu_batches(gpus_per_job: Sequence[int], size: int, gpus: Sequence[str]) -> list[range]:
    """Consecutive jobs to launch together: at most ``size`` at once, and on GPUs only as many as the GPUs
    hold (job i takes ``gpus_per_job[i]``). A job that needs more GPUs than are visible is an error."""
    batches: list[range] = []
    start = 0
    while start < len(gpus_per_job):
        end, used = start, 0
        while end < len(gpus_per_job) and end - start < size:
            need = gpus_per_job[end]
            if gpus and need > len(gpus):
                raise ValueError(
                    f"job #{end} needs {need} GPUs (train.nproc_per_node) but only {len(gpus)} are visible"
                )
            if gpus and used + need > len(gpus):
                break
            end, used = end + 1, used + need
        batches.append(range(start, end))
        start = end
    return batches


def job_processes(config_loader, config: DictConfig, overrides: Sequence[str]) -> int:
    """``train.nproc_per_node`` of one job (its GPUs), composed as the launcher will compose it."""
    job = config_loader.load_sweep_config(config, list(overrides))
    value = OmegaConf.select(job, "train.nproc_per_node", default=1)
    return value if isinstance(value, int) and value > 1 else 1


# ---------------------------------------------------------------------------------------------
# Job overrides and outcomes
# ---------------------------------------------------------------------------------------------


def env_overrides(env: dict[str, Optional[str]]) -> list[str]:
    """Overrides that set environment variables for one job only (Hydra restores them after)."""
    return [f"++hydra.job.env_set.{key}={quote(value)}" for key, value in env.items() if value is not None]


def visible_overrides(overrides: Sequence[str]) -> list[str]:
    """A job's overrides without the sweep's own (hydra.*), as printed and recorded."""
    return [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]


def grid_jobs(parser: OverridesParser, arguments: Sequence[str], rows: Optional[Sequence[str]]) -> list[list[str]]:
    """Every job of a grid: the cartesian product of the sweeps in ``arguments``, times the rows."""
    # Imported here: Hydra's plugin scan re-executes its core plugin modules, which would make a class
    # imported at module level (or a subclass of it) stale.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = parser.parse_overrides(list(arguments))
    product = BasicSweeper.split_arguments(overrides, None)[0]
    if not rows:
        return product
    swept = {o.get_key_element().lstrip("+~") for o in overrides}
    parsed_rows = []
    for i, row in enumerate(rows):
        items = shlex.split(row)
        for override in parser.parse_overrides(items):
            key = override.get_key_element().lstrip("+~")
            if override.is_sweep_override():
                raise SweepFailed(f"hydra.sweeper.rows[{i}]: {key} is a sweep; a row holds one value per key")
            if key in swept:
                raise SweepFailed(f"hydra.sweeper.rows[{i}] sets {key}, which the command line sets too")
        parsed_rows.append(items)
    return [job + row for job in product for row in parsed_rows]


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


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def objective_direction(config: DictConfig) -> str:
    """The direction of the config's objective: explicit, or the task's default."""
    return config.objective.direction or OBJECTIVE_DEFAULTS[config.data.task][1]


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


def objective_name(config: DictConfig) -> str:
    """The metric behind a job's ``objective`` value (``eval_f1_macro``...): what sweep lines call it."""
    return config.objective.metric or OBJECTIVE_DEFAULTS[config.data.task][0]


# ---------------------------------------------------------------------------------------------
# The parent run, the progress lines and the summary
# ---------------------------------------------------------------------------------------------


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
        prior: Optional[dict[str, int]] = None,
    ):
        """``prior``: the jobs of a resumed sweep that ended before this run of it, by status, so that the
        parent's counts and summary describe the whole sweep."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from src import doctor

        self.kind, self.sweep_id, self.planned = kind, sweep_id, planned
        self.objective = objective_name(config)
        self.outcomes: list[Outcome] = []
        self.prior = {status: n for status, n in (prior or {}).items() if n}
        uri = tracking.tracking_uri(config.tracking.tracking_uri)
        experiment_id = tracking.ensure_experiment(config.tracking.experiment, uri)
        self.uri, self.experiment_id = uri, experiment_id
        for stale in doctor.mark_stale_runs(uri, config.tracking.experiment):
            print(f"[sweep {sweep_id}] marked run {stale.run_id} KILLED: {stale.reason}", flush=True)
        self.client = MlflowClient(uri)
        self.run_id = None
        if resume_run_id:
            try:
                resumed = self._write(self.client.get_run, resume_run_id)
                if resumed.info.lifecycle_stage == "active":
                    self._write(self.client.update_run, resume_run_id, status="RUNNING")
                    for stale in ("error", "error_type"):  # the interruption is over; the run goes on
                        if stale in resumed.data.tags:
                            self._write(self.client.delete_tag, resume_run_id, stale)
                    self.run_id = resume_run_id
            except MlflowException:
                pass  # deleted, or another store: start a new parent run
        if self.run_id is None:
            tags = {"sweep_id": sweep_id, "sweep_kind": kind}
            self.run_id = self._write(self.client.create_run, experiment_id, run_name=run_name, tags=tags).info.run_id
            for key, value in tracking.flatten({"sweep": params}).items():
                self._write(self.client.log_param, self.run_id, key, str(value)[: tracking.MAX_PARAM_LEN])
        for key, value in {**tracking.process_tags(), "planned_jobs": str(planned)}.items():
            self._write(self.client.set_tag, self.run_id, key, value)
        # One click in the UI: this sweep's runs, best first, with their params and metrics as columns.
        swept = [k for k in swept_keys(params) if OmegaConf.select(config, k, default=_ABSENT) is not _ABSENT]
        view = tracking.sweep_view_state(sweep_id, self.objective, objective_direction(config), swept)
        self._write(self.client.set_experiment_tag, experiment_id, tracking.SHARED_VIEW_PREFIX + sweep_id, view)
        self._heartbeat = contextlib.ExitStack()
        self._heartbeat.enter_context(tracking.heartbeat(uri, self.run_id))
        print(f"[sweep {sweep_id}] MLflow parent run {self.run_id} ({uri})", flush=True)

    @staticmethod
    def _write(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return tracking.retry_locked(fn, *args, **kwargs)  # parallel jobs share an SQLite store

    def job_env(self) -> dict[str, str]:
        return {tracking.PARENT_RUN_ENV: self.run_id, tracking.SWEEP_ID_ENV: self.sweep_id}

    def starting(self, number: int, overrides: Sequence[str], gpu: Optional[str]) -> None:
        """Print the launch of one job with its own overrides (Hydra's launch lines, which also show the
        sweep's internal ``hydra.job.env_set`` overrides, are silenced in conf/config.yaml)."""
        label = "trial" if self.kind == "optuna" else "job"
        where = f" on GPU {gpu}" if gpu is not None else ""
        print(f"[sweep {self.sweep_id}] {label} #{number} starting{where}: {' '.join(overrides)}", flush=True)

    def add(self, outcome: Outcome, done: int, best_so_far: Callable[[], BestSoFar]) -> None:
        """Record one outcome and print ``job k/N``: its status, value and the best so far."""
        self.outcomes.append(outcome)
        best, best_value = best_so_far()
        step = sum(self.prior.values()) + len(self.outcomes)  # a resumed sweep's history goes on
        metrics = [_metric(f"jobs_{status.lower()}", count, step) for status, count in self.counts().items()]
        if finite(best_value):
            metrics.append(_metric("best_objective", best_value, step))
        self._write(self.client.log_batch, self.run_id, metrics=metrics)
        label = "trial" if self.kind == "optuna" else "job"
        value = outcome.metrics.get("objective")
        shown = f"{self.objective}={value:.4g}" if finite(value) else (outcome.reason or "")
        line = f"[sweep {self.sweep_id}] {label} {done}/{self.planned} (#{outcome.number}) {outcome.status} {shown}"
        print(line + (f" | best so far: {best}" if best else ""), flush=True)

    def counts(self) -> dict[str, int]:
        statuses = ("FINISHED", "FAILED", "PRUNED", "SKIPPED")
        return {s: self.prior.get(s, 0) + sum(o.status == s for o in self.outcomes) for s in statuses}

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "FAILED"]

    def failure_message(self, stopped: bool) -> str:
        numbers = ", ".join(f"#{o.number}" for o in self.failed())
        why = "stopped: too many failures; " if stopped else ""
        return f"sweep {self.sweep_id}: {why}{len(self.failed())} job(s) failed ({numbers}); see the summary above"

    def summary(self, best: Optional[str]) -> str:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in self.counts().items() if n)
        total = sum(self.counts().values())
        here = f", {len(self.outcomes)} of them in this run of it" if self.prior else " ran here"
        lines = [f"sweep {self.sweep_id}: {total} job(s){here} ({counts or 'none'}); MLflow parent run {self.run_id}"]
        for o in self.outcomes:
            if o.status in ("FAILED", "SKIPPED"):
                run = f" [run {o.run_id}]" if o.run_id else ""
                lines.append(f"  {o.status} #{o.number} {' '.join(o.overrides)}{run}: {(o.reason or '')[:500]}")
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
    ) -> str:
        """Log the summary and artifacts, end the parent run with ``status``, and return the summary."""
        text = self.summary(best)
        payload = {
            "sweep_id": self.sweep_id,
            "kind": self.kind,
            "planned": self.planned,
            "counts": self.counts(),
            "best": best,
            "jobs": [asdict(o) for o in self.outcomes],
        }
        write = self._write
        write(self.client.log_dict, self.run_id, json.loads(json.dumps(payload, default=str)), "summary.json")
        write(self.client.log_text, self.run_id, text + "\n", "summary.txt")
        for name, obj in (artifacts or {}).items():
            write(self.client.log_dict, self.run_id, json.loads(json.dumps(obj, default=str)), name)
        for local, folder in files:
            write(self.client.log_artifact, self.run_id, str(local), folder)
        if best:
            write(self.client.set_tag, self.run_id, "best", best[: tracking.MAX_TAG_LEN])
        self._heartbeat.close()
        write(self.client.set_terminated, self.run_id, status)
        print(text, flush=True)
        return text

    def end_early(self, exc: BaseException) -> None:
        """End the parent run when the sweep itself stops: KILLED on SIGTERM or Ctrl-C, else FAILED."""
        self._heartbeat.close()
        self._write(self.client.set_tag, self.run_id, "error", f"{type(exc).__name__}: {exc}"[: tracking.MAX_TAG_LEN])
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        self._write(self.client.set_terminated, self.run_id, status)


def _metric(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


def final_status(record: SweepRecord, stopped: bool) -> str:
    """FAILED when every job failed or the failure budget stopped the sweep, else FINISHED."""
    ran = record.outcomes
    if stopped or (ran and all(o.status in ("FAILED", "SKIPPED") for o in ran) and record.failed()):
        return "FAILED"
    return "FINISHED"


def failure_budget_exceeded(failed: int, planned: int, max_failure_rate: float) -> bool:
    return max_failure_rate < 1.0 and failed > max_failure_rate * planned


def install_sigterm_handler():
    """SIGTERM raises (as Ctrl-C does), so the sweep records what it was doing before exiting."""
    import signal

    try:
        return signal.signal(signal.SIGTERM, tracking._raise_terminated)
    except ValueError:  # not the main thread
        return None


def restore_sigterm_handler(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# The grid sweeper
# ---------------------------------------------------------------------------------------------


class GridSweeper(Sweeper):
    """Hydra's basic sweeper (cartesian product) plus explicit rows, tolerant of failing jobs."""

    def __init__(
        self,
        params: Optional[dict[str, str]] = None,
        rows: Optional[list[str]] = None,
        max_batch_size: Optional[int] = None,
        max_failure_rate: float = 1.0,
        isolate: bool = True,
        feasibility: Any = None,
    ):
        self.params = dict(params or {})
        self.rows = list(rows or [])
        self.max_batch_size = max_batch_size
        self.max_failure_rate = max_failure_rate
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        params = [f"{key}={value}" for key, value in self.params.items()]
        jobs = grid_jobs(parser, params + list(arguments), self.rows)
        common = set(jobs[0]).intersection(*jobs[1:]) if len(jobs) > 1 else set()  # shown once, not per job
        self.validate_batch_is_legal(jobs)  # every job composes (a typo in a group option) before any runs
        gpus = visible_gpus()  # each job's GPUs (train.nproc_per_node) must fit before anything starts
        size = batch_size(self.max_batch_size, gpus)
        processes = [job_processes(self.hydra_context.config_loader, self.config, job) for job in jobs]
        try:
            batches = gpu_batches(processes, size, gpus)
        except ValueError as exc:
            raise SweepFailed(str(exc)) from exc
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        name = self.config.hydra.job.config_name or "sweep"
        sweep_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        record = SweepRecord(
            kind="grid",
            sweep_id=sweep_id,
            run_name=f"sweep-{sweep_id}",
            config=self.config,
            planned=len(jobs),
            params={"jobs": [" ".join(j) for j in jobs]},
        )
        direction = objective_direction(self.config)
        previous = install_sigterm_handler()
        stopped = False
        returns = []
        try:
            for indices in batches:
                start, batch = indices.start, jobs[indices.start : indices.stop]
                placed = assign_gpus(len(batch), gpus, processes[indices.start : indices.stop])
                overrides = [
                    job + env_overrides({**record.job_env(), "CUDA_VISIBLE_DEVICES": gpu})
                    for job, gpu in zip(batch, placed)
                ]
                for i, gpu in enumerate(placed):
                    record.starting(start + i, [o for o in batch[i] if o not in common], gpu)
                results = self.launcher.launch(overrides, initial_job_idx=start)
                returns.append(results)
                for i, ret in enumerate(results):
                    shown = [o for o in batch[i] if o not in common]
                    record.add(job_outcome(start + i, shown, ret), start + i + 1, lambda: best_line(record, direction))
                if failure_budget_exceeded(len(record.failed()), len(jobs), self.max_failure_rate):
                    stopped = True
                    print(f"[sweep {sweep_id}] stopping: more than {self.max_failure_rate:.0%} of the jobs failed")
                    break
        except BaseException as exc:
            record.end_early(exc)
            raise
        finally:
            restore_sigterm_handler(previous)
        record.finish(final_status(record, stopped), best_line(record, direction)[0])
        if record.failed() or stopped:
            raise SweepFailed(record.failure_message(stopped))
        return returns


def best_line(record: SweepRecord, direction: str) -> BestSoFar:
    """The best finished job by objective: as text, and its value."""
    scored = [o for o in record.outcomes if o.status == "FINISHED" and finite(o.metrics.get("objective"))]
    if not scored:
        return None, None
    pick = max if direction == "maximize" else min
    best = pick(scored, key=lambda o: o.metrics["objective"])
    value = best.metrics["objective"]
    return f"{record.objective}={value:.4g} (#{best.number} {' '.join(best.overrides)}, run {best.run_id})", value


register_configs()
