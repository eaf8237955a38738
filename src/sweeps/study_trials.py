"""A study's trials as the sweeper keeps count of them: which reached an outcome, which take one of
``n_trials``' places, which sweep process runs them, and the ones a stopped sweep left to settle and retry.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Optional

from src import optuna_compat, tracking
from src.sweeps.outcomes import (
    ADOPTED_ATTR,
    DUPLICATE_OF_ATTR,
    FAIL_REASON_ATTR,
    OVER_BUDGET_ATTR,
    OWNER_HOST_ATTR,
    OWNER_PID_ATTR,
    OWNER_START_ATTR,
    RETRY_OF_ATTR,
    SKIPPED_ATTR,
    Status,
)


def not_counted(trial) -> bool:
    """A trial that takes no place in ``n_trials``: a repeated proposal, or one asked beyond ``n_trials``."""
    return DUPLICATE_OF_ATTR in trial.user_attrs or OVER_BUDGET_ATTR in trial.user_attrs


def counted(trial) -> bool:
    """A trial that reached its own outcome: not a duplicate, not interrupted (those are retried)."""
    from optuna.trial import TrialState

    if not_counted(trial):
        return False
    if trial.state == TrialState.FAIL:
        return FAIL_REASON_ATTR in trial.user_attrs
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def prior_counts(study) -> dict[Status, int]:
    """The study's trials that reached their outcome before this sweep started, by status."""
    from optuna.trial import TrialState

    counts = dict.fromkeys(Status, 0)
    for trial in study.get_trials(deepcopy=False):
        if counted(trial):
            if trial.state == TrialState.COMPLETE:
                counts[Status.OK] += 1
            elif trial.state == TrialState.PRUNED:
                counts[Status.PRUNED] += 1
            else:
                counts[Status.SKIPPED if trial.user_attrs.get(SKIPPED_ATTR) else Status.FAILED] += 1
    return counts


def occupies(trial) -> bool:
    """Whether a trial takes one of the study's ``n_trials`` places: done, running or queued."""
    from optuna.trial import TrialState

    if counted(trial):
        return True
    return trial.state in (TrialState.RUNNING, TrialState.WAITING) and not not_counted(trial)


def in_budget(trial_number: int, trials: list, n_trials: int) -> bool:
    """Whether a just-asked trial is within ``n_trials``: fewer than that many older trials occupy a place.

    Trial numbers are given out atomically by the storage, so workers that ask at the same time
    agree on which of their trials fit.
    """
    return sum(occupies(t) for t in trials if t.number < trial_number) < n_trials


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
            optuna_compat.set_frozen_user_attr(study, trial, ADOPTED_ATTR, "its run FINISHED after the sweep stopped")
            study.tell(trial.number, values if len(values) > 1 else values[0])
        else:
            study.tell(trial.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    # enqueued here (RETRY_OF_ATTR) or by the heartbeat's RetryFailedTrialCallback
    retried = {t.user_attrs.get(RETRY_OF_ATTR) for t in trials} | {optuna_compat.retried_from(t) for t in trials}
    interrupted = [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and FAIL_REASON_ATTR not in t.user_attrs
        and not not_counted(t)
        and t.number not in retried
    ]
    for trial in interrupted:
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: trial.number})
    return [t.number for t in interrupted]
