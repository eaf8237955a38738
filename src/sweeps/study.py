"""The Optuna sweeper: a study driven by ``--multirun``, with resume, pruning and failure tolerance.

    python -m src.train -cd sweeps -cn rank_alpha                     # run (or continue) the study
    python -m src.train -cd sweeps -cn rank_alpha hydra.sweeper.n_trials=60   # ... up to 60 trials
    optuna-dashboard sqlite:///optuna.db                               # watch it (beside mlflow.db)

The search space is ``hydra.sweeper.params`` plus the command line's sweeps, in Hydra's override
grammar: ``choice(4,8,16)`` or ``4,8,16`` (categorical), ``range(1,9,2)`` (stepped), ``interval(0,0.1)``
and ``tag(log, interval(1e-5,1e-3))`` (continuous). A param that is not a config key is a sweep
variable that only feeds ``derived`` (``lora.alpha: lora.alpha_ratio * lora.r``).

Resume: the study lives in ``storage`` (by default ``optuna.db`` beside the MLflow store:
:func:`src.trial.default_storage`) under ``study_name`` (by default the config name plus a
hash of the command's overrides and search space), so re-running a command continues its study
and ``n_trials`` counts every trial it ever ran. A config that already finished (completed, pruned
or failed) is not run again: a repeated proposal is answered from the earlier trial, marked
``duplicate_of`` and not counted. A trial left RUNNING by a sweep that was killed (its process is
gone), or interrupted by SIGTERM or Ctrl-C, is failed and retried with the same params.

Several workers, one study: start the same command on many machines with a shared RDB ``storage``
(``postgresql+psycopg://...``), a fixed ``study_name`` and ``heartbeat_interval``. ``n_trials`` is
the study's total: a trial is taken only while fewer than ``n_trials`` older trials are done, running
or queued, so 4 workers with n_trials=20 run exactly 20. A worker with nothing left to take waits
for the others, and fails and retries a trial whose worker stopped beating (``kill -9``, a lost
node) after ``grace_period``. The worker that creates the study creates the MLflow parent run; the
others log their trials under it.

Trials are told to Optuna from the job's outcome: FINISHED -> COMPLETE (a missing, None or NaN
value -> FAIL), PRUNED -> PRUNED, FAILED and SKIPPED -> FAIL, with the reason in the trial's user
attr ``fail_reason``. The parent run gets best params and value (``best.json``), the Pareto front
(``pareto_front.json``) for several objectives, ``trials.csv``, and Optuna's plots under ``plots/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from src import tracking
from src.config import config_changes
from src.config_rules import domain_problems
from src.names import filter_value, text_problem
from src.sweeps import grouping
from src.sweeps.configs import OptunaSweeperConf, unvetted_targets, vet
from src.sweeps.outcomes import Outcome, env_overrides, finite, job_outcome, pack_outcomes
from src.sweeps.placement import assign_gpus, batch_size, job_processes, visible_gpus
from src.sweeps.record import (
    SweepFailed,
    SweepRecord,
    failure_budget_exceeded,
    install_sigterm_handler,
    objective_direction,
    objective_name,
    restore_sigterm_handler,
)
from src.trial import (
    PRUNER_ATTR,
    STORAGE_ENV,
    STUDY_ENV,
    TRIAL_ENV,
    build_pruner,
    default_storage,
    open_storage,
    opening_study,
    pruner_spec,
)

# Consecutive proposals of configs already tried before the space is taken as exhausted.
MAX_DUPLICATE_PROPOSALS = 50
PARENT_RUN_ATTR = "mlflow_parent_run_id"
# Study user attr: the config every trial of the study shares (OptunaSweeper.definition), so that a sweep that
# joins the study with another one is refused instead of ranking trials of two configurations together.
DEFINITION_ATTR = "definition"
# Keys that change where results go or how fast a trial runs, not what it trains or how it is scored.
NOT_DEFINING = (
    "tracking.",
    "output_dir",
    "train.resume_from_checkpoint",
    "train.dataloader_num_workers",
    "train.per_device_eval_batch_size",
    "train.memory_budget_gb",
    "data.num_sample_prompts",
)
# Trial user attrs naming the sweep process that runs it: host, pid and its start (src.tracking.process_start).
OWNER_HOST_ATTR, OWNER_PID_ATTR, OWNER_START_ATTR = "sweeper_host", "sweeper_pid", "sweeper_start"
# A worker with no trial left to take polls this often (seconds) for the others' outcomes.
WAIT_POLL_S = 2.0
# How long a worker that joins a study waits for the creator's MLflow parent run id.
PARENT_WAIT_S = 120.0


# ---------------------------------------------------------------------------------------------
# The search space
# ---------------------------------------------------------------------------------------------


def distribution(override: Override):
    """The Optuna distribution of a sweep override (choice, range, interval, tag(log, ...))."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key = override.get_key_element()
    if override.is_choice_sweep():
        values = [
            v if v is None or isinstance(v, (int, float, bool)) else Transformer.str(v)
            for v in override.sweep_iterator()
        ]
        return CategoricalDistribution(values)
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        sweep = override.value()
        if all(isinstance(v, int) for v in values):
            return IntDistribution(min(values), max(values), step=abs(int(sweep.step)))
        return FloatDistribution(min(values), max(values), step=abs(float(sweep.step)))
    if override.is_interval_sweep():
        sweep = override.value()
        log = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    raise SweepFailed(f"{key}: unsupported sweep {override.input_line!r}")


def search_space(parser: OverridesParser, params: Optional[dict], arguments: list[str]) -> tuple[dict, list[str]]:
    """(name -> distribution, fixed overrides): ``params`` from the config, then the command line's."""
    items = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides(items):  # later items win, as on Hydra's command line
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = f"{key}={override.get_value_element_as_str()}"
    return space, list(fixed.values())


def evaluate_derived(expression: str, params: dict[str, Any]) -> Any:
    """A product of params and numbers, e.g. ``lora.alpha_ratio * lora.r``; integral results are ints."""
    value: float = 1.0
    for factor in expression.split("*"):
        factor = factor.strip()
        if factor in params:
            value *= params[factor]
        else:
            try:
                value *= float(factor)
            except ValueError:
                raise SweepFailed(
                    f"hydra.sweeper.derived: {factor!r} in {expression!r} is neither a param "
                    f"nor a number (params: {', '.join(params)})"
                ) from None
    return int(value) if float(value).is_integer() else value


def trial_overrides(params: dict[str, Any], variables: set[str], derived: dict[str, str]) -> list[str]:
    """A trial's overrides: its params (sweep variables left out) and the derived keys."""
    out = []
    for key, value in params.items():
        if key not in variables:
            out.append(f"{key}={value if isinstance(value, str) else Transformer.str(value)}")
    for key, expression in derived.items():
        out.append(f"{key}={evaluate_derived(expression, params)}")
    return out


# ---------------------------------------------------------------------------------------------
# Study bookkeeping: which trials count, duplicates, interrupted trials
# ---------------------------------------------------------------------------------------------


SAMPLERS = (
    "TPESampler",
    "RandomSampler",
    "NSGAIISampler",
    "NSGAIIISampler",
    "CmaEsSampler",
    "GPSampler",
    "QMCSampler",
    "GridSampler",
    "BruteForceSampler",
)  # the classes hydra.sweeper.sampler may name


def build_sampler(conf: dict):
    """The Optuna sampler of ``hydra.sweeper.sampler``: a class of :data:`SAMPLERS`, called with the other keys as
    plain values. Nothing in them is built: a ``_target_`` at any depth, or another ``_``-key, is refused."""
    import optuna

    target = str(conf.get("_target_", ""))
    name = target.removeprefix("optuna.samplers.")
    if target != f"optuna.samplers.{name}" or name not in SAMPLERS:
        raise SweepFailed(f"hydra.sweeper.sampler: {target!r} is not one of optuna.samplers' {', '.join(SAMPLERS)}")
    kwargs = {k: v for k, v in conf.items() if k != "_target_"}
    odd = [f"hydra.sweeper.sampler.{k}" for k in kwargs if str(k).startswith("_")]
    odd += unvetted_targets(kwargs, "hydra.sweeper.sampler")
    if odd:
        raise SweepFailed(f"hydra.sweeper.sampler: {', '.join(odd)}: arguments are plain values, never code to build")
    return getattr(optuna.samplers, name)(**kwargs)


def counted(trial) -> bool:
    """A trial that reached its own outcome: not a duplicate, not interrupted (those are retried)."""
    from optuna.trial import TrialState

    if "duplicate_of" in trial.user_attrs or "over_budget" in trial.user_attrs:
        return False
    if trial.state == TrialState.FAIL:
        return "fail_reason" in trial.user_attrs
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def prior_counts(study) -> dict[str, int]:
    """The study's trials that reached their outcome before this sweep started, by the sweep's statuses."""
    from optuna.trial import TrialState

    counts = {"FINISHED": 0, "FAILED": 0, "PRUNED": 0, "SKIPPED": 0}
    for trial in study.get_trials(deepcopy=False):
        if counted(trial):
            if trial.state == TrialState.COMPLETE:
                counts["FINISHED"] += 1
            elif trial.state == TrialState.PRUNED:
                counts["PRUNED"] += 1
            else:
                counts["SKIPPED" if trial.user_attrs.get("skipped") else "FAILED"] += 1
    return counts


def occupies(trial) -> bool:
    """Whether a trial takes one of the study's ``n_trials`` places: done, running or queued."""
    from optuna.trial import TrialState

    if counted(trial):
        return True
    skipped = "duplicate_of" in trial.user_attrs or "over_budget" in trial.user_attrs
    return trial.state in (TrialState.RUNNING, TrialState.WAITING) and not skipped


def in_budget(trial_number: int, trials: list, n_trials: int) -> bool:
    """Whether a just-asked trial is within ``n_trials``: fewer than that many older trials occupy a place.

    Trial numbers are given out atomically by the storage, so workers that ask at the same time
    agree on which of their trials fit.
    """
    return sum(occupies(t) for t in trials if t.number < trial_number) < n_trials


def fail_stale(study) -> None:
    """Fail (and, through the storage's callback, enqueue again) trials whose worker stopped beating."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def owner_alive(trial) -> bool:
    """Whether the sweep process that runs a RUNNING trial is still alive: the same host, pid and process start
    (a pid reused by another process is not the sweep). Unknown hosts and other containers: assumed alive."""
    attrs = trial.user_attrs
    host, pid = attrs.get(OWNER_HOST_ATTR), attrs.get(OWNER_PID_ATTR)
    if host is None or pid is None:
        return False
    if host != socket.gethostname():
        return True
    alive = tracking.same_process(int(pid), attrs.get(OWNER_START_ATTR))
    if alive is not None:
        return alive
    if attrs.get(OWNER_START_ATTR):
        return True  # recorded in another pid namespace: not ours to judge
    try:  # a trial of a sweeper that recorded no start
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def set_owner(trial) -> None:
    """Mark a trial as run by this sweep process (:func:`owner_alive`)."""
    trial.set_user_attr(OWNER_HOST_ATTR, socket.gethostname())
    trial.set_user_attr(OWNER_PID_ATTR, os.getpid())
    trial.set_user_attr(OWNER_START_ATTR, tracking.process_start(os.getpid()) or "")


def recover_interrupted(study, finished: Optional[dict[int, list[float]]] = None) -> list[int]:
    """Settle the trials a killed sweep left RUNNING, and enqueue every interrupted trial once more.

    ``finished``: trial number -> values of the trials whose MLflow run FINISHED (a trial can end after its
    sweep died). Those are adopted as COMPLETE with their run's values instead of being trained again; the
    others are failed and retried."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if owner_alive(trial):
            continue
        values = (finished or {}).get(trial.number)
        if values is not None:
            study._storage.set_trial_user_attr(trial._trial_id, "adopted", "its run FINISHED after the sweep stopped")
            study.tell(trial.number, values if len(values) > 1 else values[0])
        else:
            study.tell(trial.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    # retry_of: enqueued here; failed_trial: by the heartbeat's RetryFailedTrialCallback
    retried = {t.user_attrs.get("retry_of") for t in trials} | {t.system_attrs.get("failed_trial") for t in trials}
    interrupted = [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and "fail_reason" not in t.user_attrs
        and "duplicate_of" not in t.user_attrs
        and "over_budget" not in t.user_attrs
        and t.number not in retried
    ]
    for trial in interrupted:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return [t.number for t in interrupted]


# ---------------------------------------------------------------------------------------------
# The sweeper
# ---------------------------------------------------------------------------------------------


class OptunaSweeper(Sweeper):
    """Ask Optuna for trials, launch them through Hydra's launcher, tell Optuna what happened."""

    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        n_trials: int,
        n_jobs: int,
        direction: Any = None,
        directions: Optional[list] = None,
        metrics: Optional[list[str]] = None,
        storage: Optional[str] = None,
        study_name: Optional[str] = None,
        params: Optional[dict] = None,
        derived: Optional[dict] = None,
        max_failure_rate: float = 0.5,
        heartbeat_interval: Optional[int] = None,
        grace_period: Optional[int] = None,
        isolate: bool = True,
        feasibility: Any = None,
        pack: int = 1,
    ):
        settings = {"n_trials": n_trials, "n_jobs": n_jobs, "max_failure_rate": max_failure_rate, "pack": pack}
        settings |= {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period}
        problems = domain_problems(OptunaSweeperConf, {**settings, "feasibility": feasibility or {}}, "hydra.sweeper.")
        if problems:
            raise SweepFailed("; ".join(problems))
        self.pack = pack
        self.sampler_conf, self.pruner_conf = sampler, pruner
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.direction, self.directions = direction, directions
        self.metrics = list(metrics or ["objective"])
        self.storage = storage  # null: set up beside the config's MLflow store (default_storage)
        self.storage_given = storage is not None
        self.study_name = study_name
        self.params = dict(params or {})
        self.derived = dict(derived or {})
        self.max_failure_rate = max_failure_rate
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context = None
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        vet(config)  # before the launcher, sampler or pruner is built (also for a config without the callback)
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        if not self.storage_given:
            self.storage = default_storage(tracking.tracking_uri(config.tracking.tracking_uri))

    # -- configuration ------------------------------------------------------------------------

    def resolved_directions(self) -> list[str]:
        if self.direction is not None and self.directions is not None:
            raise SweepFailed("hydra.sweeper: set direction or directions, not both")
        given = self.directions if self.directions is not None else self.direction
        if given is None or isinstance(given, str):
            given = [given]
        given = list(given)
        if len(given) != len(self.metrics):
            raise SweepFailed(
                f"hydra.sweeper: {len(given)} direction(s) for {len(self.metrics)} metric(s) "
                f"{self.metrics}; give one direction per metric"
            )
        default = objective_direction(self.config)
        out = [d or default for d in given]
        bad = [d for d in out if d not in ("minimize", "maximize")]
        if bad:
            raise SweepFailed(f"hydra.sweeper.direction(s): expected minimize or maximize, got {bad}")
        return out

    def default_study_name(self, arguments: list[str], directions: list[str]) -> str:
        digest = hashlib.sha1(
            json.dumps(
                {
                    "overrides": sorted(arguments),
                    "params": self.params,
                    "derived": self.derived,
                    "metrics": self.metrics,
                    "directions": directions,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:8]
        return f"{self.config.hydra.job.config_name or 'study'}-{digest}"

    def definition(self, space: dict, fixed: list[str], directions: list[str]) -> Optional[dict[str, Any]]:
        """What defines the study: a trial's resolved config (the fixed overrides applied), less the searched and
        derived keys (and what lies under a searched group) and :data:`NOT_DEFINING`, plus the metrics, their
        directions and the derived expressions. As JSON would store it; None if the overrides do not compose
        (each trial then fails with Hydra's own error)."""
        try:
            job = self.hydra_context.config_loader.load_sweep_config(self.config, list(fixed))
        except Exception:  # noqa: BLE001
            return None
        raw = OmegaConf.to_container(job, resolve=False)
        raw.pop("hydra", None)
        raw.pop("output_dir", None)
        flat = tracking.flatten(OmegaConf.to_container(OmegaConf.create(raw), resolve=True))
        searched = {k.lstrip("+~") for k in [*space, *self.derived]}
        kept = {
            k: v
            for k, v in flat.items()
            if not k.startswith(NOT_DEFINING) and not any(k == s or k.startswith(f"{s}.") for s in searched)
        }
        kept.update(
            {
                "hydra.sweeper.metrics": self.metrics,
                "hydra.sweeper.directions": directions,
                "hydra.sweeper.derived": self.derived,
            }
        )
        return json.loads(json.dumps(kept, default=str))

    def sweep_variables(self, space: dict) -> set[str]:
        """Params that are not config keys: allowed only when a derived expression uses them."""
        variables = {k for k in space if OmegaConf.select(self.config, k.lstrip("+~"), default=KeyError) is KeyError}
        used = {f.strip() for e in self.derived.values() for f in e.split("*")}
        unused = sorted(variables - used)
        if unused:
            raise SweepFailed(
                f"hydra.sweeper.params: {', '.join(unused)} not in the config (a typo?); a param "
                f"that is not a config key must feed hydra.sweeper.derived"
            )
        return variables

    def finished_trials(self, study_name: str) -> dict[int, list[float]]:
        """Trial number -> metric values, for the study's trials whose MLflow run FINISHED."""
        import mlflow

        uri = tracking.tracking_uri(self.config.tracking.tracking_uri)
        # Through the store lock: the workers of a shared study start at once, and a fresh SQLite store whose
        # tables two of them create together fails its migration in one ("expected to match one row").
        experiment_id = tracking.ensure_experiment(self.config.tracking.experiment, uri)
        client = mlflow.MlflowClient(uri)
        runs = tracking.retry_locked(
            client.search_runs,
            [experiment_id],
            filter_string=f"tags.optuna_study = {filter_value(study_name)} and attributes.status = 'FINISHED'",
            max_results=50000,
        )
        out = {}
        for run in runs:
            values = [run.data.metrics.get(m) for m in self.metrics]
            if "optuna_trial" in run.data.tags and all(finite(v) for v in values):
                out[int(run.data.tags["optuna_trial"])] = values
        return out

    def open_study(self, name: str, directions: list[str], definition: Optional[dict[str, Any]]) -> tuple[Any, bool]:
        """The study, and whether this worker created it (then it also creates the MLflow parent run). A study
        recorded with another ``definition`` (:meth:`definition`) is refused, naming the keys, before it is
        changed in any way."""
        import optuna

        sampler = build_sampler(OmegaConf.to_container(self.sampler_conf, resolve=True))
        try:
            spec = pruner_spec(OmegaConf.to_container(self.pruner_conf, resolve=True))
        except ValueError as exc:
            raise SweepFailed(str(exc)) from exc
        pruner = build_pruner(spec)
        with opening_study(self.storage):
            storage = open_storage(self.storage, self.heartbeat_interval, self.grace_period)
            try:
                study = optuna.create_study(
                    study_name=name, storage=storage, sampler=sampler, pruner=pruner, directions=directions
                )
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
                created = False
            stored = study.user_attrs.get(DEFINITION_ATTR)
            changes = config_changes(stored, definition) if isinstance(stored, dict) and definition is not None else []
            if changes:
                raise SweepFailed(
                    f"study {name!r} in {self.storage} was run with another configuration; its trials would be "
                    f"ranked with this sweep's ({len(changes)} key(s) differ, study vs this sweep): "
                    + "; ".join(changes)
                    + ". Name another study (hydra.sweeper.study_name), or leave it unset for one named after the "
                    "overrides."
                )
            if stored is None and definition is not None:
                study.set_user_attr(DEFINITION_ATTR, definition)
            study.set_user_attr(PRUNER_ATTR, spec)  # plain data: each trial rebuilds it with build_pruner
            with warnings.catch_warnings():  # optuna-dashboard shows these names instead of "Objective 0"
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                names = [objective_name(self.config) if m == "objective" else m for m in self.metrics]
                study.set_metric_names(names)
        return study, created

    @staticmethod
    def parent_run_id(study, created: bool) -> Optional[str]:
        """The study's MLflow parent run; a worker that joined a new study waits for its creator's."""
        deadline = time.monotonic() + (0 if created else PARENT_WAIT_S)
        while True:
            run_id = study.user_attrs.get(PARENT_RUN_ATTR)
            if run_id or time.monotonic() >= deadline:
                return run_id
            time.sleep(0.5)

    # -- the loop -----------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from optuna.storages._heartbeat import get_heartbeat_thread  # what Study.optimize uses per trial
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space, fixed = search_space(parser, self.params, list(arguments))
        directions = self.resolved_directions()
        variables = self.sweep_variables(space)
        gpus = visible_gpus()
        if any(key.lstrip("+~") == "train.nproc_per_node" for key in space):
            raise SweepFailed("hydra.sweeper.params: train.nproc_per_node cannot be searched (it sets GPUs per trial)")
        processes = job_processes(self.hydra_context.config_loader, self.config, fixed)  # GPUs per trial
        try:
            size = batch_size(self.n_jobs, gpus, processes)
        except ValueError as exc:
            raise SweepFailed(str(exc)) from exc
        name = self.study_name or self.default_study_name(list(arguments), directions)
        if text_problem(name):  # the name is the sweep id, which the MLflow searches of this study quote
            raise SweepFailed(f"hydra.sweeper.study_name: {name!r} {text_problem(name)}")
        study, created = self.open_study(name, directions, self.definition(space, fixed, directions))
        retried = recover_interrupted(study, self.finished_trials(name))
        done = sum(counted(t) for t in study.get_trials(deepcopy=False))
        prior = prior_counts(study)
        print(
            f"[sweep {name}] Optuna study in {self.storage}"
            + ("" if self.storage_given else " (default: beside the MLflow store)")
            + f": {done}/{self.n_trials} trials done"
            + (f", retrying interrupted trial(s) {retried}" if retried else "")
            + f"; dashboard: optuna-dashboard {self.storage}",
            flush=True,
        )
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, Path(self.config.hydra.sweep.dir) / "multirun.yaml")
        record = SweepRecord(
            kind="optuna",
            sweep_id=name,
            run_name=f"study-{name}",
            config=self.config,
            planned=self.n_trials,
            params={
                "study": name,
                "storage": self.storage,
                "space": {k: repr(v) for k, v in space.items()},
                "fixed": fixed,
                "derived": self.derived,
                "metrics": self.metrics,
                "directions": directions,
                "sampler": OmegaConf.to_container(self.sampler_conf),
            },
            resume_run_id=self.parent_run_id(study, created),
            prior=prior,
        )
        metric_names = [record.objective if m == "objective" else m for m in self.metrics]  # the metrics' own names
        if study.user_attrs.get(PARENT_RUN_ATTR) != record.run_id:
            study.set_user_attr(PARENT_RUN_ATTR, record.run_id)
        previous = install_sigterm_handler()
        pending: list = []
        stopped = exhausted = False
        try:
            while not exhausted:
                if self.heartbeat_interval:
                    fail_stale(study)
                trials = study.get_trials(deepcopy=False)
                done = sum(counted(t) for t in trials)
                if done >= self.n_trials:
                    break
                if failure_budget_exceeded(self.failed_count(study), self.n_trials, self.max_failure_rate):
                    stopped = True
                    print(
                        f"[sweep {name}] stopping: more than {self.max_failure_rate:.0%} of {self.n_trials} "
                        "trials failed",
                        flush=True,
                    )
                    break
                running = sum(occupies(t) and t.state == TrialState.RUNNING for t in trials)
                free = self.n_trials - done - running
                if free <= 0:
                    if not self.heartbeat_interval:
                        break  # the sweeps running the rest finish them
                    time.sleep(WAIT_POLL_S)  # wait for the others: one of them may die and need a retry
                    continue
                pending, exhausted = self.ask(study, space, min(size * self.pack, free))
                pending = self.within_budget(study, pending)
                if not pending:
                    continue
                if self.pack > 1:
                    self._launch_packs(study, pending, fixed, variables, record, gpus, metric_names)
                    pending = []
                    continue
                overrides = []
                for trial, gpu in zip(pending, assign_gpus(len(pending), gpus, [processes] * len(pending))):
                    job = fixed + trial_overrides(trial.params, variables, self.derived)
                    trial.set_user_attr("overrides", job)
                    env = {
                        **record.job_env(),
                        STORAGE_ENV: self.storage,
                        STUDY_ENV: name,
                        TRIAL_ENV: str(trial.number),
                        "CUDA_VISIBLE_DEVICES": gpu,
                    }
                    overrides.append(job + env_overrides(env))
                    record.starting(trial.number, trial.user_attrs["overrides"][len(fixed) :], gpu)
                with ExitStack() as beating:
                    for trial in pending:
                        beating.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
                    results = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                self.job_idx += len(results)
                for trial, ret in zip(pending, results):
                    outcome = job_outcome(trial.number, trial.user_attrs["overrides"][len(fixed) :], ret)
                    outcome = self.tell(study, trial, outcome)
                    done = sum(counted(t) for t in study.get_trials(deepcopy=False))
                    record.add(outcome, done, lambda: best_text(study, metric_names))
                pending = []
            if exhausted:
                print(
                    f"[sweep {name}] stopping: the sampler proposed {MAX_DUPLICATE_PROPOSALS} configs in a row "
                    "that were already tried (is the search space exhausted?)",
                    flush=True,
                )
        except BaseException as exc:
            for trial in pending:  # interrupted: failed without a reason, so the next run retries them
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            record.end_early(exc)
            numbers = ", ".join(f"#{t.number}" for t in pending) or "none"
            print(
                f"[sweep {name}] interrupted ({type(exc).__name__}: {exc}); trial(s) {numbers} will be retried: "
                "run the same command again to continue the study",
                flush=True,
            )
            raise
        finally:
            restore_sigterm_handler(previous)
        status = "FAILED" if stopped or (record.outcomes and not self.any_success(record)) else "FINISHED"
        with tempfile.TemporaryDirectory(prefix="lora-sweep-") as scratch:
            record.finish(status, best_text(study, metric_names)[0], **self.study_artifacts(study, Path(scratch)))
        if record.failed() or stopped:
            raise SweepFailed(record.failure_message(stopped))
        return study

    def _launch_packs(
        self, study, pending: list, fixed: list, variables: set, record, gpus, metric_names: list[str]
    ) -> None:
        """The asked trials as packs of one base (``hydra.sweeper.pack``), each launched as one job on the first
        GPU (a trial that cannot be packed alone); each trial is told its own outcome."""
        from optuna.storages._heartbeat import get_heartbeat_thread

        loader = self.hydra_context.config_loader
        jobs = [fixed + trial_overrides(t.params, variables, self.derived) for t in pending]
        raws = []
        for i, (trial, job) in enumerate(zip(pending, jobs)):
            trial.set_user_attr("overrides", job)
            try:
                raws.append(grouping.member_config(loader, self.config, job, self.job_idx + i))
            except Exception:  # noqa: BLE001  it runs alone and fails with Hydra's own error
                raws.append(None)
        envs = [{STORAGE_ENV: self.storage, STUDY_ENV: record.sweep_id, TRIAL_ENV: str(t.number)} for t in pending]
        (gpu,) = assign_gpus(1, gpus)
        sweep_dir = Path(self.config.hydra.sweep.dir)

        def say(i: int, why: str) -> None:
            print(f"[sweep {record.sweep_id}] trial #{pending[i].number} trains alone: {why}", flush=True)

        for unit in grouping.group(raws, self.pack, say=say):
            first = unit[0]
            env = {**record.job_env(), **envs[first], "CUDA_VISIBLE_DEVICES": gpu, grouping.PACK_ENV: ""}
            if len(unit) > 1:
                path = sweep_dir / "packs" / f"pack-{self.job_idx + first}.json"
                grouping.write_pack(path, [(self.job_idx + i, raws[i], envs[i]) for i in unit])
                env[grouping.PACK_ENV] = str(path.absolute())
            for i in unit:
                record.starting(pending[i].number, jobs[i][len(fixed) :], gpu)
            with ExitStack() as beating:
                for i in unit:
                    beating.enter_context(get_heartbeat_thread(pending[i]._trial_id, study._storage))
                results = self.launcher.launch([jobs[first] + env_overrides(env)], initial_job_idx=self.job_idx + first)
            shown = [jobs[i][len(fixed) :] for i in unit]
            numbers = [pending[i].number for i in unit]
            if len(unit) > 1:
                outcomes = pack_outcomes(numbers, shown, results[0])
            else:
                outcomes = [job_outcome(numbers[0], shown[0], results[0])]
            for i, outcome in zip(unit, outcomes):
                outcome = self.tell(study, pending[i], outcome)
                done = sum(counted(t) for t in study.get_trials(deepcopy=False))
                record.add(outcome, done, lambda: best_text(study, metric_names))
        self.job_idx += len(pending)

    def ask(self, study, space: dict, want: int) -> tuple[list, bool]:
        """Up to ``want`` new trials whose params were never tried (or are in flight); True if exhausted."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        finished = {params_key(t.params): t for t in trials if counted(t)}
        elsewhere = [t for t in trials if t.state == TrialState.RUNNING]  # another sweep on this study runs them
        pending: list = []
        streak = 0
        while len(pending) < want:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize"
                trial = study.ask(space)
            set_owner(trial)
            key = params_key(trial.params)
            original = finished.get(key)
            in_flight = next((p for p in [*pending, *elsewhere] if params_key(p.params) == key), None)
            if original is None and in_flight is None:
                pending.append(trial)
                streak = 0
                continue
            trial.set_user_attr("duplicate_of", (original or in_flight).number)
            if original is not None and original.state == TrialState.COMPLETE:
                study.tell(trial, original.values)  # the sampler learns the known value without a rerun
            else:
                study.tell(trial, state=TrialState.FAIL)
            streak += 1
            if streak >= MAX_DUPLICATE_PROPOSALS:
                return pending, True
        return pending, False

    def within_budget(self, study, pending: list) -> list:
        """The asked trials within ``n_trials``; the others (asked at once by other workers) are dropped."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        kept = []
        for trial in pending:
            if in_budget(trial.number, trials, self.n_trials):
                kept.append(trial)
            else:
                trial.set_user_attr("over_budget", True)
                study.tell(trial, state=TrialState.FAIL)
        return kept

    def tell(self, study, trial, outcome: Outcome) -> Outcome:
        """Tell Optuna the job's outcome; a FINISHED job without a usable value becomes FAILED."""
        from optuna.trial import TrialState

        if outcome.run_id:
            trial.set_user_attr("mlflow_run_id", outcome.run_id)
        if outcome.status == "FINISHED":
            values = [outcome.metrics.get(m) for m in self.metrics]
            bad = [m for m, v in zip(self.metrics, values) if not finite(v)]
            if not bad:
                study.tell(trial, [float(v) for v in values])
                return outcome
            outcome.status = "FAILED"
            outcome.reason = "; ".join(f"{m} is {outcome.metrics.get(m)!r}" for m in bad)
        if outcome.status == "PRUNED":
            study.tell(trial, state=TrialState.PRUNED)
            return outcome
        trial.set_user_attr("fail_reason", outcome.reason or outcome.status)
        if outcome.status == "SKIPPED":
            trial.set_user_attr("skipped", True)
        study.tell(trial, state=TrialState.FAIL)
        return outcome

    @staticmethod
    def failed_count(study) -> int:
        from optuna.trial import TrialState

        return sum(counted(t) and t.state == TrialState.FAIL for t in study.get_trials(deepcopy=False))

    @staticmethod
    def any_success(record: SweepRecord) -> bool:
        return any(o.status in ("FINISHED", "PRUNED") for o in record.outcomes)

    def study_artifacts(self, study, out: Path) -> dict[str, Any]:
        """best.json or pareto_front.json, trials.csv and the plots, for the parent run."""
        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        artifacts: dict[str, Any] = {}
        if complete:
            if len(study.directions) == 1:
                artifacts["best.json"] = trial_summary(best_trial(study), self.metrics)
            else:
                artifacts["pareto_front.json"] = {
                    "metrics": self.metrics,
                    "directions": [d.name.lower() for d in study.directions],
                    "trials": [trial_summary(t, self.metrics) for t in pareto_front(study)],
                }
        files: list[tuple[Path, Optional[str]]] = []
        if study.trials:
            study.trials_dataframe().to_csv(out / "trials.csv", index=False)
            files.append((out / "trials.csv", None))
        task_metric = objective_name(self.config)
        names = [task_metric if m == "objective" else m for m in self.metrics]  # axis labels
        files += [(path, "plots") for path in save_plots(study, names, out / "plots")]
        return {"artifacts": artifacts, "files": files}


def best_trial(study):
    """The best trial that ran (a duplicate answered from an earlier trial points back to it)."""
    best = study.best_trial
    original = best.user_attrs.get("duplicate_of")
    return best if original is None else study.trials[original]


def pareto_front(study) -> list:
    """The Pareto-optimal trials that ran (duplicates left out: they repeat an original's values)."""
    return [t for t in study.best_trials if "duplicate_of" not in t.user_attrs]


def trial_summary(trial, metrics: list[str]) -> dict[str, Any]:
    return {
        "trial": trial.number,
        "values": dict(zip(metrics, trial.values)),
        "params": trial.params,
        "overrides": trial.user_attrs.get("overrides"),
        "run_id": trial.user_attrs.get("mlflow_run_id"),
    }


def best_text(study, names: Sequence[str] = ("objective",)) -> tuple[Optional[str], Optional[float]]:
    """Best value so far (one objective) or the Pareto front (several), each value under its metric's name in
    ``names`` and with the trial's params: as text, and the value."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None, None
    if len(study.directions) == 1:
        best = best_trial(study)
        return f"{names[0]}={best.value:.4g} (#{best.number} {params_text(best.params)})", best.value
    front = pareto_front(study)
    shown = [
        f"#{t.number} {' '.join(f'{n}={v:.4g}' for n, v in zip(names, t.values))} ({params_text(t.params)})"
        for t in front[:5]
    ]
    more = f", ... ({len(front)} in all)" if len(front) > 5 else ""
    return f"Pareto front of {len(front)} trial(s): " + ", ".join(shown) + more, None


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def save_plots(study, metrics: list[str], out: Path) -> list[Path]:
    """Optuna's matplotlib plots as PNG: history, importances, and the Pareto front (several objectives)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 1:
        return []
    out.mkdir(parents=True, exist_ok=True)
    multi = len(study.directions) > 1
    target = {"target": (lambda t: t.values[0]), "target_name": metrics[0]} if multi else {"target_name": metrics[0]}
    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study, **target),
        "param_importances.png": lambda: ovm.plot_param_importances(study, **target),
    }
    if multi:
        plots["pareto_front.png"] = lambda: ovm.plot_pareto_front(study, target_names=metrics)
    saved = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.savefig(out / name, bbox_inches="tight", dpi=100)
            plt.close(figure)
            saved.append(out / name)
        except Exception as exc:  # e.g. importances need two completed trials with varying params
            print(f"note: no {name}: {type(exc).__name__}: {exc}")
    return saved
