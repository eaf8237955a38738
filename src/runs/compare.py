"""Compare runs: one table with the best run and the Pareto front marked, and plots.

    python -m src.compare                                    # the newest sweep, else the newest runs
    python -m src.compare --sweep SWEEP_ID --format csv > sweep.csv
    python -m src.compare --experiment lora-sweeps --metric eval_accuracy --sort eval_accuracy
    python -m src.compare --pareto quality:max,params:min --plot sweep.png

Runs are read from the MLflow store (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the
project's ``mlflow.db``) by the names in ``src/tracking.py`` (which runs: :mod:`src.runs.selection`).
``--task``, ``--data`` and ``--model`` keep the runs of one task, dataset or model. Runs of several tasks are
compared only where ``--metric`` (or ``--sort``, ``--pareto``) names a metric that one task's runs alone log: the
others are left out with a note (:func:`one_task`).

Each row shows its run id's first 8 characters (what ``--runs`` takes) and, besides the fixed columns, a column
for every param that differs among the rows shown (``data.class_weights``, ``train.learning_rate``...).

Runs of one config that differ only in ``train.seed`` are shown as one row, mean ± sample
standard deviation (``--no-group-seeds`` lists them apart); failed runs are never averaged in.
``md`` and ``html`` are for people; ``csv`` and ``json`` are for programs and carry raw numbers,
run ids and the standard deviations as separate fields. The pure pieces (:func:`pareto_front`,
:func:`pick_best`, :func:`group_seeds`, :func:`format_table`) take plain rows and need no store.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from src.config import OBJECTIVE_DEFAULTS
from src.errors import run_cli
from src.logger import say
from src.runs.gpu_use import gpu_utilization
from src.runs.samples import samples_text
from src.runs.selection import Selection, param, select_runs, with_schema_defaults
from src.runs.table import Column, CompareError, format_table, is_number

__all__ = ["Column", "CompareError", "format_table", "group_seeds", "main", "pareto_front", "pick_best"]

# Params that may differ between runs that repeat one config with another seed.
SEED_FREE_PARAMS = frozenset({"train.seed", "output_dir", "tracking.run_name"})
# Params the fixed columns show: a param column is added for any other that differs among the rows shown.
SHOWN_PARAMS = SEED_FREE_PARAMS | {
    *("model.name", "data.name", "data.task", "quant.bits"),
    *("lora.preset", "lora.resolved_targets", "lora.target_modules", "lora.r", "lora.alpha"),
}
# --task, --data and --model: the param each one matches.
FILTERS = {"task": "data.task", "data": "data.name", "model": "model.name"}
MAX_MISSING_LISTED = 30


CONFIG_COLUMNS = (
    Column("run", "run"),
    Column("id", "run id", people_only=True),  # the 8 characters --runs, src.predict and src.export take
    Column("model", "model"),
    Column("data", "data"),
    Column("task", "task"),
    Column("bits", "base bits", "d", "min"),
    Column("targets", "target modules"),
    Column("r", "r", "d", "min"),
    Column("alpha", "alpha", "d", "min"),
    Column("seeds", "seeds"),
)
COST_COLUMNS = (
    Column("trainable_params_m", "trainable params (M)", ".4g", "min"),
    Column("trainable_pct", "trainable %", ".4g", "min"),
    Column("peak_gpu_mem_gb", "peak GPU mem (GB)", ".2f", "min"),
    Column("gpu_util_pct", "GPU util %", ".0f", "max"),  # shown where a run logged it: src.runs.gpu_use
    Column("train_tokens_per_s", "tokens/s", ".1f", "max"),
    Column("train_runtime_s", "runtime (s)", ".1f", "min"),
    Column("status", "status"),
)
# Short names accepted by --sort, --pareto and --metric, besides column keys and metric names.
ALIASES = {
    "params": "trainable_params_m",
    "trainable_params": "trainable_params_m",
    "memory": "peak_gpu_mem_gb",
    "gpu_util": "gpu_util_pct",
    "tokens_per_s": "train_tokens_per_s",
    "runtime": "train_runtime_s",
}


# ---------------------------------------------------------------------------------------------
# Pure pieces: rows are dicts keyed by column key, plus "run_ids", "config_key" and "std".


def metric_direction(name: str) -> str:
    """Best direction of a quality metric that is not the objective: losses go down, scores up."""
    return "min" if any(word in name for word in ("loss", "perplexity", "error")) else "max"


def pareto_front(points: Sequence[Sequence[Optional[float]]], directions: Sequence[str]) -> list[bool]:
    """Which points no other point dominates.

    Args:
        points: One (x, y) per row; a None or NaN coordinate keeps that row off the front.
        directions: ``"max"`` or ``"min"`` for x and for y.

    Returns:
        One flag per point. Equal points do not dominate each other, so both stay on the front.
    """
    signs = [1.0 if d == "max" else -1.0 for d in directions]
    scored = [tuple(s * float(v) for s, v in zip(signs, p)) if all(is_number(v) for v in p) else None for p in points]

    def dominates(a: tuple, b: tuple) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [
        a is not None and not any(b is not None and dominates(b, a) for j, b in enumerate(scored) if j != i)
        for i, a in enumerate(scored)
    ]


def pick_best(rows: Sequence[dict], key: str, direction: str, tie_key: str = "trainable_params_m") -> Optional[int]:
    """Index of the best row on ``key``; ties go to fewer ``tie_key`` (trainable params), then to the first.

    Only finished runs are ranked: a killed or failed run may hold an eval logged before it stopped."""
    best, best_score = None, None
    for i, row in enumerate(rows):
        value = row.get(key)
        if not is_number(value) or row.get("status", "FINISHED") != "FINISHED":
            continue
        tie = row.get(tie_key)
        score = (value if direction == "max" else -value, -tie if is_number(tie) else -math.inf)
        if best_score is None or score > best_score:
            best, best_score = i, score
    return best


def group_seeds(rows: Sequence[dict], numeric_keys: Sequence[str]) -> list[dict]:
    """Merge FINISHED rows with the same ``config_key`` (the same config up to ``train.seed``).

    A merged row keeps the first row's text fields, concatenates ``run_ids`` and ``seeds``, holds
    the mean of each numeric key over the runs that logged it, and the sample standard deviation
    in ``row["std"]`` where at least two runs did. Other rows pass through unchanged, in order.
    """
    groups: dict[Any, list[dict]] = {}
    order: list[Any] = []
    for i, row in enumerate(rows):
        key = ("config", row["config_key"]) if row.get("status") == "FINISHED" else ("run", i)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(row)
    merged = []
    for key in order:
        members = groups[key]
        if len(members) == 1:
            merged.append(members[0])
            continue
        row = dict(members[0])
        row["run_ids"] = [run_id for m in members for run_id in m["run_ids"]]
        row["seeds"] = sorted(seed for m in members for seed in m["seeds"])
        row["std"] = {}
        for k in numeric_keys:
            values = [m[k] for m in members if is_number(m.get(k))]
            row[k] = statistics.fmean(values) if values else None
            if len(values) >= 2:
                row["std"][k] = statistics.stdev(values)
        merged.append(row)
    return merged


def sort_rows(rows: Sequence[dict], key: str, direction: str) -> list[dict]:
    """Rows ordered best first on ``key``; rows without a value go last, in their order."""
    present = [r for r in rows if is_number(r.get(key))]
    missing = [r for r in rows if not is_number(r.get(key))]
    return sorted(present, key=lambda r: r[key], reverse=direction == "max") + missing


# ---------------------------------------------------------------------------------------------
# From MLflow runs to rows.


def _int(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def target_modules(params: dict) -> Optional[str]:
    """The adapted modules: the resolved leaf names, else the configured list, else the preset; a full
    fine-tuning run (lora=none) trains them all."""
    if param(params, "lora.preset") == "none":
        return "all weights (full fine-tuning)"
    resolved = param(params, "lora.resolved_targets")
    if resolved:
        return resolved
    listed = param(params, "lora.target_modules")
    if listed:
        import ast

        try:
            return ",".join(str(x) for x in ast.literal_eval(listed))
        except (ValueError, SyntaxError):
            return listed
    return param(params, "lora.preset")


def run_objective(params: dict) -> Optional[tuple[str, str]]:
    """The run's objective (metric, "max"|"min"): its config's, else its task's default; None if unknown."""
    task = param(params, "data.task")
    if task not in OBJECTIVE_DEFAULTS:
        return None
    metric, direction = OBJECTIVE_DEFAULTS[task]
    metric = param(params, "objective.metric") or metric
    direction = param(params, "objective.direction") or direction
    return metric, "max" if direction == "maximize" else "min"


def run_row(run, quality: Sequence[str], objective_metric: Optional[str]) -> dict:
    """One row from an MLflow run; the objective metric's value is the run's ``objective`` metric."""
    params, metrics = with_schema_defaults(run.data.params), run.data.metrics
    trainable = metrics.get("trainable_params")
    row = {
        "run_ids": [run.info.run_id],
        "run": run.info.run_name,
        "params": params,
        "model": param(params, "model.name"),
        "data": param(params, "data.name"),
        "task": param(params, "data.task"),
        "bits": _int(param(params, "quant.bits")),
        "targets": target_modules(params),
        "r": _int(param(params, "lora.r")),
        "alpha": _int(param(params, "lora.alpha")),
        "seeds": [_int(param(params, "train.seed"))] if param(params, "train.seed") else [],
        "trainable_params_m": trainable / 1e6 if trainable is not None else None,
        "trainable_pct": metrics.get("trainable_pct"),
        "peak_gpu_mem_gb": metrics.get("peak_gpu_mem_gb"),
        "train_tokens_per_s": metrics.get("train_tokens_per_s"),
        "train_runtime_s": metrics.get("train_runtime_s"),
        "status": run.info.status,
        "config_key": tuple(sorted((k, v) for k, v in params.items() if k not in SEED_FREE_PARAMS)),
    }
    for name in quality:
        row[name] = metrics.get("objective", metrics.get(name)) if name == objective_metric else metrics.get(name)
    return row


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg): quality vs trainable params, quality vs peak memory, curves.


def _scatter(rows: Sequence[dict], x: Column, y: Column, path: Path, log_x: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if is_number(r.get(x.key)) and is_number(r.get(y.key))]
    front = pareto_front([(r[x.key], r[y.key]) for r in shown], (x.direction, y.direction))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, on_front in zip(shown, front):
        std = (row.get("std") or {}).get(y.key)
        ax.errorbar(
            row[x.key],
            row[y.key],
            yerr=std,
            fmt="*" if row.get("best") else "o",
            markersize=12 if row.get("best") else 6,
            color="tab:red" if on_front else "tab:blue",
            capsize=3,
        )
        ax.annotate(
            row["run"] or row["run_ids"][0][:8],
            (row[x.key], row[y.key]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    edge = sorted((r[x.key], r[y.key]) for r, f in zip(shown, front) if f)
    if edge:
        ax.plot([p[0] for p in edge], [p[1] for p in edge], "-", color="tab:red", label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    if log_x:
        ax.set_xscale("log")
        ax.tick_params(axis="x", which="minor", labelsize=7)  # a narrow log range labels its minor ticks
    ax.set_xlabel(x.header)
    ax.set_ylabel(y.header)
    ax.set_title(f"{y.header} vs {x.header}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(client, runs: Sequence, quality: str, path: Path) -> bool:
    """train_loss and the quality metric over steps, one line per run; False if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    drawn = False
    for ax, key in zip(axes, ("train_loss", quality)):
        for run in runs:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
            if history:
                seed = param(run.data.params, "train.seed")
                label = f"{run.info.run_name}" + (f" (seed {seed})" if seed else "")
                ax.plot([m.step for m in history], [m.value for m in history], marker=".", label=label)
                drawn = True
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def make_plots(client, selection: Selection, rows: Sequence[dict], quality: Column, path: Path) -> list[Path]:
    """Write the plots next to ``path`` and log them to the sweep's parent run under ``compare/``.

    ``path`` gets quality vs trainable params; ``<stem>_memory.png`` quality vs peak GPU memory
    (skipped with a note when no run logged it); ``<stem>_curves.png`` the training/eval curves.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    params_col = next(c for c in COST_COLUMNS if c.key == "trainable_params_m")
    memory_col = next(c for c in COST_COLUMNS if c.key == "peak_gpu_mem_gb")
    written = []
    if any(is_number(r.get(params_col.key)) and is_number(r.get(quality.key)) for r in rows):
        _scatter(rows, params_col, quality, path, log_x=True)
        written.append(path)
    else:
        _note(f"skipped {path.name}: no run has both {quality.key} and trainable_params")
    memory_path = path.with_name(f"{path.stem}_memory.png")
    if any(is_number(r.get(memory_col.key)) and is_number(r.get(quality.key)) for r in rows):
        _scatter(rows, memory_col, quality, memory_path, log_x=False)
        written.append(memory_path)
    else:
        _note(f"skipped {memory_path.name}: no run logged peak_gpu_mem_gb (CPU runs do not)")
    curves_path = path.with_name(f"{path.stem}_curves.png")
    if _plot_curves(client, selection.runs, quality.key, curves_path):
        written.append(curves_path)
    else:
        _note(f"skipped {curves_path.name}: no run logged train_loss or {quality.key} history")
    if selection.parent_run_id and written:
        for file in written:
            client.log_artifact(selection.parent_run_id, str(file), artifact_path="compare")
        _note(f"logged {len(written)} plot(s) to parent run {selection.parent_run_id} under compare/")
    elif written:
        _note("plots not logged: the runs share no parent run")
    return written


# ---------------------------------------------------------------------------------------------
# The command.


def _note(message: str) -> None:
    say(message)


def _parse_ranked(spec: str, resolve) -> tuple[Column, str]:
    """``NAME`` or ``NAME:max|min`` -> (column, direction)."""
    name, _, direction = spec.partition(":")
    column = resolve(name.strip())
    direction = direction.strip() or column.direction
    if direction not in ("max", "min"):
        raise CompareError(f"cannot rank by {name!r}: give a direction, e.g. {name}:max or {name}:min")
    return column, direction


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.compare", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--experiment", help="All runs of this experiment (sweep parents excluded).")
    which.add_argument("--sweep", help="The child runs of this sweep id (tag sweep_id).")
    which.add_argument("--runs", help="Comma-separated run ids, or unique prefixes of them (the 8 characters printed).")
    parser.add_argument("--task", help="Only runs of this task (data.task): classification, multilabel or sft.")
    parser.add_argument("--data", help="Only runs on this dataset (data.name).")
    parser.add_argument("--model", help="Only runs of this model (model.name).")
    parser.add_argument("--format", choices=("md", "csv", "html", "json"), default="md")
    parser.add_argument(
        "--sort",
        metavar="NAME[:max|min]",
        help="Order rows best first by a column key or metric; names as for --pareto.",
    )
    parser.add_argument(
        "--metric",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="Extra quality metrics to show, besides the objective.",
    )
    parser.add_argument(
        "--pareto",
        metavar="X,Y",
        help="Mark the non-dominated runs on two columns: a column key "
        "(trainable_params_m, peak_gpu_mem_gb, ...), a logged metric, or quality (the objective), "
        "params, memory, tokens_per_s, runtime; each optionally :max or :min, "
        "e.g. quality,params or eval_accuracy:max,memory:min.",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="Write plots (FILE.png, FILE_memory.png, FILE_curves.png) and log them to the parent run.",
    )
    parser.add_argument("--no-group-seeds", action="store_true", help="List runs that differ only in seed apart.")
    parser.add_argument("--limit", type=int, default=100, help="At most this many runs by experiment or default.")
    parser.add_argument("--tracking-uri", help="Else $MLFLOW_TRACKING_URI, else the project's mlflow.db.")
    parser.add_argument(
        "--samples",
        action="store_true",
        help="Also show SFT generations before and after fine-tuning (samples.json) per run.",
    )
    return parser


def _objective(runs: list) -> tuple[str, str]:
    """The (metric, direction) the runs optimize; ("objective", "max") where none says."""
    objectives = {o for o in (run_objective(r.data.params) for r in runs) if o}
    if len(objectives) > 1:
        raise CompareError(f"the runs optimize different objectives ({', '.join(sorted(m for m, _ in objectives))})")
    return objectives.pop() if objectives else ("objective", "max")


def _column_resolver(columns: list[Column], quality: list[str], logged: set[str], objective_metric: str):
    """``resolve(name)``: a column by key, alias or logged metric name; a new metric becomes a quality column,
    added to ``columns`` (after the quality columns so far) and to ``quality``."""

    def resolve(name: str) -> Column:
        key = objective_metric if name in ("quality", "objective") else ALIASES.get(name, name)
        for column in columns:
            if column.key == key:
                return column
        if key not in logged:
            shown = sorted(logged)
            listed = ", ".join(shown[:MAX_MISSING_LISTED]) + (", ..." if len(shown) > MAX_MISSING_LISTED else "")
            raise CompareError(f"unknown metric {name!r}: no selected run logged it (logged: {listed or 'none'})")
        column = Column(key, key, ".4f", metric_direction(key))
        columns.insert(len(CONFIG_COLUMNS) + len(quality), column)
        quality.append(key)
        return column

    return resolve


def compare(args: argparse.Namespace) -> str:
    """Select, tabulate and plot as the parsed arguments say; return the table text."""
    import mlflow

    from src.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(args.tracking_uri))
    run_ids = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else None
    wanted = {key: getattr(args, option) for option, key in FILTERS.items()}
    selection = select_runs(client, args.experiment, args.sweep, run_ids, args.limit, wanted)
    runs = one_task(selection.runs, requested_metrics(args))
    objective_metric, objective_direction = _objective(runs)
    quality = [objective_metric]
    columns = [*CONFIG_COLUMNS, Column(objective_metric, objective_metric, ".4f", objective_direction), *COST_COLUMNS]
    resolve = _column_resolver(columns, quality, {key for r in runs for key in r.data.metrics}, objective_metric)
    for name in args.metric:
        resolve(name)
    pareto_spec = None
    if args.pareto:
        parts = args.pareto.split(",")
        if len(parts) != 2:
            raise CompareError(f"--pareto takes two columns X,Y, got {args.pareto!r}")
        pareto_spec = [_parse_ranked(p, resolve) for p in parts]
    sort_spec = _parse_ranked(args.sort, resolve) if args.sort else None

    rows = [{**run_row(r, quality, objective_metric), "gpu_util_pct": gpu_utilization(client, r)} for r in runs]
    if not any(is_number(row["gpu_util_pct"]) for row in rows):  # CPU runs, or system metrics off
        columns = [c for c in columns if c.key != "gpu_util_pct"]
    if not args.no_group_seeds:
        rows = group_seeds(rows, [c.key for c in columns if c.numeric and c.fmt != "d"])
    mark_rows(rows, (objective_metric, objective_direction), pareto_spec, args.pareto)
    if sort_spec:
        rows = sort_rows(rows, sort_spec[0].key, sort_spec[1])

    _note(
        f"{selection.description}: {len(runs)} run(s) in {len(rows)} row(s); "
        f"objective {objective_metric} ({objective_direction})"
    )
    if args.plot:
        make_plots(client, selection, rows, columns[len(CONFIG_COLUMNS)], args.plot)
    columns[len(CONFIG_COLUMNS) : len(CONFIG_COLUMNS)] = param_columns(rows)
    table = format_table(rows, columns, args.format)
    return table + "\n\n" + samples_text(client, runs) if args.samples else table


def requested_metrics(args: argparse.Namespace) -> list[str]:
    """The metrics that --metric, --sort and --pareto name, besides the objective and the fixed columns."""
    names = [*args.metric, *([args.sort] if args.sort else []), *(args.pareto.split(",") if args.pareto else [])]
    fixed = {c.key for c in (*CONFIG_COLUMNS, *COST_COLUMNS)} | {"quality", "objective"}
    keys = [ALIASES.get(n.partition(":")[0].strip(), n.partition(":")[0].strip()) for n in names]
    return [k for k in dict.fromkeys(keys) if k and k not in fixed]


def one_task(runs: list, metrics: Sequence[str]) -> list:
    """The runs of one task. Runs of several tasks are compared only where the requested ``metrics`` are logged by
    one task's runs alone (``--metric eval_accuracy`` over classification and SFT runs): its runs are kept, and a
    note says how many runs of other tasks were left out. A metric the other tasks never log cannot rank their
    runs, and an objective of one task says nothing about another's."""
    tasks = Counter(param(r.data.params, "data.task") for r in runs)
    tasks.pop(None, None)
    if len(tasks) <= 1:
        return runs
    counts = ", ".join(f"{task}: {n}" for task, n in sorted(tasks.items()))
    logging = {param(r.data.params, "data.task") for r in runs if metrics and all(m in r.data.metrics for m in metrics)}
    if len(logging) != 1 or None in logging:
        raise CompareError(
            f"the runs mix tasks ({counts}); pass --task {' or '.join(sorted(tasks))}, select one sweep, or pass --runs"
        )
    (task,) = logging
    kept = [r for r in runs if param(r.data.params, "data.task") == task]
    others = ", ".join(f"{t}: {n}" for t, n in sorted(tasks.items()) if t != task)
    _note(
        f"left out {len(runs) - len(kept)} run(s) of tasks that do not log {', '.join(metrics)} ({others}); "
        f"--task {task} selects the same runs"
    )
    return kept


def mark_rows(rows: list[dict], objective: tuple[str, str], pareto_spec, pareto_text: Optional[str]) -> None:
    """Mark the best row on the objective and, with ``pareto_spec`` ((column, direction) for x and y), the front."""
    best = pick_best(rows, *objective)
    for i, row in enumerate(rows):
        row["best"] = i == best
        row["id"] = ",".join(run_id[:8] for run_id in row["run_ids"])
    if pareto_spec:
        (x, x_dir), (y, y_dir) = pareto_spec
        if not any(is_number(r.get(x.key)) and is_number(r.get(y.key)) for r in rows):
            raise CompareError(f"--pareto {pareto_text}: no run has both {x.key} and {y.key}")
        points = [(r.get(x.key), r.get(y.key)) if r.get("status") == "FINISHED" else (None, None) for r in rows]
        for row, on in zip(rows, pareto_front(points, (x_dir, y_dir))):
            row["pareto"] = on


def param_columns(rows: list[dict]) -> list[Column]:
    """A column for every param that differs among ``rows`` and no fixed column shows (``data.class_weights``,
    ``train.learning_rate``), in key order; each row gets its value (a run without the param shows "-")."""
    keys = sorted({key for row in rows for key in row.get("params", {})} - SHOWN_PARAMS)
    differing = [k for k in keys if len({row.get("params", {}).get(k) for row in rows}) > 1]
    for row in rows:
        for key in differing:
            row[key] = param(row.get("params", {}), key)
    return [Column(key, key) for key in differing]


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: print(compare(args)))


if __name__ == "__main__":
    sys.exit(main())
