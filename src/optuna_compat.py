"""The Optuna internals the sweeper and its jobs need, in one place; checked on Optuna 5.1.0 (``pyproject.toml`` pins
>= 4). A core module, so that :mod:`src.trial` (what a job's run reports to) uses it too.

Optuna's own trial loop (``Study.optimize``) runs one trial at a time in its process; the sweeper asks trials,
launches them as Hydra jobs and tells their outcomes, so it does by hand what ``optimize`` does for itself:

- :func:`trial_heartbeats`: ``optuna.storages._heartbeat.get_heartbeat_thread`` is what ``optimize`` starts for each
  trial when the storage has a heartbeat; nothing public starts one for an asked trial. It needs the trial's
  storage id (``Trial._trial_id``) and the study's storage (``Study._storage``).
- :func:`set_frozen_user_attr`: a user attr on a finished or stale RUNNING trial, known only as a
  ``FrozenTrial`` (``study.get_trials``), which has no public setter: through ``Study._storage`` and
  ``FrozenTrial._trial_id``.
- :func:`retried_from`: the number of the trial that ``RetryFailedTrialCallback`` retries (public, but experimental:
  its warning is silenced here).
- :func:`fail_stale`: ``optuna.storages.fail_stale_trials`` (public, experimental: as above).

- :func:`reopen_trial`: a job's ``optuna.trial.Trial`` in another process, by its number: Optuna has no public way
  to reopen a RUNNING trial, so through ``FrozenTrial._trial_id``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Optional


@contextmanager
def trial_heartbeats(study: Any, trials: list) -> Iterator[None]:
    """Each of ``trials`` (asked, RUNNING) beats while the block runs, as under ``Study.optimize``: a no-op unless
    the storage was opened with a heartbeat interval."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with ExitStack() as beating:
        for trial in trials:
            beating.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
        yield


def set_frozen_user_attr(study: Any, trial: Any, key: str, value: Any) -> None:
    """Set a user attr of a ``FrozenTrial`` of ``study`` in its storage."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def retried_from(trial: Any) -> Optional[int]:
    """The trial that ``RetryFailedTrialCallback`` enqueued ``trial`` to retry, or None."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryFailedTrialCallback.retried_trial_number(trial)


def fail_stale(study: Any) -> None:
    """Fail (and, through the storage's callback, enqueue again) trials whose worker stopped beating."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def reopen_trial(study: Any, number: int) -> Any:
    """The RUNNING trial ``number`` of ``study`` as an ``optuna.trial.Trial`` this process can report to and prune."""
    import optuna

    trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == number)
    return optuna.trial.Trial(study, trial_id)
