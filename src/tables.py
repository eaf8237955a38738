"""Parsing that keeps a data file's cells and names as the file wrote them, for :func:`src.data.read_table`.

pandas and ``json`` resolve some things silently: a second ``label`` header becomes ``label.1``, a key repeated
in a JSON object keeps its last value, and a JSON column of ints and floats becomes float64, which rounds past
2**53. Here those are exact, or found so that the reader can refuse them.
"""

from __future__ import annotations

import csv
import decimal
import io
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any


class RepeatedKey(ValueError):
    """A JSON object that names one key twice: ``json.loads`` would keep the last value without a word."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    repeated = repeats(k for k, _ in pairs)
    if repeated:
        raise RepeatedKey(f"key(s) {', '.join(map(repr, repeated))} repeated in one JSON object; keep one of each")
    return dict(pairs)


def _exact_float(text: str) -> float | decimal.Decimal:
    """A JSON number with a fraction or exponent: a float where one holds it exactly, else a decimal
    ("9007199254740993.0" would round to ...992 as a float, and be another label's number)."""
    value = float(text)
    return value if decimal.Decimal(repr(value)) == decimal.Decimal(text) else decimal.Decimal(text)


def exact_json(text: str) -> Any:
    """JSON with its numbers exact: ints as Python ints, floats as :func:`_exact_float`; raises RepeatedKey for a
    key repeated in one object."""
    return json.loads(text, parse_float=_exact_float, object_pairs_hook=_unique_keys)


def csv_header(text: str, sep: str) -> list[str]:
    """The header row as written (the first row that is not blank, as pandas takes it)."""
    for row in csv.reader(io.StringIO(text), delimiter=sep):
        if row:
            return row
    return []


def repeats(names: Iterable[Any]) -> list[str]:
    """The names that occur more than once, sorted."""
    return sorted(str(name) for name, count in Counter(names).items() if count > 1)
