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
(``pareto_front.json``) for several objectives, ``trials.csv``, Optuna's plots under ``plots/``, and the params'
importances with the slice and contour plots (:mod:`src.sweeps.importance`).

The sweep's first line states the sampler and its settings (:func:`src.sweeps.configs.sampler_text`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from src import optuna_compat, tracking
from src.config import config_changes
from src.names import filter_value, text_problem
from src.optuna_compat import fail_stale
from src.sweeps.base import Job, SweeperBase
from src.sweeps.configs import OptunaSweeperConf, build_sampler, sampler_text
from src.sweeps.outcomes import (
    DEFINITION_ATTR,
    DUPLICATE_OF_ATTR,
    FAIL_REASON_ATTR,
    OVER_BUDGET_ATTR,
    OVERRIDES_ATTR,
    PARENT_RUN_ATTR,
    RUN_ID_ATTR,
    SKIPPED_ATTR,
    STUDY_TAG,
    TRIAL_TAG,
    Outcome,
    Status,
    finite,
)
from src.sweeps.placement import assign_gpus, batch_size, job_processes, visible_gpus
from src.sweeps.record import (
    SweepFailed,
    SweepRecord,
    failure_budget_exceeded,
    objective_direction,
    objective_name,
    show,
)
from src.sweeps.space import search_space, trial_overrides
from src.sweeps.study_report import best_text, study_artifacts
from src.sweeps.study_trials import (
    counted,
    in_budget,
    occupies,
    params_key,
    prior_counts,
    recover_interrupted,
    set_owner,
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
# A worker with no trial left to take polls this often (seconds) for the others' outcomes.
WAIT_POLL_S = 2.0
# A pack process of a study trains this many times ``pack`` trials (pack_jobs: null): slots refill within it as trials
# are pruned or finish, and the sampler still sees the outcomes of the process before.
STUDY_PACK_JOBS = 4
# How long a worker that joins a study waits for the creator's MLflow parent run id.
PARENT_WAIT_S = 120.0


@dataclass(frozen=True)
class StudyPlan:
    """What one sweep of a study works from, settled before any trial runs."""

    name: str  # the study's name, also the sweep's id
    space: dict[str, Any]  # param -> Optuna distribution
    fixed: list[str]  # the overrides every trial shares
    variables: set[str]  # params that are no config key: they only feed hydra.sweeper.derived
    directions: list[str]  # one per metric
    metric_names: list[str]  # the metrics by their own names (the objective's metric for "objective")
    gpus: list[Optional[str]]  # the visible GPUs
    processes: int  # GPUs per trial (train.nproc_per_node)
    size: int  # trials launched at once


class OptunaSweeper(SweeperBase):
    """Ask Optuna for trials, launch them through Hydra's launcher, tell Optuna what happened."""

    CONF = OptunaSweeperConf

    def __init__(self, **settings: Any):
        super().__init__(**settings)
        self.params = dict(self.conf.params or {})
        self.derived = dict(self.conf.derived or {})
        self.metrics = list(self.conf.metrics)
        self.storage = self.conf.storage  # null: set up beside the config's MLflow store (default_storage)
        self.study = None
        self.pending: list = []  # the trials asked and not yet told
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if self.conf.storage is None:
            self.storage = default_storage(tracking.tracking_uri(config.tracking.tracking_uri))

    # -- the sweep ------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        assert self.config is not None and self.launcher is not None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        plan = self.plan(list(arguments))
        definition = self.definition(plan.space, plan.fixed, plan.directions)
        self.study, created = self.open_study(plan.name, plan.directions, definition)
        self.start_record(plan, created)
        with self.guarded():
            stopped = self.optimize(plan)
        self.finish(plan, stopped)
        return self.study

    def plan(self, arguments: list[str]) -> StudyPlan:
        """The search space, directions, GPUs and study name; a sweep that cannot run fails here, before the study
        is opened."""
        parser = OverridesParser.create(config_loader=self.loader)
        space, fixed = search_space(parser, self.params, arguments)
        directions = self.resolved_directions()
        variables = self.sweep_variables(space)
        gpus = visible_gpus()
        if any(key.lstrip("+~") == "train.nproc_per_node" for key in space):
            raise SweepFailed("hydra.sweeper.params: train.nproc_per_node cannot be searched (it sets GPUs per trial)")
        processes = job_processes(self.loader, self.config, fixed)  # GPUs per trial
        try:
            size = batch_size(self.conf.n_jobs, gpus, processes)
        except ValueError as exc:
            raise SweepFailed(str(exc)) from exc
        name = self.conf.study_name or self.default_study_name(arguments, directions)
        if text_problem(name):  # the name is the sweep id, which the MLflow searches of this study quote
            raise SweepFailed(f"hydra.sweeper.study_name: {name!r} {text_problem(name)}")
        objective = objective_name(self.config)
        metric_names = [objective if m == "objective" else m for m in self.metrics]
        return StudyPlan(name, space, fixed, variables, directions, metric_names, gpus, processes, size)

    def start_record(self, plan: StudyPlan, created: bool) -> None:
        """State the sampler (the first line), settle what a stopped sweep left, say where the study stands, and open
        (or resume) the parent run."""
        asked = min(plan.size * self.pack_jobs(), self.conf.n_trials)
        sampler = sampler_text(self.sampler_conf(), len(plan.directions), asked)
        show(f"[sweep {plan.name}] sampler: {sampler}; up to {asked} trial(s) asked at a time")
        retried = recover_interrupted(self.study, self.finished_trials(plan.name))
        prior = prior_counts(self.study)
        given = self.conf.storage is not None
        show(
            f"[sweep {plan.name}] Optuna study in {self.storage}"
            + ("" if given else " (default: beside the MLflow store)")
            + f": {self.done_count()}/{self.conf.n_trials} trials done"
            + (f", retrying interrupted trial(s) {retried}" if retried else "")
            + f"; dashboard: optuna-dashboard {self.storage}"
        )
        self.save_sweep_config()
        self.record = SweepRecord(
            kind="optuna",
            sweep_id=plan.name,
            run_name=f"study-{plan.name}",
            config=self.config,
            planned=self.conf.n_trials,
            params=self.record_params(plan),
            resume_run_id=self.parent_run_id(self.study, created),
            prior=prior,
        )
        if self.study.user_attrs.get(PARENT_RUN_ATTR) != self.record.run_id:
            self.study.set_user_attr(PARENT_RUN_ATTR, self.record.run_id)

    def record_params(self, plan: StudyPlan) -> dict[str, Any]:
        """The parent run's params: what the study searches, and how."""
        return {
            "study": plan.name,
            "storage": self.storage,
            "space": {k: repr(v) for k, v in plan.space.items()},
            "fixed": plan.fixed,
            "derived": self.derived,
            "metrics": self.metrics,
            "directions": plan.directions,
            "sampler": OmegaConf.to_container(self.conf.sampler),
        }

    def optimize(self, plan: StudyPlan) -> bool:
        """Ask, launch and tell until the study holds ``n_trials`` outcomes; True if the failure budget stopped it.

        A worker of a shared study with nothing left to take waits for the others (one may die and need a retry)."""
        while True:
            if self.conf.heartbeat_interval:
                fail_stale(self.study)
            free = self.free_places()
            if free is None:
                return False
            if self.over_failure_budget():
                return True
            if free <= 0:
                if not self.conf.heartbeat_interval:
                    return False  # the sweeps running the rest finish them
                time.sleep(WAIT_POLL_S)
                continue
            self.pending, exhausted = self.ask(plan.space, min(plan.size * self.pack_jobs(), free))
            self.pending = self.within_budget(self.pending)
            if self.pending:
                self.run_trials(plan)
            if exhausted:
                show(
                    f"[sweep {plan.name}] stopping: the sampler proposed {MAX_DUPLICATE_PROPOSALS} configs in a row "
                    "that were already tried (is the search space exhausted?)"
                )
                return False

    def pack_jobs(self) -> int:
        """The trials one pack process trains (``pack_jobs``, null: 4 x ``pack``); 1 without packs."""
        if self.conf.pack <= 1:
            return 1
        return self.conf.pack_jobs or STUDY_PACK_JOBS * self.conf.pack

    def free_places(self) -> Optional[int]:
        """Places of ``n_trials`` no trial holds (done, running or queued); None once ``n_trials`` are done."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        done = sum(counted(t) for t in trials)
        if done >= self.conf.n_trials:
            return None
        running = sum(occupies(t) and t.state == TrialState.RUNNING for t in trials)
        return self.conf.n_trials - done - running

    def over_failure_budget(self) -> bool:
        from optuna.trial import TrialState

        failed = sum(counted(t) and t.state == TrialState.FAIL for t in self.study.get_trials(deepcopy=False))
        if not failure_budget_exceeded(failed, self.conf.n_trials, self.conf.max_failure_rate):
            return False
        show(
            f"[sweep {self.record.sweep_id}] stopping: more than {self.conf.max_failure_rate:.0%} of "
            f"{self.conf.n_trials} trials failed"
        )
        return True

    def run_trials(self, plan: StudyPlan) -> None:
        """Launch the pending trials (each alone on its GPUs, or as packs on the first GPU) and tell each its
        outcome."""
        jobs = [self.trial_job(plan, trial, i) for i, trial in enumerate(self.pending)]
        if self.conf.pack > 1:
            (gpu,) = assign_gpus(1, plan.gpus)
            for unit in self.pack_units(jobs):
                self.settle(plan, unit, self.launch_pack(unit, gpu))
        else:
            self.settle(plan, jobs, self.launch(jobs, assign_gpus(len(jobs), plan.gpus, [plan.processes] * len(jobs))))
        self.job_idx += len(jobs)
        self.pending = []

    def trial_job(self, plan: StudyPlan, trial, offset: int) -> Job:
        """A trial as a job: its overrides (recorded on the trial) and its Optuna environment."""
        overrides = plan.fixed + trial_overrides(trial.params, plan.variables, self.derived)
        trial.set_user_attr(OVERRIDES_ATTR, overrides)
        env = {STORAGE_ENV: self.storage, STUDY_ENV: plan.name, TRIAL_ENV: str(trial.number)}
        return Job(trial.number, self.job_idx + offset, overrides, overrides[len(plan.fixed) :], env, trial)

    def settle(self, plan: StudyPlan, jobs: list[Job], outcomes: list[Outcome]) -> None:
        for job, outcome in zip(jobs, outcomes):
            outcome = self.tell(job.trial, outcome)
            self.record.add(outcome, self.done_count(), lambda: best_text(self.study, plan.metric_names))

    def running(self, jobs: list[Job]):
        return optuna_compat.trial_heartbeats(self.study, [job.trial for job in jobs])

    def interrupted(self, exc: BaseException) -> None:
        """The pending trials fail without a reason, so the next run of the command retries them."""
        from optuna.trial import TrialState

        for trial in self.pending:
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        numbers = ", ".join(f"#{t.number}" for t in self.pending) or "none"
        show(
            f"[sweep {self.record.sweep_id}] interrupted ({type(exc).__name__}: {exc}); trial(s) {numbers} will be "
            "retried: run the same command again to continue the study"
        )

    def finish(self, plan: StudyPlan, stopped: bool) -> None:
        """End the parent run with the study's artifacts; raise SweepFailed if trials failed."""
        record = self.record
        succeeded = any(o.status in (Status.OK, Status.PRUNED) for o in record.outcomes)
        status = "FAILED" if stopped or (record.outcomes and not succeeded) else "FINISHED"
        with tempfile.TemporaryDirectory(prefix="lora-sweep-") as scratch:
            files = study_artifacts(self.study, self.metrics, plan.metric_names, Path(scratch))
            record.finish(status, best_text(self.study, plan.metric_names)[0], **files)
        if record.failed() or stopped:
            raise SweepFailed(record.failure_message(stopped))

    def done_count(self) -> int:
        return sum(counted(t) for t in self.study.get_trials(deepcopy=False))

    # -- the study ------------------------------------------------------------------------------

    def resolved_directions(self) -> list[str]:
        if self.conf.direction is not None and self.conf.directions is not None:
            raise SweepFailed("hydra.sweeper: set direction or directions, not both")
        given = self.conf.directions if self.conf.directions is not None else self.conf.direction
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
            filter_string=f"tags.{STUDY_TAG} = {filter_value(study_name)} and attributes.status = 'FINISHED'",
            max_results=50000,
        )
        out = {}
        for run in runs:
            values = [run.data.metrics.get(m) for m in self.metrics]
            if TRIAL_TAG in run.data.tags and all(finite(v) for v in values):
                out[int(run.data.tags[TRIAL_TAG])] = values
        return out

    def open_study(self, name: str, directions: list[str], definition: Optional[dict[str, Any]]) -> tuple[Any, bool]:
        """The study, and whether this worker created it (then it also creates the MLflow parent run). A study
        recorded with another ``definition`` (:meth:`definition`) is refused, naming the keys, before it is
        changed in any way."""
        import optuna

        sampler = build_sampler(self.sampler_conf())
        try:
            spec = pruner_spec(OmegaConf.to_container(self.conf.pruner, resolve=True))
        except ValueError as exc:
            raise SweepFailed(str(exc)) from exc
        pruner = build_pruner(spec)
        with opening_study(self.storage):
            storage = open_storage(self.storage, self.conf.heartbeat_interval, self.conf.grace_period)
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

    def sampler_conf(self) -> dict:
        return OmegaConf.to_container(self.conf.sampler, resolve=True)

    @staticmethod
    def parent_run_id(study, created: bool) -> Optional[str]:
        """The study's MLflow parent run; a worker that joined a new study waits for its creator's."""
        deadline = time.monotonic() + (0 if created else PARENT_WAIT_S)
        while True:
            run_id = study.user_attrs.get(PARENT_RUN_ATTR)
            if run_id or time.monotonic() >= deadline:
                return run_id
            time.sleep(0.5)

    # -- ask and tell ---------------------------------------------------------------------------

    def ask(self, space: dict, want: int) -> tuple[list, bool]:
        """Up to ``want`` new trials whose params were never tried (or are in flight); True if exhausted."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        finished = {params_key(t.params): t for t in trials if counted(t)}
        elsewhere = [t for t in trials if t.state == TrialState.RUNNING]  # another sweep on this study runs them
        pending: list = []
        streak = 0
        while len(pending) < want:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize"
                trial = self.study.ask(space)
            set_owner(trial)
            key = params_key(trial.params)
            original = finished.get(key)
            in_flight = next((p for p in [*pending, *elsewhere] if params_key(p.params) == key), None)
            if original is None and in_flight is None:
                pending.append(trial)
                streak = 0
                continue
            trial.set_user_attr(DUPLICATE_OF_ATTR, (original or in_flight).number)
            if original is not None and original.state == TrialState.COMPLETE:
                self.study.tell(trial, original.values)  # the sampler learns the known value without a rerun
            else:
                self.study.tell(trial, state=TrialState.FAIL)
            streak += 1
            if streak >= MAX_DUPLICATE_PROPOSALS:
                return pending, True
        return pending, False

    def within_budget(self, pending: list) -> list:
        """The asked trials within ``n_trials``; the others (asked at once by other workers) are dropped."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        kept = []
        for trial in pending:
            if in_budget(trial.number, trials, self.conf.n_trials):
                kept.append(trial)
            else:
                trial.set_user_attr(OVER_BUDGET_ATTR, True)
                self.study.tell(trial, state=TrialState.FAIL)
        return kept

    def tell(self, trial, outcome: Outcome) -> Outcome:
        """Tell Optuna the job's outcome; a FINISHED job without a usable value becomes FAILED."""
        from optuna.trial import TrialState

        if outcome.run_id:
            trial.set_user_attr(RUN_ID_ATTR, outcome.run_id)
        if outcome.status is Status.OK:
            values = [outcome.metrics.get(m) for m in self.metrics]
            bad = [m for m, v in zip(self.metrics, values) if not finite(v)]
            if not bad:
                self.study.tell(trial, [float(v) for v in values])
                return outcome
            outcome.status = Status.FAILED
            outcome.reason = "; ".join(f"{m} is {outcome.metrics.get(m)!r}" for m in bad)
        if outcome.status is Status.PRUNED:
            self.study.tell(trial, state=TrialState.PRUNED)
            return outcome
        trial.set_user_attr(FAIL_REASON_ATTR, outcome.reason or outcome.status.label)
        if outcome.status is Status.SKIPPED:
            trial.set_user_attr(SKIPPED_ATTR, True)
        self.study.tell(trial, state=TrialState.FAIL)
        return outcome
