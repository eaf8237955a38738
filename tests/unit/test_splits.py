"""Made splits (src.splits): a train or eval split that would be empty is refused."""

from __future__ import annotations

import pytest

from src.data import DataError, load_data
from tests.unit.test_data import _data_cfg, _file_cfg, _write_csv, _write_jsonl


def test_a_made_eval_split_that_would_be_empty_is_refused(tmp_path):
    # One row per class: a class of two or more rows always keeps one in each split.
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[f"t{i}", f"c{i}"] for i in range(6)])
    with pytest.raises(DataError) as info:
        load_data(_file_cfg(path, "data.eval_fraction=0.1"))
    assert info.value.faults == [
        "eval split is empty: 6 row(s) with data.eval_fraction=0.1 (stratified by class); "
        "raise data.eval_fraction, or give data.eval_path"
    ]
    sft = _write_jsonl(tmp_path / "s.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"}])
    with pytest.raises(DataError, match=r"train split is empty: 1 row\(s\) with data.eval_fraction=0.1"):
        load_data(_data_cfg(["data=file", f"data.path={sft}", "data.task=sft", "data.eval_fraction=0.1"]))


def test_a_made_train_split_that_would_be_empty_is_refused(tmp_path):
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "x"], ["b", "y"]])
    with pytest.raises(DataError, match=r"train split is empty: 2 row\(s\) with data.eval_fraction=0.9"):
        load_data(_file_cfg(path, "data.eval_fraction=0.9"))
