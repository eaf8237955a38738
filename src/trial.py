"""The Optuna trial a job runs for: the study's storage, its pruner as plain data, and the pruning callback.

Optuna trials learn who they are from the environment the sweeper sets per job
(``hydra.job.env_set``): ``LORA_OPTUNA_STORAGE``, ``LORA_OPTUNA_STUDY`` and ``LORA_OPTUNA_TRIAL``.
:func:`trial_callbacks` turns them into a Trainer callback that reports every evaluation of the
objective metric and raises ``optuna.TrialPruned`` when the study's pruner says so; ``src.train`` hands it to
``training.build_trainer``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from src.errors import StoreError, cause_line
from src.logger import say
from src.optuna_compat import reopen_trial

STORAGE_ENV = "LORA_OPTUNA_STORAGE"


STUDY_ENV = "LORA_OPTUNA_STUDY"


TRIAL_ENV = "LORA_OPTUNA_TRIAL"


PRUNER_ATTR = "pruner"  # study user attr: the pruner's config, so any process can rebuild it
STUDY_FILE = "optuna.db"


def default_storage(tracking_uri: str) -> str:
    """The study storage when ``hydra.sweeper.storage`` is unset: a SQLite file beside the MLflow store the sweep's
    runs go to, so a store's studies always match its runs (a scratch store gets scratch studies).

    ``sqlite:///DIR/mlflow.db`` gives ``sqlite:///DIR/optuna.db``; a local file store (``file:///DIR/mlruns`` or a
    path) gives ``DIR/optuna.db``; a server or database store, which has no folder here, gives ``optuna.db`` in
    the working directory. The path is absolute: a job may run in another directory."""
    from urllib.parse import unquote, urlparse

    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().parent
    elif tracking_uri.startswith("file:"):
        folder = Path(unquote(urlparse(tracking_uri).path)).expanduser().parent
    elif "://" not in tracking_uri and ":" not in tracking_uri.split("/")[0]:  # a local file store's path
        folder = Path(tracking_uri).expanduser().parent
    else:
        folder = Path.cwd()
    return f"sqlite:///{folder.resolve() / STUDY_FILE}"


def open_storage(spec: str, heartbeat_interval: Optional[int] = None, grace_period: Optional[int] = None):
    """An Optuna storage from a spec: an SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``)
    or else the path of a journal file. With ``heartbeat_interval`` (RDB only), a trial whose worker
    stopped beating for ``grace_period`` seconds is failed and enqueued once more (up to 3 retries)."""
    import optuna

    if "://" in spec:
        if spec.startswith("sqlite:///"):
            Path(spec.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        heartbeat: dict[str, Any] = {}
        if heartbeat_interval:
            heartbeat = {
                "heartbeat_interval": heartbeat_interval,
                "grace_period": grace_period,
                "failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3),
            }
        return _rdb_storage(spec, heartbeat)
    if heartbeat_interval:
        raise ValueError(f"hydra.sweeper.heartbeat_interval needs an RDB storage (an SQLAlchemy URL), got {spec!r}")
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(spec).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


@contextlib.contextmanager
def opening_study(spec: str) -> Iterator[None]:
    """Turn the errors of a study storage that cannot be opened or written (a corrupt or read-only SQLite file, a
    journal file that cannot be written) into a :class:`~src.errors.StoreError` naming it."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError, OSError) as exc:
        raise StoreError(
            f"Optuna storage {spec} cannot be used: {cause_line(exc)}; the sweep ran nothing: repair or move it "
            "aside, or choose another (hydra.sweeper.storage)"
        ) from exc


def _rdb_storage(url: str, options: dict[str, Any], attempts: int = 5):
    """RDBStorage, retried: workers that start together on an empty database race to create its tables."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **options)
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)


# What a study may name as its pruner: Optuna's own classes, built from scalar arguments. The storage is
# shared (a PostgreSQL database, a file): whatever it holds is data, never something to instantiate.
PRUNERS = (
    "NopPruner",
    "MedianPruner",
    "PercentilePruner",
    "SuccessiveHalvingPruner",
    "HyperbandPruner",
    "ThresholdPruner",
    "WilcoxonPruner",
)


_SCALARS = (int, float, str, bool, type(None))


def pruner_spec(conf: dict) -> dict[str, Any]:
    """The sweep's pruner config (``_target_`` and arguments) as plain data to store with the study.

    Raises ValueError for a class outside :data:`PRUNERS` or an argument that is not a plain value."""
    target = str(conf.get("_target_", ""))
    name = target.removeprefix("optuna.pruners.")
    if target != f"optuna.pruners.{name}" or name not in PRUNERS:
        raise ValueError(f"hydra.sweeper.pruner: {target!r} is not one of optuna.pruners' {', '.join(PRUNERS)}")
    kwargs = {k: v for k, v in conf.items() if not str(k).startswith("_")}
    odd = sorted(k for k, v in kwargs.items() if not isinstance(v, _SCALARS))
    if odd:
        raise ValueError(f"hydra.sweeper.pruner: arguments {odd} must be numbers, strings or booleans")
    return {"name": name, "kwargs": kwargs}


def build_pruner(spec: Any):
    """An Optuna pruner from plain data (:func:`pruner_spec`'s, or an older study's ``_target_`` config).

    Anything else read back from the storage builds nothing: the trial then never prunes, with a warning."""
    import optuna

    try:
        if isinstance(spec, dict) and "_target_" in spec:
            spec = pruner_spec(spec)
        name, kwargs = spec["name"], spec["kwargs"]
        if (
            name not in PRUNERS
            or not isinstance(kwargs, dict)
            or not all(isinstance(v, _SCALARS) for v in kwargs.values())
        ):
            raise ValueError(f"pruner {name!r} with {kwargs!r}")
        return getattr(optuna.pruners, name)(**{str(k): v for k, v in kwargs.items()})
    except (ValueError, TypeError, KeyError) as exc:
        say(f"warning: the study's stored pruner is not a plain Optuna pruner ({exc}); not pruning", logging.WARNING)
        return optuna.pruners.NopPruner()


def current_trial(env: Optional[dict[str, str]] = None):
    """The Optuna trial this process runs for (from the sweeper's environment, or a pack trial's own ``env``),
    or None."""
    env = os.environ if env is None else env
    if not env.get(TRIAL_ENV):
        return None
    import optuna

    storage = open_storage(env[STORAGE_ENV])
    study = optuna.load_study(study_name=env[STUDY_ENV], storage=storage)
    stored = study.user_attrs.get(PRUNER_ATTR)
    if stored:
        study.pruner = build_pruner(stored)
    return reopen_trial(study, int(env[TRIAL_ENV]))


def trial_callbacks(metric: str, env: Optional[dict[str, str]] = None) -> list:
    """Trainer callbacks for an Optuna trial: report ``metric`` at each evaluation, prune if told (``env``: a pack
    trial's own environment; else the process's)."""
    trial = current_trial(env)
    if trial is None or len(trial.study.directions) > 1:  # Optuna prunes single-objective studies only
        return []
    return [_pruning_callback(trial, metric)]


def _pruning_callback(trial, metric: str):
    """A TrainerCallback; transformers is imported here so that sweepers need not import it."""
    import mlflow
    import optuna
    from transformers import TrainerCallback

    class OptunaPruningCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get(metric)
            if value is None or not math.isfinite(value) or state.global_step >= state.max_steps:
                return  # the evaluation after training decides the result, not pruning
            trial.report(float(value), step=state.global_step)
            if trial.should_prune():
                mlflow.set_tag("status", "PRUNED")
                raise optuna.TrialPruned(f"pruned at step {state.global_step}: {metric}={value:.4g}")

    return OptunaPruningCallback()
