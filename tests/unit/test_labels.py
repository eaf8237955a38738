"""Label cells as a file holds them: integers are values, empty cells are faults named by row, one label spelled several
ways is one class."""

from __future__ import annotations

import pandas as pd
import pytest

from src.data import DataError, load_data, read_table
from tests.unit.test_data import _file_cfg, _write_csv, _write_jsonl


def _all_labels(data) -> list[str]:
    """The class name of every row of both splits, in row_id order."""
    rows = [(r, data.labels[y]) for split in (data.train, data.eval) for r, y in zip(split["row_id"], split["label"])]
    return [name for _, name in sorted(rows, key=lambda x: int(x[0]))]


def test_integer_label_cells_are_values_not_positions(tmp_path):
    """Cell 1 is class "1" whatever the order of data.labels (it used to index data.labels: all inverted)."""
    cells = [0, 1] * 10
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[f"text {i}", c] for i, c in enumerate(cells)])
    assert read_table(path)["label"].tolist()[:2] == ["0", "1"]  # the file's text: no reader turns it into ints
    data = load_data(_file_cfg(path, "data.labels=['1','0']", "data.eval_fraction=0.2"))
    assert data.labels == ["1", "0"]
    assert _all_labels(data) == [str(c) for c in cells]


@pytest.mark.parametrize("missing", ["", "   ", None, float("nan")], ids=["empty", "blank", "null", "nan"])
def test_empty_or_null_labels_are_faults_naming_the_rows(tmp_path, missing):
    rows = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(8)]
    rows[3]["label"] = rows[6]["label"] = missing
    if isinstance(missing, float):  # JSON has no NaN: Parquet
        path = tmp_path / "d.parquet"
        pd.DataFrame(rows).to_parquet(path)
    elif missing is None:
        path = _write_jsonl(tmp_path / "d.jsonl", rows)
    else:
        path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[r["text"], r["label"]] for r in rows])
    with pytest.raises(DataError) as info:
        load_data(_file_cfg(path))
    assert info.value.faults == ["train: 2 empty or missing label(s) in column 'label' at row 3, 6"]


def test_one_label_spelled_several_ways_is_one_class(tmp_path):
    """Strings that read as integral numbers are those numbers: "1", 1, 1.0 and "1.0" are one class "1"."""
    spellings = ["1", 1, "1.0", 1.0, " 1 ", "0", 0, 0.0, "0.0", "0"]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(spellings * 2)])
    data = load_data(_file_cfg(path, "data.eval_fraction=0.25"))
    assert data.labels == ["0", "1"]
    assert _all_labels(data) == ["1"] * 5 + ["0"] * 5 + ["1"] * 5 + ["0"] * 5
    # A code with a leading zero is not a number: "01" stays its own class (a fault here, as data.labels lacks it).
    path = _write_jsonl(tmp_path / "codes.jsonl", [{"text": "a", "label": "01"}, {"text": "b", "label": 1}])
    with pytest.raises(DataError, match=r"outside the label set \['0', '1'\]: '01' at row 0"):
        load_data(_file_cfg(path, "data.labels=['0','1']"))
