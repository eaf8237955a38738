"""Data loading, validation reports, splits and weights, on the project's own fixtures."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from src import bundled, modeling
from src.config import validate
from src.data import DataError, load_data, read_table
from src.splits import iterative_stratification
from tests.conftest import SHARED_DATA, compose_config, train_run
from tests.unit.test_tracking import FAST, _runs


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


@pytest.mark.skipif(not (SHARED_DATA / "trec").exists(), reason=f"no public datasets in {SHARED_DATA}")
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


# ---------------------------------------------------------------------------------------------
# Labels are the file's text, under one rule (src.labels.canonical_label via src.data.label_of)
# ---------------------------------------------------------------------------------------------


def _file(path, *extra: str):
    return _data_cfg(
        ["data=file", f"data.path={path}", "data.task=classification", "data.label_column=label", "data.id_column=null"]
        + list(extra)
    )


def _classes(data) -> list[str]:
    """The class name of every row of both splits, in file order."""
    rows = [
        (int(r), data.labels[y]) for split in (data.train, data.eval) for r, y in zip(split["row_id"], split["label"])
    ]
    return [name for _, name in sorted(rows)]


@pytest.mark.parametrize("sep", [",", "\t"], ids=["csv", "tsv"])
def test_csv_label_cells_are_their_text(tmp_path, sep):
    """pandas read "01" as 1 and "02" as 2: four codes became two classes. "1.0" is still the class "1"."""
    cells = ["01", "1", "02", "2", "1.0", "2.00"] * 4
    path = tmp_path / ("d.csv" if sep == "," else "d.tsv")
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=sep).writerows([["text", "label"], *[[f"t {i} 1.50", c] for i, c in enumerate(cells)]])
    data = load_data(_file(path, "data.eval_fraction=0.25"))
    assert data.labels == ["01", "02", "1", "2"]
    assert _classes(data) == ["01", "1", "02", "2", "1", "2"] * 4
    assert read_table(path)["text"][0] == "t 0 1.50"  # text cells too: no number parsing


def test_json_numbers_are_exact_labels(tmp_path):
    """A JSON column of ints and floats was float64: 2**53 + 1 rounded to 2**53, merging two classes."""
    from src.data import label_of

    big = 2**53
    cells = [f"{big + 1}", f"{big}", "1.5", '"big"', f"{big + 1}.0", f"{big}.0"]  # as written in the file
    expected = [str(big + 1), str(big), "1.5", "big", str(big + 1), str(big)]
    rows = [f'{{"text": "t{i}", "label": {c}}}' for i, c in enumerate(cells)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "d.json").write_text("[" + ", ".join(rows) + "]")
    for name in ("d.jsonl", "d.json"):
        assert [label_of(v) for v in read_table(tmp_path / name)["label"]] == expected, name


def test_parquet_integer_labels_with_nulls_stay_exact(tmp_path):
    import pandas as pd

    from src.data import label_of

    big = 2**53
    pd.DataFrame({"label": pd.array([big + 1, None, big], dtype="Int64")}).to_parquet(tmp_path / "d.parquet")
    assert [label_of(v) for v in read_table(tmp_path / "d.parquet")["label"]] == [str(big + 1), None, str(big)]


def test_multilabel_cells_follow_the_label_rule(tmp_path):
    """0/1 cells are read by the one rule: "1.0" and "true" are 1, the code "01" is not a 0/1 cell."""
    path = _write_csv(
        tmp_path / "d.csv",
        ["id", "text", "a", "b"],
        [[1, "x", "1.0", "0"], [2, "y", "01", "1"], [3, "z", "true", "FALSE"], [4, "w", "0", "1"]],
    )
    cfg = _data_cfg(["data=file", f"data.path={path}", "data.task=multilabel", "data.label_columns=[a,b]"])
    with pytest.raises(DataError) as info:
        load_data(cfg)
    assert info.value.faults == ["train: multi-label column 'a' must hold 0/1, found '01' at id 2"]
    rows = [[i, f"t{i}", "1.0" if i % 2 else "0", "true" if i % 3 else "FALSE"] for i in range(12)]
    path = _write_csv(tmp_path / "ok.csv", ["id", "text", "a", "b"], rows)
    args = ["data=file", f"data.path={path}", "data.task=multilabel", "data.label_columns=[a,b]"]
    data = load_data(_data_cfg([*args, "data.eval_fraction=0.25"]))
    matrix = {int(r): y for split in (data.train, data.eval) for r, y in zip(split["row_id"], split["labels"])}
    assert [matrix[i] for i in range(12)] == [[float(i % 2), float(i % 3 > 0)] for i in range(12)]


@pytest.mark.parametrize("blank", ["\u200b", "\u200b\u200d\ufeff", " \u2060 ", "\u00a0"])
def test_a_label_of_invisible_characters_is_missing(tmp_path, blank):
    rows = [[f"t{i}", "ab"[i % 2]] for i in range(8)]
    rows[5][1] = blank
    with pytest.raises(DataError) as info:
        load_data(_file(_write_csv(tmp_path / "d.csv", ["text", "label"], rows)))
    assert info.value.faults == ["train: 1 empty or missing label(s) in column 'label' at row 5"]


def test_nfc_and_nfd_and_edge_invisibles_are_one_class(tmp_path):
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    cells = [nfc, nfd, "\u200bfood", "food\ufeff", "food"] * 4
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[f"t{i}", c] for i, c in enumerate(cells)])
    data = load_data(_file(path, "data.eval_fraction=0.25"))
    assert data.labels == [nfc, "food"]
    assert _classes(data) == [nfc, nfc, "food", "food", "food"] * 4
    # data.labels is read by the same rule: an NFD spelling there names the NFC class of the file.
    assert load_data(_file(path, "data.eval_fraction=0.25", f"data.labels=[food,'{nfd}']")).labels == ["food", nfc]


@pytest.mark.parametrize(
    ("one", "other"),
    [("A", "\uff21"), ("fi", "\ufb01"), ("ab", "a\u200bb"), ("x y", "x\u00a0y"), ("2", "\u00b2")],
    ids=["fullwidth", "ligature", "zero-width-inside", "nbsp", "superscript"],
)
def test_labels_that_only_look_alike_are_refused_naming_both(tmp_path, one, other):
    cells = [one, other, "zz"] * 3
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[f"t{i}", c] for i, c in enumerate(cells)])
    with pytest.raises(DataError) as info:
        load_data(_file(path))
    (fault,) = info.value.faults
    assert f"{one!r} at train row 0, 3, 6" in fault and f"{other!r} at train row 1, 4, 7" in fault, fault
    assert "look alike" in fault
    # In data.labels too, before any data is read.
    from src.config import ConfigError

    with pytest.raises(ConfigError, match="look alike"):
        _file(path, f"data.labels=['{one}','{other}']")


# ---------------------------------------------------------------------------------------------
# Repeated column names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["csv", "tsv"])
def test_repeated_headers_are_refused_naming_them(tmp_path, suffix):
    sep = "," if suffix == "csv" else "\t"
    path = tmp_path / f"d.{suffix}"
    path.write_text(sep.join(["text", "label", "id", "label"]) + "\n" + sep.join(["a", "x", "1", "y"]) + "\n")
    with pytest.raises(DataError) as info:
        read_table(path)
    assert info.value.faults == [f"data file {path}: header repeats column name(s) 'label'; rename or drop one"]


def test_repeated_json_keys_are_refused_naming_them(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x", "label": "y"}\n')
    with pytest.raises(DataError, match=r"d.jsonl: line 2: key\(s\) 'label' repeated in one JSON object"):
        read_table(jsonl)
    whole = tmp_path / "d.json"
    whole.write_text('[{"text": "a", "text": "b", "label": "x"}]')
    with pytest.raises(DataError, match=r"d.json: key\(s\) 'text' repeated in one JSON object"):
        read_table(whole)


# ---------------------------------------------------------------------------------------------
# A made eval split holds every class it can
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("minority", [2, 3, 5])
def test_made_split_keeps_an_eval_and_a_train_row_of_every_class(tmp_path, minority):
    cells = ["major"] * 200 + ["minor"] * minority + ["pair", "pair"]
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[f"t{i}", c] for i, c in enumerate(cells)])
    for fraction in ("0.1", "0.9"):
        data = load_data(_file(path, f"data.eval_fraction={fraction}"))
        for split in (data.train, data.eval):
            assert sorted(set(split["label"])) == [0, 1, 2], (fraction, split)


def test_classes_with_no_eval_row_are_named_in_a_warning(tmp_path, caplog):
    cells = ["major"] * 40 + ["lonely", "solo"]
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[f"t{i}", c] for i, c in enumerate(cells)])
    with caplog.at_level("WARNING", logger="src"):
        load_data(_file(path, "data.eval_fraction=0.2"))
    (warning,) = [r.getMessage() for r in caplog.records if "no eval row" in r.getMessage()]
    assert "'lonely', 'solo'" in warning and "'major'" not in warning


def test_made_multilabel_split_keeps_a_positive_of_every_label_in_each_split(tmp_path):
    """Iterative stratification gave both positives of a 2-positive label to train at eval_fraction=0.2."""
    rows = [[i, f"t{i}", int(i in (3, 17)), int(i % 2 == 0), int(i % 5 == 0)] for i in range(40)]
    path = _write_csv(tmp_path / "d.csv", ["id", "text", "rare", "even", "fifth"], rows)
    cfg = _data_cfg(["data=file", f"data.path={path}", "data.task=multilabel", "data.label_columns=[rare,even,fifth]"])
    data = load_data(cfg)
    for split in (data.train, data.eval):
        assert np.asarray(split["labels"]).sum(axis=0).min() >= 1, split["row_id"]


def test_hub_integer_labels_with_nulls_stay_exact(monkeypatch):
    import datasets

    from src.data import _read_hub, label_of

    big = 2**53
    table = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [big + 1, None, big]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: table)
    hub = SimpleNamespace(hub_id="org/set", hub_config=None, revision=None)
    assert [label_of(v) for v in _read_hub(hub, "train")["label"]] == [str(big + 1), None, str(big)]


# ---------------------------------------------------------------------------------------------
# Labels that may be typos of one another are named in warnings
# ---------------------------------------------------------------------------------------------


def _label_warnings(tmp_path, caplog, cells: list[str]) -> list[str]:
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [[f"t{i}", c] for i, c in enumerate(cells)])
    with caplog.at_level("WARNING", logger="src"):
        load_data(_file(path))
    return [r.getMessage() for r in caplog.records if "no eval row" not in r.getMessage()]


def test_a_one_row_typo_of_a_label_is_named_with_both_counts(tmp_path, caplog):
    """HassTurnOnn, one row beside HassTurnOn, trained as a class of its own without a word."""
    warnings = _label_warnings(tmp_path, caplog, ["HassTurnOn"] * 20 + ["HassTurnOff"] * 20 + ["HassTurnOnn"])
    assert warnings == [
        "note: class(es) with 2 or fewer train rows: 'HassTurnOnn' (1 train row); a typo of another label?",
        "note: labels 'HassTurnOn' (20 train rows) and 'HassTurnOnn' (1 train row) differ by one character; a typo?",
    ]


def test_labels_alike_but_for_case_or_punctuation_are_named(tmp_path, caplog):
    cells = ["Sports"] * 10 + ["sports"] * 5 + ["turn on"] * 6 + ["turn_on"] * 4 + ["Turn-Off"] * 3 + ["turn off"] * 3
    warnings = _label_warnings(tmp_path, caplog, cells)
    assert warnings == [
        "note: labels 'Sports' (10 train rows), 'sports' (5 train rows) differ only in case; spell each class one way",
        "note: labels 'Turn-Off' (3 train rows), 'turn off' (3 train rows) differ only in case, spacing or "
        "punctuation; spell each class one way",
        "note: labels 'turn on' (6 train rows), 'turn_on' (4 train rows) differ only in spacing or punctuation; "
        "spell each class one way",
    ]


def test_numbered_short_and_numeric_labels_raise_no_typo_warning(tmp_path, caplog):
    labels = [f"LABEL_{i}" for i in range(12)] + ["-1", "1", "10", "pos", "neg", "pot", "2019", "2018", "Level"]
    assert _label_warnings(tmp_path, caplog, [label for label in labels for _ in range(3)]) == []


@pytest.mark.parametrize(
    ("a", "b"), [("billing", "biling"), ("refund", "refunx"), ("refund", "refunds"), ("cancel", "cancelX")]
)
def test_one_edit_apart_is_found_each_way(a, b):
    from src.labels import label_notes

    (note,) = label_notes({a: 5, b: 3, "unrelated": 4})
    assert f"{min(a, b)!r}" in note and f"{max(a, b)!r}" in note and "one character" in note


def test_a_transposition_or_two_edits_are_not_one_character():
    from src.labels import label_notes

    assert label_notes({"refund": 5, "rfeund": 5, "refudns": 5, "cancel": 5}) == []


def test_the_one_character_check_is_skipped_past_the_cap_and_says_so():
    from src.labels import MAX_CLASSES_COMPARED, label_notes

    many = {f"intent{chr(97 + i % 26)}{i:05d}": 3 for i in range(MAX_CLASSES_COMPARED + 1)}
    many.update({"HassTurnOn": 3, "HassTurnOnn": 3})
    notes = label_notes(many)
    assert any("one character apart were not looked for" in n and "2003 classes" in n for n in notes)
    assert not any("HassTurnOnn" in n for n in notes)
    many = dict(list(many.items())[-MAX_CLASSES_COMPARED:])  # at the cap, every pair is compared
    assert any("'HassTurnOn' (3 train rows) and 'HassTurnOnn'" in n for n in label_notes(many))


def test_class_weights_without_named_labels_say_which_class_each_weight_goes_to(caplog):
    """Labels inferred from the data are sorted as text ("10" before "2"): the run says where each weight went."""
    import logging

    caplog.set_level(logging.WARNING, logger="src")
    data = load_data(_data_cfg(["data.class_weights=[1.0,2.0,3.0]"]))
    pairs = ", ".join(f"{label!r}: {w:g}" for label, w in zip(data.labels, [1.0, 2.0, 3.0]))
    assert f"data.class_weights go to the classes in sorted order ({pairs})" in caplog.text
    caplog.clear()
    load_data(_data_cfg(["data.class_weights=[1.0,2.0,3.0]", f"data.labels=[{','.join(data.labels)}]"]))
    assert "data.class_weights go to" not in caplog.text  # named labels: the order is the user's own


def _file_cfg(path: Path, *extra: str, task: str = "classification"):
    label = ["data.label_column=label"] if task == "classification" else []
    return _data_cfg(["data=file", f"data.path={path}", f"data.task={task}", "data.id_column=null", *label, *extra])


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_structured_cells_are_rejected_naming_column_and_rows(tmp_path):
    # Parquet: a list column reads as np.ndarray cells, a struct column as dicts.
    frame = pd.DataFrame({"text": [["food"], ["tech", "x"]], "label": [{"name": "a"}, {"name": "b"}]})
    frame.to_parquet(tmp_path / "d.parquet")
    df = read_table(tmp_path / "d.parquet")
    assert isinstance(df["text"][1], np.ndarray) and isinstance(df["label"][0], dict)
    # JSONL: arrays and objects among plain cells.
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(6)]
    rows[1]["text"], rows[4]["text"], rows[2]["label"] = ["food"], {"title": "x"}, ["a"]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    for name, text_rows, label_rows in (("d.parquet", "0, 1", "0, 1"), ("d.jsonl", "1, 4", "2")):
        with pytest.raises(DataError) as info:
            load_data(_file_cfg(tmp_path / name))
        assert info.value.faults == [
            f"train: column 'text' holds lists, arrays or mappings, not text, at row {text_rows}",
            f"train: column 'label' holds lists, arrays or mappings, not text, at row {label_rows}",
        ]


def _bad_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A broken data file of one kind and the fragment its DataError must hold (besides the path)."""
    if kind == "invalid_utf8":
        path = tmp_path / "d.csv"
        path.write_bytes(b"text,label\nfine,a\ncaf\xe9,b\n")
        return path, "is not valid UTF-8 at line 3 (byte offset 21: 0xe9)"
    if kind == "broken_jsonl_line":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": \n')
        return path, "line 3 is not valid JSON"
    if kind == "jsonl_line_not_an_object":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a", "label": "x"}\n["b", "y"]\n')
        return path, "line 2 is not a JSON object"
    if kind == "broken_json":
        path = tmp_path / "d.json"
        path.write_text('[{"text": "a", "label": "x"},\n {"text": "b" "label": "y"}]')
        return path, "not valid JSON (line 2"
    if kind == "empty_csv":
        path = tmp_path / "d.csv"
        path.write_bytes(b"")
        return path, "is empty (0 bytes)"
    if kind == "header_only_csv":
        path = tmp_path / "d.csv"
        path.write_text("text,label\n")
        return path, "has no rows, only a header"
    if kind == "ragged_csv":
        path = tmp_path / "d.csv"
        path.write_text("text,label\na,x\nb,y,extra\n")
        return path, "line 3"
    if kind == "directory":
        path = tmp_path / "x.csv"
        path.mkdir()
        return path, "is a directory, not a file"
    if kind == "not_parquet":
        path = tmp_path / "d.parquet"
        path.write_text("text,label\na,x\n")
        return path, "cannot read it as Parquet"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "invalid_utf8",
        "broken_jsonl_line",
        "jsonl_line_not_an_object",
        "broken_json",
        "empty_csv",
        "header_only_csv",
        "ragged_csv",
        "directory",
        "not_parquet",
    ],
)
def test_unreadable_files_are_one_data_error_naming_the_file(tmp_path, kind):
    path, expected = _bad_file(tmp_path, kind)
    with pytest.raises(DataError) as info:
        read_table(path)
    assert len(info.value.faults) == 1 and str(path) in info.value.faults[0] and expected in info.value.faults[0]
    with pytest.raises(DataError):  # and through load_data, as training reads it
        load_data(_file_cfg(path))


def test_an_eval_file_that_cannot_be_read_names_that_file(tmp_path):
    train = _write_csv(tmp_path / "train.csv", ["text", "label"], [["a", "x"], ["b", "y"]])
    (tmp_path / "eval.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"eval\.csv has no rows"):
        load_data(_file_cfg(train, f"data.eval_path={tmp_path / 'eval.csv'}"))


def _tokenizer_only_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A model directory with the tiny tokenizer but no config or weights: loading the model fails."""
    model_dir = tmp_path / "tokenizer-only"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    return model_dir


def test_every_data_fault_is_reported_in_one_report_before_the_model_loads(tmp_path, mlflow_store, tiny_model_dir):
    rows = [
        {"id": "r1", "text": "a fine row", "label": 0},
        {"id": "r2", "text": "", "label": 1},
        {"id": "r3", "text": None, "label": 1},
        {"id": "r4", "text": "a string label", "label": "two"},
        {"id": "r5", "text": "a label past the set", "label": 7},
        {"id": "r6", "text": "word " * 2000, "label": 2},
        {"id": "r7", "text": "fine again", "label": 1},
        {"id": "r8", "text": "and again", "label": 2},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    model_dir = _tokenizer_only_model(tmp_path, tiny_model_dir)
    raw = compose_config(
        [
            *FAST,
            "data=file",
            f"data.path={path}",
            "data.task=classification",
            "data.label_column=label",
            "data.labels=['0','1','2']",  # a label is its value: the int 1 is the class "1"
            "data.long_rows=error",  # the default truncates one far too long row
            f"model.name_or_path={model_dir}",
        ]
    )
    raw["output_dir"] = str(tmp_path / "out")
    with pytest.raises(DataError) as info:
        train_run(raw)
    faults = info.value.faults
    assert len(faults) == 3, faults
    assert "2 empty or missing text(s) in column 'text' at id r2, r3" in faults[0]
    assert "2 label(s) in column 'label' outside the label set ['0', '1', '2']" in faults[1]
    assert "'two' at id r4" in faults[1] and "7 at id r5" in faults[1]
    assert "1 row(s) longer than 10 x model.max_length=128 tokens" in faults[2] and "id r6" in faults[2]
    run_ = _runs(mlflow_store)[0]
    assert run_.info.status == "FAILED" and run_.data.tags["error_type"] == "DataError"  # not the model's OSError


def test_multilabel_faults_and_overlong_rows_share_one_report(tmp_path):
    path = tmp_path / "ml.csv"
    long_text = "word " * 1500
    path.write_text(f"id,text,a,b\n1,fine,1,0\n2,,0,1\n3,odd cell,2,1\n4,{long_text},0,yes\n5,ok,0,1\n")
    cfg = validate(
        compose_config(
            [
                "data=file",
                f"data.path={path}",
                "data.task=multilabel",
                "data.label_columns=[a,b]",
                "data.long_rows=error",
            ]
        )
    )
    tokenizer = modeling.load_tokenizer(cfg.model)
    with pytest.raises(DataError) as info:
        load_data(cfg.data, tokenizer, cfg.model.max_length)
    report = str(info.value)
    assert "empty or missing text(s) in column 'text' at id 2" in report
    assert "multi-label column 'a' must hold 0/1, found '2' at id 3" in report
    assert "multi-label column 'b' must hold 0/1, found 'yes' at id 4" in report
    assert "1 row(s) longer than 10 x model.max_length=128 tokens" in report and ": id 4" in report
    cfg.data.max_length_factor = None  # null: long rows are truncated in training, not faults
    with pytest.raises(DataError) as info:
        load_data(cfg.data, tokenizer, cfg.model.max_length)
    assert "longer than" not in str(info.value)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_and_tsv_with_a_byte_order_mark_quotes_and_newlines_are_read_exactly(tmp_path, suffix):
    import csv

    rows = [["1", 'She said "hi,\tthere"\nand left.', "ja"], ["2", "naïve café — 東京, 😀", "nein"]]
    path = tmp_path / f"bom{suffix}"
    with path.open("w", encoding="utf-8-sig", newline="") as f:  # Excel's "CSV UTF-8" starts with a BOM
        csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",").writerows([["id", "text", "label"], *rows])
    df = read_table(path)
    assert list(df.columns) == ["id", "text", "label"]
    assert df["text"].tolist() == [r[1] for r in rows]
    assert df["id"].tolist() == ["1", "2"]  # the text as written: no number parsing
