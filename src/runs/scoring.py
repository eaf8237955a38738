"""Score predictions against the labels an input file carries, with training's own label rule and metrics.

When a file given to ``src.predict`` holds the run's label column (``data.label_column``, or every one of
``data.label_columns`` for multi-label), each cell is read as training reads it (:func:`src.data.label_of`),
and the metrics come from :class:`src.training.ClassificationMetrics` over ALL of the run's labels, so a score
here is the score training would log on the same rows. A label the run never saw is not scored: its rows are
named; a row with no label (empty, null) is not scored either, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pandas as pd

from src.config import DataConfig
from src.data import label_of

MAX_ROWS_SHOWN = 10
BINARY = {"0": 0, "false": 0, "1": 1, "true": 1}  # a multi-label cell, as training reads it


@dataclass
class Scores:
    """Metrics on the rows with a known label; the rows left out and why."""

    label_columns: list[str]
    rows_scored: int
    metrics: dict[str, float]
    report: dict[str, Any]  # sklearn's classification_report over all of the run's labels
    unknown: list[dict[str, Any]] = field(default_factory=list)  # {"row", "column", "label"} per cell left out
    unlabeled_rows: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "label_columns": self.label_columns,
            "rows_scored": self.rows_scored,
            "metrics": self.metrics,
            "report": self.report,
            "unknown_labels": self.unknown,
            "unlabeled_rows": self.unlabeled_rows,
        }


def label_columns_of(task: str, d: DataConfig) -> list[str]:
    return list(d.label_columns) if task == "multilabel" else [d.label_column]


def _classes(df: pd.DataFrame, column: str, labels: list[str]) -> tuple[list[Optional[int]], list[dict], list[int]]:
    """(class index per row or None, unknown labels by row, rows with no label)."""
    index = {name: i for i, name in enumerate(labels)}
    classes: list[Optional[int]] = []
    unknown, unlabeled = [], []
    for row, value in enumerate(df[column].tolist()):
        name = label_of(value)
        if name is None:
            unlabeled.append(row)
        elif name not in index:
            unknown.append({"row": row, "column": column, "label": name})
        classes.append(index.get(name) if name is not None else None)
    return classes, unknown, unlabeled


def _matrix(df: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, list[dict], list[int]]:
    """(0/1 matrix with -1 where a cell is not 0/1, cells that are not 0/1 by row, rows with no label at all)."""
    matrix = np.full((len(df), len(columns)), -1, dtype=np.int64)
    unknown = []
    for j, column in enumerate(columns):
        for row, value in enumerate(df[column].tolist()):
            name = label_of(value)
            if name is not None and name.casefold() in BINARY:
                matrix[row, j] = BINARY[name.casefold()]
            elif name is not None:
                unknown.append({"row": row, "column": column, "label": name})
    missing = [[label_of(v) is None for v in df[c].tolist()] for c in columns]
    unlabeled = [row for row in range(len(df)) if all(m[row] for m in missing)]
    return matrix, sorted(unknown, key=lambda u: u["row"]), unlabeled


def score(
    df: pd.DataFrame, task: str, d: DataConfig, labels: list[str], logits: np.ndarray, threshold: float
) -> Optional[Scores]:
    """Scores of ``logits`` against the input's labels; None when the input lacks the run's label column(s)."""
    from src.training import ClassificationMetrics

    columns = label_columns_of(task, d)
    if not all(c in df.columns for c in columns):
        return None
    if task == "multilabel":
        matrix, unknown, unlabeled = _matrix(df, columns)
        keep = (matrix >= 0).all(axis=1)
        y_true = matrix[keep]
    else:
        classes, unknown, unlabeled = _classes(df, columns[0], labels)
        keep = np.array([c is not None for c in classes], dtype=bool)
        y_true = np.array([c for c in classes if c is not None], dtype=np.int64)
    if not keep.any():
        return Scores(columns, 0, {}, {}, unknown, unlabeled)
    metrics = ClassificationMetrics(task, labels, threshold)
    values = metrics(SimpleNamespace(predictions=logits[keep], label_ids=y_true))
    return Scores(columns, int(keep.sum()), values, metrics.last_report, unknown, unlabeled)


def _rows(rows: list[int]) -> str:
    more = f", ... ({len(rows)} in all)" if len(rows) > MAX_ROWS_SHOWN else ""
    return ", ".join(map(str, rows[:MAX_ROWS_SHOWN])) + more


def scores_summary(scores: Scores) -> str:
    """What a user reads on stderr: the rows left out, the headline metrics and the per-label report."""
    lines = []
    if scores.unknown:
        cells = [f"row {u['row']} {u['column']}={u['label']!r}" for u in scores.unknown[:MAX_ROWS_SHOWN]]
        more = f", ... ({len(scores.unknown)} in all)" if len(scores.unknown) > MAX_ROWS_SHOWN else ""
        lines.append(f"note: not scored, labels the run does not know: {', '.join(cells)}{more}")
    if scores.unlabeled_rows:
        lines.append(f"note: not scored, no label: row {_rows(scores.unlabeled_rows)}")
    if not scores.rows_scored:
        lines.append(f"note: no row has a label the run knows in {', '.join(scores.label_columns)}: nothing scored")
        return "\n".join(lines)
    headline = ("accuracy", "subset_accuracy", "f1_macro", "f1_micro")
    shown = ", ".join(f"{k} {scores.metrics[k]:.4f}" for k in headline if k in scores.metrics)
    lines.append(f"scores on {scores.rows_scored} labelled row(s): {shown}")
    lines.append(format_report(scores.report))
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """sklearn's text layout for a report dict: one row per label, then the averages."""
    rows = [(name, cells) for name, cells in report.items() if isinstance(cells, dict)]
    width = max([len(name) for name, _ in rows] + [12])
    out = [f"{'':>{width}}  precision     recall   f1-score    support"]
    for name, cells in rows:
        out.append(
            f"{name:>{width}}  {cells['precision']:>9.4f}  {cells['recall']:>9.4f}  {cells['f1-score']:>9.4f}  "
            f"{int(cells['support']):>9d}"
        )
    if "accuracy" in report:
        out.append(f"{'accuracy':>{width}}  {'':>9}  {'':>9}  {report['accuracy']:>9.4f}")
    return "\n".join(out)
