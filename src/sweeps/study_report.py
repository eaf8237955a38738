"""What a study reports: its best trial (or Pareto front) as a line, and the parent run's artifacts (best.json or
pareto_front.json, trials.csv, Optuna's plots, the best learning rate of each rank: :mod:`src.sweeps.lr_by_rank`, and
what mattered: :mod:`src.sweeps.importance`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from src.sweeps.importance import importance_files, save_plots_of, short_text
from src.sweeps.lr_by_rank import best_lr_text, lr_by_rank_files
from src.sweeps.outcomes import DUPLICATE_OF_ATTR, OVERRIDES_ATTR, RUN_ID_ATTR
from src.sweeps.record import show


def study_artifacts(study, metrics: list[str], names: list[str], out: Path) -> dict[str, Any]:
    """The parent run's artifacts and metrics of a study: best.json or pareto_front.json, trials.csv, the plots, and
    the param importances (in ``out``). ``metrics``: as the sweeper names them (``objective``...); ``names``: their
    own (the plots' axes). Says in a line which params mattered, and why a table or plot is missing."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    artifacts: dict[str, Any] = {}
    if complete:
        if len(study.directions) == 1:
            artifacts["best.json"] = trial_summary(best_trial(study), metrics)
        else:
            artifacts["pareto_front.json"] = {
                "metrics": metrics,
                "directions": [d.name.lower() for d in study.directions],
                "trials": [trial_summary(t, metrics) for t in pareto_trials(study)],
            }
    files: list[tuple[Path, Optional[str]]] = []
    if study.trials:
        study.trials_dataframe().to_csv(out / "trials.csv", index=False)
        files.append((out / "trials.csv", None))
    files += [(path, "plots") for path in save_plots(study, names, out / "plots")]
    metrics: dict[str, Any] = {}
    try:
        by_rank, rank_files, metrics = lr_by_rank_files(study, names[0], out)
    except Exception as exc:  # noqa: BLE001  nor does the learning rate by rank
        show(f"note: no best learning rate by rank: {type(exc).__name__}: {exc}")
        by_rank, rank_files = [], []
    if by_rank:
        show(f"[sweep {study.study_name}] best learning rate by rank: {best_lr_text(by_rank)}")
    files += rank_files
    try:
        found, importance = importance_files(study, names, out)
    except Exception as exc:  # noqa: BLE001  what mattered never keeps the parent run from ending
        show(f"note: no importances: {type(exc).__name__}: {exc}")
        return {"artifacts": artifacts, "files": files, "metrics": metrics}
    show(f"[sweep {study.study_name}] importance: {short_text(found)}")
    for note in found.notes if found.values else []:
        show(f"note: {note}")
    return {"artifacts": artifacts, "files": files + importance, "metrics": {**metrics, **found.metrics()}}


def best_trial(study):
    """The best trial that ran (a duplicate answered from an earlier trial points back to it)."""
    best = study.best_trial
    original = best.user_attrs.get(DUPLICATE_OF_ATTR)
    return best if original is None else study.trials[original]


def pareto_trials(study) -> list:
    """The Pareto-optimal trials that ran (duplicates left out: they repeat an original's values)."""
    return [t for t in study.best_trials if DUPLICATE_OF_ATTR not in t.user_attrs]


def trial_summary(trial, metrics: list[str]) -> dict[str, Any]:
    return {
        "trial": trial.number,
        "values": dict(zip(metrics, trial.values)),
        "params": trial.params,
        "overrides": trial.user_attrs.get(OVERRIDES_ATTR),
        "run_id": trial.user_attrs.get(RUN_ID_ATTR),
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
    front = pareto_trials(study)
    shown = [
        f"#{t.number} {' '.join(f'{n}={v:.4g}' for n, v in zip(names, t.values))} ({params_text(t.params)})"
        for t in front[:5]
    ]
    more = f", ... ({len(front)} in all)" if len(front) > 5 else ""
    return f"Pareto front of {len(front)} trial(s): " + ", ".join(shown) + more, None


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def save_plots(study, metrics: list[str], out: Path) -> list[Path]:
    """Optuna's matplotlib plots as PNG: the optimization history, and the Pareto front (several objectives)."""
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 1:
        return []
    multi = len(study.directions) > 1
    target = {"target": (lambda t: t.values[0]), "target_name": metrics[0]} if multi else {"target_name": metrics[0]}
    plots = {"optimization_history.png": lambda: ovm.plot_optimization_history(study, **target)}
    if multi:
        plots["pareto_front.png"] = lambda: ovm.plot_pareto_front(study, target_names=metrics)
    saved, missing = save_plots_of(plots, out)
    for note in missing:
        show(f"note: {note}")
    return saved
