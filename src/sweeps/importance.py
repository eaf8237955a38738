"""What mattered in a study: its parameter importances by Optuna's default evaluator, on the parent run.

At the end of every study (:func:`src.sweeps.study_report.study_artifacts`), and again on demand for a study that
has ended (:func:`sweep_importance`)::

    python -m src.compare --sweep SWEEP_ID --importance

the parent run gets ``importance.md`` and ``importance.csv`` (each searched param's share of the importance, most
important first), one metric ``importance/<param>`` each, and under ``plots/`` the importance bar chart and the
slice and contour plots that optuna-dashboard shows, so that the MLflow UI alone tells which setting mattered.

Optuna 5's default evaluator is PED-ANOVA ("PED-ANOVA: Efficiently Quantifying Hyperparameter Importance in Arbitrary
Subspaces", https://arxiv.org/abs/2304.10255): how much each param's distribution in the best trials differs from
its distribution in all of them. With several objectives it ranks what brings a trial to the Pareto front. Only
trials that ran count: a repeated proposal, answered from the trial it repeats, would count its point twice. A
study with too few completed trials, or with a single param that varies, gets what it can, and a note says why
each missing table or plot is missing; nothing here fails the sweep.
"""

from __future__ import annotations

import csv
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from src.errors import StoreError, UserError
from src.names import filter_value, text_problem
from src.sweeps.outcomes import DUPLICATE_OF_ATTR, SWEEP_ID_TAG, SWEEP_KIND_TAG
from src.trial import open_storage, opening_study

# Completed trials the importances, the slice and the contour plots need: with one, every param looks alike.
MIN_TRIALS = 2
# The contour plot pairs the most important params, at most this many (a grid of n x n panels).
CONTOUR_PARAMS = 4
METRIC_PREFIX = "importance/"  # the MLflow UI groups the importance metrics under one heading
TABLE, CSV_FILE = "importance.md", "importance.csv"


@dataclass
class Importance:
    """A study's parameter importances and what they rest on."""

    values: dict[str, float]  # param -> its share of the importance, most important first; empty: none computed
    trials: int  # the completed trials that ran
    target: str  # what the params are ranked by: a metric, or the Pareto front
    notes: list[str] = field(default_factory=list)  # each missing table or plot, and why

    def table(self) -> str:
        """Markdown: a title line, the table, and the notes."""
        lines = [
            f"Parameter importance for {self.target} (Optuna's default evaluator, PED-ANOVA), "
            f"from {self.trials} completed trial(s)",
            "",
        ]
        if self.values:
            lines += ["| param | importance |", "|---|---:|"]
            lines += [f"| {param} | {value:.3f} |" for param, value in self.values.items()]
            lines.append("")
        return "\n".join(lines + [f"note: {note}" for note in self.notes]).rstrip() + "\n"

    def metrics(self) -> dict[str, float]:
        return {METRIC_PREFIX + param.lstrip("+~"): float(value) for param, value in self.values.items()}


def ran_study(study):
    """An in-memory copy of ``study`` holding only its completed trials that ran (no repeated proposal)."""
    import optuna
    from optuna.trial import TrialState

    copy = optuna.create_study(directions=study.directions, sampler=optuna.samplers.RandomSampler())
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    copy.add_trials([t for t in complete if DUPLICATE_OF_ATTR not in t.user_attrs])
    return copy


def varying_params(trials: list) -> list[str]:
    """The params that take more than one value among ``trials``, in the order the trials name them."""
    names = dict.fromkeys(name for t in trials for name in t.params)
    return [name for name in names if len({repr(t.params.get(name)) for t in trials}) > 1]


def importance_of(copy, names: list[str]) -> Importance:
    """The importances of ``copy`` (:func:`ran_study`); ``names``: its metrics' names."""
    import optuna

    trials = copy.trials
    target = names[0] if len(names) == 1 else f"the Pareto front of {', '.join(names)}"
    found = Importance({}, len(trials), target)
    varying = varying_params(trials)
    if len(trials) < MIN_TRIALS:
        found.notes.append(f"no importances: {len(trials)} completed trial(s); they need at least {MIN_TRIALS}")
    elif not varying:
        found.notes.append("no importances: no param varies among the completed trials")
    else:
        try:
            with warnings.catch_warnings():  # PED-ANOVA warns that few trials make a rough estimate: the title says so
                warnings.simplefilter("ignore")
                found.values = dict(optuna.importance.get_param_importances(copy, params=varying))
        except Exception as exc:  # noqa: BLE001  what mattered never fails the sweep
            found.notes.append(f"no importances: {type(exc).__name__}: {exc}")
            return found
        if len(varying) == 1:
            found.notes.append(f"only {varying[0]} varies among the completed trials: it takes all the importance")
    return found


def save_plot(draw: Callable[[], Any], path: Path) -> Optional[str]:
    """Draw one of Optuna's matplotlib plots and save it as PNG at ``path``; why not, if it failed."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A choice of numbers (lora.r) is a categorical axis, which matplotlib reports as an INFO line a plot.
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's plots are experimental
            axes = draw()
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, bbox_inches="tight", dpi=100)
        plt.close(figure)
        return None
    except Exception as exc:  # noqa: BLE001  a plot never fails the sweep
        return f"{type(exc).__name__}: {exc}"


def importance_plots(copy, found: Importance, names: list[str], out: Path) -> list[Path]:
    """The importance bar chart, the slice plot of every varying param and the contour plot of the most important
    ones, as PNG under ``out``; each one missing gets a note in ``found``."""
    from optuna.visualization import matplotlib as ovm

    # Several objectives: the slice and contour plots show the first (the importances rank the Pareto front).
    target = {"target": (lambda t: t.values[0])} if len(names) > 1 else {}
    ranked = list(found.values) or varying_params(copy.trials)
    plots: dict[str, Callable[[], Any]] = {}
    if found.values:  # else importance_of noted why
        plots["param_importances.png"] = lambda: ovm.plot_param_importances(copy, params=ranked)
    if len(copy.trials) < MIN_TRIALS:
        few = f"{len(copy.trials)} completed trial(s); they need at least {MIN_TRIALS}"
        found.notes.append(f"no slice or contour plot: {few}")
    elif not ranked:
        found.notes.append("no slice or contour plot: no param varies among the completed trials")
    else:
        plots["slice.png"] = lambda: ovm.plot_slice(copy, params=ranked, target_name=names[0], **target)
        if len(ranked) > 1:
            top = ranked[:CONTOUR_PARAMS]
            plots["contour.png"] = lambda: ovm.plot_contour(copy, params=top, target_name=names[0], **target)
        else:
            found.notes.append(f"no contour.png: it pairs two params, and only {ranked[0]} varies")
    saved, missing = save_plots_of(plots, out)
    found.notes += missing
    return saved


def save_plots_of(plots: dict[str, Callable[[], Any]], out: Path) -> tuple[list[Path], list[str]]:
    """Each of ``plots`` (file name -> drawing) saved under ``out`` (:func:`save_plot`): the files saved, and a note
    for each that is missing, saying why."""
    saved, missing = [], []
    for name, draw in plots.items():
        why = save_plot(draw, out / name)
        if why is None:
            saved.append(out / name)
        else:
            missing.append(f"no {name}: {why}")
    return saved, missing


def importance_files(study, names: list[str], out: Path) -> tuple[Importance, list[tuple[Path, Optional[str]]]]:
    """Compute ``study``'s importances and write the parent run's files under ``out``: the table as Markdown and
    CSV, and the plots (to be logged under ``plots/``). ``names``: the study's metrics by their own names."""
    copy = ran_study(study)
    found = importance_of(copy, names)
    plots = importance_plots(copy, found, names, out / "plots")
    (out / TABLE).write_text(found.table())
    files: list[tuple[Path, Optional[str]]] = [(out / TABLE, None)]
    if found.values:
        with (out / CSV_FILE).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["param", "importance"])
            writer.writerows(found.values.items())
        files.append((out / CSV_FILE, None))
    return found, files + [(path, "plots") for path in plots]


def short_text(found: Importance) -> str:
    """One line: the params by importance, or why there are none."""
    if not found.values:
        return "; ".join(found.notes)
    ranked = ", ".join(f"{param} {value:.2f}" for param, value in found.values.items())
    return f"{ranked} (PED-ANOVA over {found.trials} completed trial(s), for {found.target}; {TABLE})"


# ---------------------------------------------------------------------------------------------
# On demand: python -m src.compare --sweep ID --importance


def study_parent(client, sweep_id: str):
    """The MLflow parent run of the Optuna study ``sweep_id``, in any experiment of the store."""
    if text_problem(sweep_id):
        raise UserError(f"--sweep {sweep_id!r} {text_problem(sweep_id)}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    where = f"tags.{SWEEP_ID_TAG} = {filter_value(sweep_id)} and tags.{SWEEP_KIND_TAG} = 'optuna'"
    runs = client.search_runs(experiments, where, max_results=100) if experiments else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise UserError(f"no Optuna study {sweep_id!r} in the store (--importance takes a study's sweep id)")
    return parents[0]


def load_parent_study(parent):
    """The Optuna study that the parent run names (its params ``sweep.study`` and ``sweep.storage``)."""
    import optuna

    params = parent.data.params
    name, storage = params.get("sweep.study"), params.get("sweep.storage")
    if not name or not storage:
        raise UserError(f"parent run {parent.info.run_id} names no Optuna study (params sweep.study, sweep.storage)")
    file = storage.removeprefix("sqlite:///") if storage.startswith("sqlite:///") else None
    if file is None and "://" not in storage:
        file = storage  # a journal file
    if file is not None and not Path(file).expanduser().exists():  # opening it would create an empty one
        raise StoreError(f"the Optuna storage {storage} that parent run {parent.info.run_id} names is gone")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with opening_study(storage):
        try:
            return optuna.load_study(study_name=name, storage=open_storage(storage))
        except KeyError as exc:
            raise StoreError(f"study {name!r} is not in {storage} (the storage the parent run names)") from exc


def sweep_importance(sweep_id: str, tracking_uri: str) -> tuple[Importance, str]:
    """Compute the importances of the finished study ``sweep_id`` from its Optuna storage, log the same files and
    metrics as the study's end does to its parent run, and return them with the parent run's id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = study_parent(client, sweep_id)
    study = load_parent_study(parent)
    names = list(study.metric_names or []) or ["objective"] * len(study.directions)
    run_id = parent.info.run_id
    with tempfile.TemporaryDirectory(prefix="lora-importance-") as scratch:
        found, files = importance_files(study, names, Path(scratch))
        for path, folder in files:
            client.log_artifact(run_id, str(path), folder)
    for key, value in found.metrics().items():
        client.log_metric(run_id, key, value)
    return found, run_id
