"""Data loading, validation reports, splits and weights, on the project's own fixtures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from src import bundled
from src.config import validate
from src.data import DataError, iterative_stratification, load_data, read_table
from tests.conftest import SHARED_DATA, compose_config


def _data_cfg(overrides: list[str]):
    return validate(compose_config(overrides)).data


def _write_csv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_bundled_files_are_reproducible(tmp_path):
    for path in bundled.write_all(tmp_path):
        assert path.read_bytes() == (bundled.DATA_DIR / path.name).read_bytes(), path.name


def test_bundled_sets_load_for_each_task():
    cls = load_data(_data_cfg([]))
    assert (cls.train.num_rows, cls.eval.num_rows) == (600, 200)
    assert cls.labels == ["food", "sports", "tech"]
    assert set(cls.train.column_names) == {"text", "label", "row_id"}
    ml = load_data(_data_cfg(["data=topics_multilabel"]))
    assert ml.labels == ["sports", "food", "tech", "music"]
    assert len(ml.train[0]["labels"]) == 4
    sft = load_data(_data_cfg(["data=instructions"]))
    assert sft.train[0]["prompt"].endswith("### Response:\n")
    assert sft.train[0]["completion"] == "recipes"


def test_validation_report_lists_every_fault_with_row_ids(tmp_path):
    path = _write_csv(
        tmp_path / "bad.csv",
        ["id", "text", "label"],
        [
            ["a1", "good text", "pos"],
            ["a2", "", "neg"],
            ["a3", "   ", "pos"],
            ["a4", "fine", "maybe"],
            ["a5", "ok", "neg"],
            ["a6", "ok", "7"],
        ],
    )
    cfg = _data_cfg(
        [
            "data=file",
            f"data.path={path}",
            "data.task=classification",
            "data.label_column=label",
            "data.labels=[neg,pos]",
        ]
    )
    with pytest.raises(DataError) as info:
        load_data(cfg)
    faults = info.value.faults
    assert len(faults) == 2, faults
    assert "2 empty or missing text(s) in column 'text' at id a2, a3" in faults[0]
    assert "2 label(s) in column 'label' outside the label set ['neg', 'pos']" in faults[1]
    assert "'7' at id a6" in faults[1] and "'maybe' at id a4" in faults[1]


def test_missing_column_names_the_available_ones(tmp_path):
    path = _write_csv(tmp_path / "d.csv", ["id", "body", "label"], [[1, "x", "a"], [2, "y", "b"]])
    cfg = _data_cfg(["data=file", f"data.path={path}", "data.task=classification", "data.label_column=label"])
    with pytest.raises(
        DataError,
        match=r"column 'text' \(from data.text_columns\) not found .* available columns: "
        r"\['id', 'body', 'label'\]",
    ):
        load_data(cfg)


def test_integer_labels_beyond_the_label_set_are_reported(tmp_path):
    # An integer cell is its value, never a position in data.labels: 0 and 1 are the classes "0" and "1".
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [["x", 0], ["y", 1], ["z", 2], ["w", 1]])
    cfg = _data_cfg(
        [
            "data=file",
            f"data.path={path}",
            "data.task=classification",
            "data.label_column=label",
            "data.labels=['0','1']",
            "data.id_column=null",
        ]
    )
    with pytest.raises(DataError, match=r"1 label\(s\) .* outside the label set \['0', '1'\]: '2' at row 2$"):
        load_data(cfg)


def test_multilabel_cells_must_be_binary(tmp_path):
    path = _write_csv(
        tmp_path / "d.csv",
        ["id", "text", "a", "b"],
        [[1, "x", 1, 0], [2, "y", 2, 1], [3, "z", "yes", 0], [4, "w", 0, 1]],
    )
    cfg = _data_cfg(["data=file", f"data.path={path}", "data.task=multilabel", "data.label_columns=[a,b]"])
    with pytest.raises(DataError, match=r"multi-label column 'a' must hold 0/1, found '2', 'yes' at id 2, 3"):
        load_data(cfg)


def test_sft_rows_need_instruction_and_response(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Say yo", "input": "", "output": None},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _data_cfg(["data=file", f"data.path={path}", "data.task=sft"])
    with pytest.raises(DataError, match=r"1 empty or missing text\(s\) in column 'output' at row 1"):
        load_data(cfg)


def test_csv_with_quotes_newlines_and_unicode_is_read_exactly(tmp_path):
    rows = [
        ["1", 'She said "hi, there"\nand left.', "ja"],
        ["2", "naïve café — 東京, 😀", "nein"],
        ["3", "NA", "null"],
    ]
    path = _write_csv(tmp_path / "q.csv", ["id", "text", "label"], rows)
    df = read_table(path)
    assert df.shape == (3, 3)
    assert df["text"].tolist() == [r[1] for r in rows]
    assert df["label"].tolist() == ["ja", "nein", "null"]  # "NA"/"null" are data, not missing values


def test_made_split_is_stratified_and_deterministic():
    cfg = _data_cfg(["data.eval_path=null", "data.eval_fraction=0.25"])
    a, b = load_data(cfg), load_data(cfg)
    assert list(a.eval["row_id"]) == list(b.eval["row_id"])
    train_share = np.bincount(a.train["label"]) / a.train.num_rows
    eval_share = np.bincount(a.eval["label"]) / a.eval.num_rows
    np.testing.assert_allclose(train_share, eval_share, atol=0.01)
    assert a.train.num_rows + a.eval.num_rows == 600
    assert not set(a.train["row_id"]) & set(a.eval["row_id"])


def test_iterative_stratification_balances_every_label():
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 6)) < [0.5, 0.3, 0.1, 0.05, 0.2, 0.02]).astype(int)
    mask = iterative_stratification(labels, 0.2, seed=0)
    assert abs(mask.sum() - 80) <= 2
    for j in range(6):
        total = labels[:, j].sum()
        assert abs(labels[mask, j].sum() - 0.2 * total) <= 1.5, (j, labels[mask, j].sum(), total)


def test_class_weights_balanced_and_pos_weight_auto():
    cls = load_data(_data_cfg(["data.class_weights=balanced"]))
    counts = np.bincount(cls.train["label"])
    expected = [600 / (3 * c) for c in counts]
    np.testing.assert_allclose(cls.label_weights, expected)
    ml = load_data(_data_cfg(["data=topics_multilabel"]))
    y = np.array(ml.train["labels"])
    np.testing.assert_allclose(ml.label_weights, (600 - y.sum(0)) / y.sum(0), rtol=1e-6)
    given = load_data(_data_cfg(["data.class_weights=[1.0,2.0,3.0]"]))
    assert given.label_weights == [1.0, 2.0, 3.0]
    with pytest.raises(DataError, match="2 weights given for 3 labels"):
        load_data(_data_cfg(["data.class_weights=[1.0,2.0]"]))


def test_subsample_keeps_n_rows():
    data = load_data(_data_cfg(["data.subsample=50", "data.subsample_seed=3"]))
    assert data.train.num_rows == 50
    assert data.eval.num_rows == 200
    assert load_data(_data_cfg(["data.eval_subsample=20"])).eval.num_rows == 20


def test_text_template_joins_columns(tmp_path):
    path = _write_csv(
        tmp_path / "p.csv",
        ["ID", "TITLE", "ABSTRACT", "Physics", "Mathematics"],
        [
            [1, "On spin", "We study spin.", 1, 0],
            [2, "Primes", "Gaps.", 0, 1],
            [3, "Both", "Mixed.", 1, 1],
            [4, "None", "Empty.", 0, 0],
        ],
    )
    cfg = _data_cfg(
        [
            "data=research_topics",
            f"data.path={path}",
            "data.label_columns=[Physics,Mathematics]",
            "data.eval_fraction=0.5",
        ]
    )
    data = load_data(cfg)
    texts = sorted(list(data.train["text"]) + list(data.eval["text"]))
    assert "Title: On spin\n\nAbstract: We study spin." in texts


@pytest.mark.skipif(not (SHARED_DATA / "trec").exists(), reason="../shared/data is not beside this clone")
def test_shared_trec_loads_through_the_file_preset():
    cfg = _data_cfg(
        [
            "data=file",
            f"data.path={SHARED_DATA / 'trec' / 'train.csv'}",
            "data.task=classification",
            "data.label_column=label",
            "data.text_columns=[text]",
            "data.id_column=null",
        ]
    )
    data = load_data(cfg)
    assert len(data.labels) == 6
    assert data.train.num_rows + data.eval.num_rows == 5452
