"""A few far too long rows do not stop a real dataset: truncated or skipped, counted; a broken file still fails."""

from __future__ import annotations

import json

import pytest

from src import modeling
from src.config import validate
from src.data import DataError, load_data
from tests.conftest import SHARED_DATA, compose_config


def _data(tmp_path, n_long: int, n_short: int = 9, **overrides):
    rows = [{"id": f"s{i}", "text": f"short text {i}", "label": i % 2} for i in range(n_short)]
    rows += [{"id": f"l{i}", "text": "word " * 2000, "label": i % 2} for i in range(n_long)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["data=file", f"data.path={path}", "data.task=classification", "data.label_column=label"]
    cfg = validate(compose_config([*args, *(f"data.{k}={v}" for k, v in overrides.items())]))
    return cfg, modeling.load_tokenizer(cfg.model)


def test_far_too_long_rows_are_truncated_by_default_and_counted(tmp_path):
    cfg, tokenizer = _data(tmp_path, n_long=2, n_short=18)
    data = load_data(cfg.data, tokenizer, cfg.model.max_length)
    assert data.long_rows == 2 and data.train.num_rows + data.eval.num_rows == 20


def test_skip_drops_them_and_error_refuses_them(tmp_path):
    cfg, tokenizer = _data(tmp_path, n_long=2, n_short=18, long_rows="skip")
    data = load_data(cfg.data, tokenizer, cfg.model.max_length)
    assert data.long_rows == 2 and data.train.num_rows + data.eval.num_rows == 18
    assert not any(row_id.startswith("l") for row_id in [*data.train["row_id"], *data.eval["row_id"]])
    cfg, tokenizer = _data(tmp_path, n_long=2, n_short=18, long_rows="error")
    with pytest.raises(DataError, match=r"2 row\(s\) longer than 10 x model.max_length=128 tokens.*id l0, l1"):
        load_data(cfg.data, tokenizer, cfg.model.max_length)


def test_a_split_mostly_far_too_long_is_a_broken_file_whatever_the_setting(tmp_path):
    cfg, tokenizer = _data(tmp_path, n_long=8, n_short=4, long_rows="truncate")
    with pytest.raises(DataError, match="8 of 12 rows, likely a broken file or the wrong column"):
        load_data(cfg.data, tokenizer, cfg.model.max_length)


@pytest.mark.slow  # reads the public datasets in SHARED_DATA (tests/conftest.py)
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"needs the public datasets in {SHARED_DATA}")
def test_real_datasets_the_old_guard_refused_load_with_the_defaults():
    """The Alpaca demo (59 rows over 10 x 128 tokens) and GoEmotions (one comment of braille art)."""
    alpaca = SHARED_DATA / "alpaca_en_demo" / "alpaca_en_demo.jsonl"
    raw = compose_config(["data=file", f"data.path={alpaca}", "data.task=sft", "data.response_column=output"])
    cfg = validate(raw)
    data = load_data(cfg.data, modeling.load_tokenizer(cfg.model), cfg.model.max_length)
    assert data.long_rows == 59 and data.train.num_rows + data.eval.num_rows == len(alpaca.read_text().splitlines())

    emotions = SHARED_DATA / "goemotions_ekman" / "train_onehot.csv"
    labels = "[anger,disgust,fear,joy,neutral,sadness,surprise]"
    args = ["data=file", f"data.path={emotions}", "data.task=multilabel", f"data.label_columns={labels}"]
    cfg = validate(compose_config([*args, "data.text_columns=[TEXT]", "data.id_column=ID"]))
    data = load_data(cfg.data, modeling.load_tokenizer(cfg.model), cfg.model.max_length)
    assert data.long_rows >= 1 and data.train.num_rows > 30000


def test_sft_rows_whose_prompts_fill_max_length_are_one_clear_error():
    from datasets import Dataset

    from src.engine import rows as fast_rows

    cfg = validate(compose_config(["data=instructions"]))
    tokenizer = modeling.load_tokenizer(cfg.model)
    rows = Dataset.from_dict({"prompt": ["word " * 50] * 3, "completion": ["an answer"] * 3})
    with pytest.raises(DataError, match=r"no row keeps a response token within model.max_length=8"):
        fast_rows.tokenize_sft(rows, tokenizer, max_length=8, completion_only_loss=True)
    assert len(fast_rows.tokenize_sft(rows, tokenizer, max_length=512, completion_only_loss=True)) == 3
