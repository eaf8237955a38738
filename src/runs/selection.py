"""Which runs :mod:`src.runs.compare` compares: a sweep, an experiment, given run ids, or the newest sweep, each
optionally narrowed by params (``--task``, ``--data``, ``--model``), searched in the MLflow store.

A sweep is a parent run tagged ``sweep_id`` plus the runs carrying the same tag and MLflow's ``mlflow.parentRunId``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from src.names import filter_value, text_problem
from src.runs.table import CompareError

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "sweep_id"


@dataclass
class Selection:
    """The runs to compare, oldest first, and the sweep parent that plots are logged to."""

    runs: list  # mlflow.entities.Run
    description: str
    parent_run_id: Optional[str]


def _is_parent(run) -> bool:
    return SWEEP_TAG in run.data.tags and PARENT_TAG not in run.data.tags


def _search(client, experiment_ids: list[str], filter_string: str = "", limit: Optional[int] = None) -> list:
    """All matching active runs, newest first, following MLflow's pages."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string,
            ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token or (limit is not None and len(runs) >= limit):
            return runs[:limit] if limit is not None else runs


def _sweep_runs(client, experiment_ids: list[str], sweep_id: str, where: str = "", shown: str = "") -> Selection:
    if text_problem(sweep_id):
        raise CompareError(f"--sweep {sweep_id!r} {text_problem(sweep_id)}")
    tagged = _search(client, experiment_ids, f"tags.{SWEEP_TAG} = {filter_value(sweep_id)}")
    parents = [r for r in tagged if _is_parent(r)]
    children = [r for r in tagged if not _is_parent(r)]
    if not tagged:
        raise CompareError(f"no sweep {sweep_id!r} in the store")
    if not children:
        raise CompareError(f"sweep {sweep_id!r} has no runs yet")
    if where:
        children = _search(client, experiment_ids, f"tags.{SWEEP_TAG} = {filter_value(sweep_id)} and {where}")
        if not children:
            raise CompareError(f"sweep {sweep_id!r} has no runs with {shown}")
    parent = parents[0].info.run_id if len(parents) == 1 else None
    return Selection(children, f"sweep {sweep_id!r}", parent)


def params_filter(wanted: dict[str, Optional[str]]) -> tuple[str, str]:
    """An MLflow search filter for runs whose params have the wanted values (None: any value), and its text."""
    given = {key: value for key, value in wanted.items() if value}
    for key, value in given.items():
        if text_problem(value):
            raise CompareError(f"{key}={value!r}: {text_problem(value)}")
    where = " and ".join(f"params.`{key}` = {filter_value(value)}" for key, value in given.items())
    return where, " ".join(f"{key}={value}" for key, value in given.items())


def select_runs(
    client,
    experiment: Optional[str] = None,
    sweep: Optional[str] = None,
    run_ids: Optional[list[str]] = None,
    limit: int = 100,
    wanted: Optional[dict[str, Optional[str]]] = None,
) -> Selection:
    """The runs to compare: one sweep, one experiment, given run ids, or by default the newest sweep.

    Without a selector it takes the sweep of the newest parent run; with no sweep in the store,
    the newest ``limit`` runs of the experiment holding the newest run. ``wanted`` (param -> value) keeps the
    runs whose params match, searched in the store before ``limit``; without a selector, the newest matching run
    picks the sweep or the experiment.
    """
    where, shown = params_filter(wanted or {})
    experiments = client.search_experiments()
    all_ids = [e.experiment_id for e in experiments]
    if run_ids:
        selection = _given_runs(client, run_ids, wanted or {}, shown)
    elif sweep:
        selection = _sweep_runs(client, all_ids, sweep, where, shown)
    elif experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None or found.lifecycle_stage != "active":
            known = ", ".join(sorted(e.name for e in experiments)) or "none"
            raise CompareError(f"no experiment {experiment!r} in the store (known: {known})")
        runs = [r for r in _search(client, [found.experiment_id], where, limit=limit) if not _is_parent(r)]
        if not runs:
            raise CompareError(f"experiment {experiment!r} has no runs" + (f" with {shown}" if shown else ""))
        parents = {r.data.tags.get(PARENT_TAG) for r in runs}
        selection = Selection(runs, f"experiment {experiment!r}", parents.pop() if len(parents) == 1 else None)
    else:
        selection = _newest_runs(client, all_ids, limit, where, shown)
    selection.runs = sorted(selection.runs, key=lambda r: (r.info.start_time or 0, r.info.run_name or ""))
    return selection


def _given_runs(client, run_ids: list[str], wanted: dict[str, Optional[str]], shown: str) -> Selection:
    from mlflow.exceptions import MlflowException

    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(resolve_run_id(client, run_id)))
        except (MlflowException, RunNotFound) as exc:
            raise CompareError(
                str(exc) if isinstance(exc, RunNotFound) else f"no run {run_id!r} in the store"
            ) from None
    runs = [r for r in runs if all(param(r.data.params, k) == v for k, v in wanted.items() if v)]
    if not runs:
        raise CompareError(f"none of the given runs has {shown}")
    parents = {r.data.tags.get(PARENT_TAG) for r in runs}
    return Selection(runs, f"{len(runs)} given run(s)", parents.pop() if len(parents) == 1 else None)


def _newest_runs(client, all_ids: list[str], limit: int, where: str, shown: str) -> Selection:
    """The sweep of the newest parent run (of the newest matching run, with ``where``), else the newest runs of
    the experiment holding the newest (matching) run."""
    if not all_ids:
        raise CompareError("the store has no experiments")
    newest = _search(client, all_ids, where, limit=1) if where else []
    if where and not newest:
        raise CompareError(f"the store has no runs with {shown}")
    if where:
        sweep = newest[0].data.tags.get(SWEEP_TAG)
    else:
        parent = next((r for r in _search(client, all_ids, f"tags.{SWEEP_TAG} LIKE '%'") if _is_parent(r)), None)
        sweep = parent.data.tags[SWEEP_TAG] if parent is not None else None
    if sweep:
        return _sweep_runs(client, all_ids, sweep, where, shown)
    newest = newest or _search(client, all_ids, limit=1)
    if not newest:
        raise CompareError("the store has no runs")
    experiment_id = newest[0].info.experiment_id
    runs = [r for r in _search(client, [experiment_id], where, limit=limit) if not _is_parent(r)]
    name = client.get_experiment(experiment_id).name
    return Selection(runs, f"the newest {len(runs)} run(s) of experiment {name!r}", None)


def schema_defaults() -> dict[str, str]:
    """The keys added to the config after runs were stored (the schema's defaults, ``lora.use_dora`` ...), as a run
    logs their default (``src.tracking.log_params``)."""
    import dataclasses

    from src.config_schema import HINTS, SCHEMA, Config

    sections = {tp: name for name, tp in HINTS[Config].items()}
    return {
        f"{sections[cls]}.{f.name}": "null" if f.default is None else str(f.default)
        for cls in SCHEMA
        if cls in sections
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING
    }


def with_schema_defaults(params: dict) -> dict:
    """A run's params, with the default of each key its config was stored without: a run from before
    ``lora.use_dora`` existed trained plain LoRA, and compares (and groups its seeds) as one that logged it."""
    if "lora.preset" not in params:  # not a training run of this project's config
        return dict(params)
    return {**schema_defaults(), **params}


def param(params: dict, key: str) -> Optional[str]:
    value = params.get(key)
    return None if value in (None, "null", "None", "") else value


class RunNotFound(LookupError):
    """No run, or more than one (``candidates``), matches a run id or its prefix."""

    def __init__(self, message: str, candidates: tuple[str, ...] = ()):
        super().__init__(message)
        self.candidates = candidates


def resolve_run_id(client, ref: str) -> str:
    """The full id of the run that ``ref`` names: a whole run id, or a unique prefix of one (``src.compare``
    prints the first 8 characters). Raises RunNotFound, naming the candidates when the prefix is ambiguous."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    ref = ref.strip()
    try:
        return client.get_run(ref).info.run_id
    except MlflowException:
        pass
    if len(ref) < 4 or not all(c in "0123456789abcdef" for c in ref.lower()):
        raise RunNotFound(f"no run {ref!r} in the store")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    matches, token = [], None
    while experiments:
        page = client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=50000, page_token=token)
        matches += [r for r in page if r.info.run_id.startswith(ref.lower())]
        token = page.token
        if not token:
            break
    if not matches:
        raise RunNotFound(f"no run {ref!r} in the store")
    if len(matches) > 1:
        named = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in matches[:5])
        raise RunNotFound(
            f"run id prefix {ref!r} is ambiguous: {len(matches)} runs start with it: {named}",
            tuple(r.info.run_id for r in matches),
        )
    return matches[0].info.run_id
