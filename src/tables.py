"""Reading a data file (CSV, TSV, JSON, JSONL, Parquet) into a table that keeps its cells and names as the file
wrote them: :func:`read_table`.

pandas and ``json`` resolve some things silently: a second ``label`` header becomes ``label.1``, a key repeated
in a JSON object keeps its last value, and a JSON column of ints and floats becomes float64, which rounds past
2**53. Here those are exact, or found so that the reader can refuse them.
"""

from __future__ import annotations

import codecs
import csv
import decimal
import io
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from src.errors import ProblemsError

MAX_IDS_SHOWN = 20  # row ids or lines an error names before it counts the rest


class DataError(ProblemsError):
    """The data failed validation; the message lists every fault with the rows at fault."""

    title = "invalid data"

    @property
    def faults(self) -> list[str]:
        return self.problems


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


def read_table(path: str | Path) -> pd.DataFrame:
    """Read CSV, TSV, JSON, JSONL or Parquet exactly: no NA guessing, quoted newlines kept.

    A file that cannot be read (a directory, 0 bytes, invalid UTF-8, a broken JSON line, a header and no
    rows, ...) is one DataError that names the file and, where there is one, the line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise DataError([f"data file not found: {path}"])
    if path.is_dir():
        raise DataError([f"data file {path} is a directory, not a file"])
    if suffix not in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        raise DataError([f"unsupported data file type {suffix!r} ({path}); use .csv, .tsv, .json, .jsonl or .parquet"])
    try:
        if path.stat().st_size == 0:
            raise DataError([f"data file {path} is empty (0 bytes)"])
        if suffix == ".parquet":
            df = _read_parquet(path)
        else:
            df = _read_text_table(path, suffix, _decode(path.read_bytes(), path))
    except OSError as exc:  # unreadable: permissions, a broken mount
        raise DataError([f"cannot read data file {path}: {exc.strerror or exc}"]) from exc
    if len(df) == 0:
        header = f", only a header (columns {list(df.columns)})" if len(df.columns) else ""
        raise DataError([f"data file {path} has no rows{header}"])
    return df


def _decode(raw: bytes, path: Path) -> str:
    """The file's text; a byte-order mark (Excel's "CSV UTF-8") is dropped."""
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(
            [
                f"data file {path} is not valid UTF-8 at line {line} (byte offset {offset}: "
                f"0x{raw[offset]:02x}); save it as UTF-8"
            ]
        ) from None


def _read_text_table(path: Path, suffix: str, text: str) -> pd.DataFrame:
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        try:
            # Every cell as its text (dtype=str): pandas would read "01" as 1 and "1.50" as 1.5, merging labels
            # before canonical_label sees them. keep_default_na=False: "NA" or "null" is data; empty cells stay "".
            df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_values=[])
        except pd.errors.EmptyDataError:
            raise DataError([f"data file {path} has no header row (only blank lines)"]) from None
        except pd.errors.ParserError as exc:  # pandas names the line: "Expected 2 fields in line 3, saw 3"
            raise DataError([f"data file {path}: cannot parse it as {suffix[1:].upper()}: {exc}".strip()]) from None
        _refuse_repeats(csv_header(text, sep), f"data file {path}: header")
        return df
    if suffix == ".jsonl":
        return pd.DataFrame(_json_lines(path, text), dtype=object)
    try:
        table = exact_json(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            [f"data file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"]
        ) from None
    except RepeatedKey as exc:
        raise DataError([f"data file {path}: {exc}"]) from None
    if isinstance(table, list) and not all(isinstance(row, dict) for row in table):
        raise DataError([f"data file {path}: JSON that is not a table of rows (a list of items that are not objects)"])
    if not isinstance(table, (list, dict)):
        raise DataError([f"data file {path}: JSON that is not a table of rows (a {type(table).__name__})"])
    try:  # a list of row objects, or pandas' default orient: {column: {row: value}} or {column: [values]}
        return pd.DataFrame(table, dtype=object)
    except ValueError as exc:  # ragged columns
        raise DataError([f"data file {path}: JSON that is not a table of rows ({exc})"]) from None


def _refuse_repeats(names: list[Any], where: str) -> None:
    repeated = repeats(names)
    if repeated:
        raise DataError([f"{where} repeats column name(s) {', '.join(map(repr, repeated))}; rename or drop one"])


def _json_lines(path: Path, text: str) -> list[dict]:
    """The records of a JSONL file; every line that is not a JSON object is reported, by line number."""
    records, bad = [], []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and other line separators unescaped.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = exact_json(line)
        except json.JSONDecodeError as exc:
            bad.append(f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except RepeatedKey as exc:
            bad.append(f"line {number}: {exc}")
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(f"line {number} is not a JSON object (a {type(record).__name__})")
    if bad:
        more = f"; ... ({len(bad)} lines in all)" if len(bad) > MAX_IDS_SHOWN else ""
        raise DataError([f"data file {path}: {'; '.join(bad[:MAX_IDS_SHOWN])}{more}"])
    return records


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        # integer_object_nulls: an int column with nulls stays ints (None for null), not float64, which rounds
        # past 2**53 and would merge two labels.
        return pd.read_parquet(path, to_pandas_kwargs={"integer_object_nulls": True})
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError: "magic bytes not found", ...
        raise DataError([f"data file {path}: cannot read it as Parquet ({exc})"]) from None
