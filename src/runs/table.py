"""The table of :mod:`src.runs.compare`: its columns and its four formats (md, html, csv, json), from plain rows.

Rows are dicts keyed by column key, plus ``run_ids``, ``best``, ``pareto`` and ``std`` (key -> sample std).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from src.errors import UserError


class CompareError(UserError):
    """A selection or option that cannot be compared; the message is shown as one line."""


@dataclass(frozen=True)
class Column:
    """One table column.

    Attributes:
        key: Name in csv and json, and for ``--sort`` and ``--pareto``.
        header: Name in md and html.
        fmt: Format spec for numbers in md and html; empty for text.
        direction: ``"max"`` or ``"min"``: which way is better; None for text.
        people_only: Shown in md and html only (csv and json carry what it abbreviates).
    """

    key: str
    header: str
    fmt: str = ""
    direction: Optional[str] = None
    people_only: bool = False

    @property
    def numeric(self) -> bool:
        return self.direction is not None


def format_table(rows: Sequence[dict], columns: Sequence[Column], fmt: str) -> str:
    """Render rows as ``md``, ``html``, ``csv`` or ``json``.

    md and html show formatted cells ("0.8123 ± 0.0100"; no "± 0" for a zero spread; "-" when
    missing) and a ``mark`` column ("best", "front"). csv adds ``run_id`` and a ``<key>_std``
    column per numeric column that has one; json gives raw values with ``best``, ``pareto``,
    ``run_ids`` and ``std`` per row.
    """
    if fmt in ("csv", "json"):
        columns = [c for c in columns if not c.people_only]
    if fmt == "json":
        return json.dumps(
            {
                "columns": [{"key": c.key, "header": c.header, "direction": c.direction} for c in columns],
                "rows": [_json_row(r, columns) for r in rows],
            },
            indent=2,
        )
    if fmt == "csv":
        return _csv_table(rows, columns)
    header = ["mark"] + [c.header for c in columns]
    cells = [[_mark(r)] + [_cell(r, c) for c in columns] for r in rows]
    if fmt == "html":
        return _html_table(header, cells, rows, [False] + [c.numeric for c in columns])
    if fmt == "md":
        return _md_table(header, cells, [False] + [c.numeric for c in columns])
    raise CompareError(f"unknown format {fmt!r} (known: md, csv, html, json)")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _mark(row: dict) -> str:
    return " ".join(word for word, on in (("best", row.get("best")), ("front", row.get("pareto"))) if on)


def _cell(row: dict, column: Column) -> str:
    value = row.get(column.key)
    if column.key == "seeds":
        return ",".join(str(s) for s in value or [] if s is not None) or "-"
    if value is None or value == "":
        return "-"
    if column.fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            return "nan"
        text = format(value, column.fmt)
        std = (row.get("std") or {}).get(column.key)
        # A zero spread (trainable params across seeds, say) is left out rather than shown as "± 0".
        return text if not std or column.fmt == "d" else f"{text} ± {format(std, column.fmt)}"
    return str(value)


def _raw(value: Any) -> Any:
    """A value for csv/json: floats lose only float noise (10 significant digits); NaN becomes None."""
    if isinstance(value, float):
        return None if math.isnan(value) else float(f"{value:.10g}")
    return value


def _json_row(row: dict, columns: Sequence[Column]) -> dict:
    out: dict[str, Any] = {"best": bool(row.get("best")), "pareto": row.get("pareto"), "run_ids": row["run_ids"]}
    out.update({c.key: _raw(row.get(c.key)) for c in columns})
    out["std"] = {k: _raw(v) for k, v in (row.get("std") or {}).items()}
    return out


def _csv_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    with_std = {k for r in rows for k in (r.get("std") or {})}
    keys = ["mark", "run_id"]
    for c in columns:
        keys.append(c.key)
        if c.key in with_std:
            keys.append(f"{c.key}_std")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(keys)
    for r in rows:
        values = {"mark": _mark(r), "run_id": ";".join(r["run_ids"])}
        for c in columns:
            value = r.get(c.key)
            values[c.key] = ",".join(str(s) for s in value) if c.key == "seeds" else _raw(value)
            values[f"{c.key}_std"] = _raw((r.get("std") or {}).get(c.key))
        writer.writerow(["" if values[k] is None else values[k] for k in keys])
    return buffer.getvalue().rstrip("\n")


def _md_table(header: list[str], cells: list[list[str]], right: list[bool]) -> str:
    escaped = [[text.replace("|", "\\|") for text in row] for row in [header, *cells]]
    widths = [max(3, *(len(row[i]) for row in escaped)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(t.rjust(w) if r else t.ljust(w) for t, w, r in zip(row, widths, right)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, right)) + " |"
    return "\n".join([line(escaped[0]), rule, *(line(row) for row in escaped[1:])])


def _html_table(header: list[str], cells: list[list[str]], rows: Sequence[dict], right: list[bool]) -> str:
    def cell(tag: str, text: str, is_right: bool) -> str:
        style = ' style="text-align:right"' if is_right else ""
        return f"<{tag}{style}>{html.escape(text)}</{tag}>"

    lines = [
        '<table class="compare">',
        "<thead>",
        "<tr>" + "".join(map(cell, ["th"] * len(header), header, right)) + "</tr>",
        "</thead>",
        "<tbody>",
    ]
    for texts, row in zip(cells, rows):
        opening = '<tr class="best">' if row.get("best") else "<tr>"
        lines.append(opening + "".join(map(cell, ["td"] * len(texts), texts, right)) + "</tr>")
    return "\n".join([*lines, "</tbody>", "</table>"])
