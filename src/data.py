"""Load a dataset, check every row, and shape it for its task: all before any model loads.

``load_data`` reads a local file or a hub dataset, validates it (reporting every fault with
the row ids at fault in one :class:`DataError`), makes an eval split when none is given
(stratified for single-label, iterative stratification for multi-label), and returns plain
``datasets.Dataset`` objects: ``text``/``label`` for classification, ``text``/``labels`` for
multi-label, and ``prompt``/``completion`` for SFT (conversations rendered by :mod:`src.chat`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd

from src import chat, console
from src.config import DataConfig
from src.labels import canonical_label, label_notes, lookalike_key
from src.splits import make_eval_split
from src.tables import MAX_IDS_SHOWN, DataError, read_table

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Cells a text or label column must not hold: lists (JSON arrays, Parquet lists as np.ndarray) and mappings
# (JSON objects, Parquet structs); str() would train on their Python repr, e.g. "['food']".
STRUCTURED = (list, tuple, set, dict, np.ndarray)


@dataclass
class TaskData:
    """The validated splits and what the model needs to know about the labels."""

    task: str
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset
    labels: Optional[list[str]]  # class or label-column names; None for SFT
    label_weights: Optional[list[float]]  # class weights or pos_weight; None when unweighted
    long_rows: int = 0  # rows over data.max_length_factor x max_length: truncated or skipped (data.long_rows)


def _read_hub(d: DataConfig, split: str) -> pd.DataFrame:
    from datasets import load_dataset

    dataset = load_dataset(d.hub_id, d.hub_config, split=split, revision=d.revision)
    # Through Arrow, as _read_parquet: Dataset.to_pandas makes an int column with nulls float64, rounding past 2**53.
    return dataset.with_format("arrow")[:].to_pandas(integer_object_nulls=True)


def _row_ids(df: pd.DataFrame, d: DataConfig, mask: np.ndarray) -> str:
    ids = df[d.id_column][mask].tolist() if d.id_column and d.id_column in df.columns else np.flatnonzero(mask).tolist()
    kind = f"{d.id_column}" if d.id_column and d.id_column in df.columns else "row"
    shown = ", ".join(str(i) for i in ids[:MAX_IDS_SHOWN])
    more = f", ... ({len(ids)} in all)" if len(ids) > MAX_IDS_SHOWN else ""
    return f"{kind} {shown}{more}"


def _is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA: a cell with no value (an empty string is not missing, but is blank)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _is_blank(series: pd.Series) -> np.ndarray:
    return np.array([_is_missing(v) or str(v).strip() == "" for v in series], dtype=bool)


def label_of(value: Any) -> Optional[str]:
    """The class a label cell names (see :func:`src.labels.canonical_label`), or None if it has none.

    A label is its value, never a position in ``data.labels``: the int 1, the float 1.0 and the texts "1"
    and "1.0" are all the class "1", while the text "01" is the class "01". :func:`read_table` keeps cells as
    the file wrote them (CSV and TSV as text, JSON numbers exact, Parquet integers exact), so only this rule
    decides. Empty, blank, invisible-only (zero-width), null and NaN cells are None: missing, not a class.
    """
    if _is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return canonical_label(str(value)) or None


def _needed_columns(d: DataConfig) -> dict[str, list[str]]:
    """Column names the config expects, keyed by the config field that names them."""
    if d.task == "sft" and d.format == "messages":
        return {"data.messages_column": [d.messages_column]}
    if d.task == "sft":
        cols = {"data.response_column": [d.response_column]}
        if d.instruction_template:
            cols["data.instruction_template"] = template_fields(d.instruction_template)
        else:
            cols["data.instruction_column"] = [d.instruction_column]
        if d.input_column:
            cols["data.input_column"] = [d.input_column]
        return cols
    cols = {"data.text_columns": list(d.text_columns)}
    if d.text_template:
        cols["data.text_template"] = template_fields(d.text_template)
    if d.task == "classification":
        cols["data.label_column"] = [d.label_column]
    else:
        cols["data.label_columns"] = list(d.label_columns)
    return cols


def template_fields(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _label_index(df: pd.DataFrame, d: DataConfig, labels: list[str], split: str, faults: list[str]) -> np.ndarray:
    """Map the label column to class indices by value; record missing and unknown labels with their rows."""
    values = df[d.label_column].tolist()
    names = [label_of(v) for v in values]
    index = {name: i for i, name in enumerate(labels)}  # labels are canonical: load_data makes them so
    out = np.array([-1 if name is None else index.get(name, -1) for name in names], dtype=int)
    missing = np.array([name is None for name in names], dtype=bool)
    if missing.any():
        faults.append(
            f"{split}: {missing.sum()} empty or missing label(s) in column {d.label_column!r} "
            f"at {_row_ids(df, d, missing)}"
        )
    bad = (out < 0) & ~missing
    if bad.any():
        by_value: dict[str, np.ndarray] = {}
        for v in sorted({repr(values[i]) for i in np.flatnonzero(bad)}):
            by_value[v] = np.array([repr(x) == v for x in values]) & bad
        detail = "; ".join(f"{v} at {_row_ids(df, d, m)}" for v, m in by_value.items())
        faults.append(
            f"{split}: {bad.sum()} label(s) in column {d.label_column!r} outside the label set {labels}: {detail}"
        )
    return out


def _lookalike_labels(frames: dict[str, tuple[pd.DataFrame, str]], d: DataConfig, faults: list[str]) -> None:
    """Record distinct labels that only look alike (:func:`src.labels.lookalike_key`), with their rows: which
    spelling was meant is the user's call, and two classes that print the same cannot be read apart."""
    cells = {split: [label_of(v) for v in df[d.label_column]] for split, (df, _) in frames.items()}
    spellings: dict[str, set[str]] = {}
    for names in cells.values():
        for name in set(names) - {None}:
            spellings.setdefault(lookalike_key(name), set()).add(name)
    for key, names in sorted(spellings.items()):
        if len(names) < 2:
            continue
        where = []
        for name in sorted(names):
            rows = [
                f"{split} {_row_ids(frames[split][0], d, np.array([n == name for n in split_names]))}"
                for split, split_names in cells.items()
                if name in split_names
            ]
            where.append(f"{name!r} at {'; '.join(rows)}")
        faults.append(
            f"labels in column {d.label_column!r} look alike but differ (each is {key!r} in Unicode NFKC form, "
            f"without invisible characters): {', '.join(where)}; spell each class one way"
        )


def _multilabel_matrix(df: pd.DataFrame, d: DataConfig, split: str, faults: list[str]) -> np.ndarray:
    """The 0/1 label matrix, each cell read by :func:`label_of` (1, 1.0, "1", true); record other cells."""
    matrix = np.zeros((len(df), len(d.label_columns)), dtype=np.float32)
    for j, col in enumerate(d.label_columns):
        cells = df[col].tolist()
        names = [(label_of(v) or "").casefold() for v in cells]
        ok = np.array([name in ("0", "1", "true", "false") for name in names])
        if not ok.all():
            bad_values = sorted({repr(cells[i]) for i in np.flatnonzero(~ok)})[:10]
            faults.append(
                f"{split}: multi-label column {col!r} must hold 0/1, found {', '.join(bad_values)} "
                f"at {_row_ids(df, d, ~ok)}"
            )
        matrix[:, j] = [1.0 if name in ("1", "true") else 0.0 for name in names]
    return matrix


def texts_of(df: pd.DataFrame, d: DataConfig) -> list[str]:
    """The model input text of each row: the text columns through data.text_template, or joined."""
    columns = list(dict.fromkeys(d.text_columns + template_fields(d.text_template or "")))
    # Missing cells (already reported as faults) become "": pandas 3's astype(str) would keep them NaN.
    rows = df[columns].map(lambda v: "" if _is_missing(v) else str(v))
    if d.text_template:
        return [d.text_template.format(**r) for r in rows.to_dict("records")]
    return ["\n\n".join(r[c] for c in d.text_columns) for r in rows.to_dict("records")]


def format_prompt(instruction: str, input_text: str, template: str) -> str:
    """The prompt for one SFT example; the response is appended after it."""
    if template == "plain":
        return f"{instruction}\n{input_text}\n" if input_text else f"{instruction}\n"
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def sft_fields(df: pd.DataFrame, d: DataConfig) -> tuple[list[str], list[str]]:
    """(instruction, input) of each row, through data.instruction_template or data.instruction_column.

    A missing cell (None, NaN, a JSONL row without the key, an input column the rows lack) is "", never the
    text "nan", so predict prompts a row exactly as training did.
    """
    instructions, inputs = [], []
    for r in df.to_dict("records"):
        filled = {k: "" if _is_missing(v) else v for k, v in r.items()}
        template = d.instruction_template
        instructions.append(template.format(**filled) if template else str(filled[d.instruction_column]))
        inputs.append(str(filled.get(d.input_column, "")).strip() if d.input_column else "")
    return instructions, inputs


def sft_prompts(df: pd.DataFrame, d: DataConfig) -> list[str]:
    """The prompt of each row, the one builder training and predict share."""
    return [format_prompt(i, x, d.prompt_template) for i, x in zip(*sft_fields(df, d))]


def _sft_columns(df: pd.DataFrame, d: DataConfig) -> tuple[list[str], list[str]]:
    return sft_prompts(df, d), [str(v) for v in df[d.response_column].tolist()]


def _chat_columns(df: pd.DataFrame, d: DataConfig, tokenizer, split: str, faults: list[str]):
    """(prompt, completion) of each conversation, through the tokenizer's chat template (:mod:`src.chat`)."""
    from jinja2 import TemplateError

    prompts, completions, refused = [], [], {}
    for i, cell in enumerate(df[d.messages_column]):
        try:
            prompt, completion = chat.prompt_completion(tokenizer, chat.turns_of(cell))
        except (TemplateError, ValueError) as exc:
            refused.setdefault(str(exc), np.zeros(len(df), dtype=bool))[i] = True
            prompt, completion = "", ""
        prompts.append(prompt)
        completions.append(completion)
    for why, rows in refused.items():
        faults.append(f"{split}: the chat template cannot render the conversation ({why}) at {_row_ids(df, d, rows)}")
    if split == "train":
        chat.note_earlier_replies(df[d.messages_column].tolist())
    return prompts, completions


def _check_conversations(df: pd.DataFrame, d: DataConfig, split: str, faults: list[str]) -> bool:
    """Every cell of data.messages_column a list of known {role, content} turns with an assistant turn."""
    found = chat.conversation_faults(df[d.messages_column].tolist())
    for fault, rows in found.items():
        faults.append(f"{split}: column {d.messages_column!r}: {fault} at {_row_ids(df, d, rows)}")
    return not found


def _check_split(df: pd.DataFrame, d: DataConfig, split: str, source: str, faults: list[str]) -> bool:
    """Column and emptiness checks for one split; False if columns are missing."""
    available = list(df.columns)
    missing = [(key, c) for key, cols in _needed_columns(d).items() for c in cols if c not in available]
    for key, col in missing:
        faults.append(f"{split}: column {col!r} (from {key}) not found in {source}; available columns: {available}")
    if missing:
        return False
    if len(df) == 0:
        faults.append(f"{split}: {source} has no rows")
        return False
    if d.task == "sft" and d.format == "messages":
        return _check_conversations(df, d, split, faults)
    structured = False
    for col in dict.fromkeys(c for cols in _needed_columns(d).values() for c in cols):
        cells = np.array([isinstance(v, STRUCTURED) for v in df[col]], dtype=bool)
        if cells.any():
            structured = True
            faults.append(
                f"{split}: column {col!r} holds lists, arrays or mappings, not text, at {_row_ids(df, d, cells)}"
            )
    if structured:
        return False
    text_cols = (
        d.text_columns
        if d.task != "sft"
        else [d.response_column] + ([] if d.instruction_template else [d.instruction_column])
    )
    for col in text_cols:
        blank = _is_blank(df[col])
        if blank.any():
            faults.append(
                f"{split}: {blank.sum()} empty or missing text(s) in column {col!r} at {_row_ids(df, d, blank)}"
            )
    return True


def _warn_unevaluated(task: str, labels: list[str], eval_columns: dict[str, Any]) -> None:
    """Warn, naming them, about classes (or label columns) with no row (no positive) in the eval split: they score
    0 in every averaged metric, which then says more about the split than the model."""
    if task == "classification":
        present = np.bincount(np.asarray(eval_columns["label"], dtype=int), minlength=len(labels)) > 0
    else:
        present = np.asarray(eval_columns["labels"]).reshape(-1, len(labels)).sum(axis=0) > 0
    absent = [name for name, seen in zip(labels, present) if not seen]
    if absent:
        what = "class(es) with no eval row" if task == "classification" else "label(s) with no positive eval row"
        more = f", ... ({len(absent)} in all)" if len(absent) > MAX_IDS_SHOWN else ""
        shown = ", ".join(map(repr, absent[:MAX_IDS_SHOWN])) + more
        console.log.warning(
            f"note: {what}: {shown}; each scores 0 in eval_f1_macro and the other averages "
            "(give data.eval_path, or more rows of them)"
        )


def _say_inferred_weight_order(d: DataConfig, labels: list[str]) -> None:
    """A list of class weights goes to the classes in label order; without ``data.labels`` that order is the
    data's labels sorted as text ("10" before "2"), which a list written in numeric order would silently miss."""
    if d.task == "classification" and isinstance(d.class_weights, list) and not d.labels:
        pairs = ", ".join(f"{label!r}: {float(w):g}" for label, w in zip(labels, d.class_weights))
        console.log.warning(
            f"note: data.class_weights go to the classes in sorted order ({pairs}); set data.labels to choose it"
        )


def _weights(task: str, d: DataConfig, y: np.ndarray, n_labels: int, faults: list[str]) -> Optional[list[float]]:
    spec = d.class_weights if task == "classification" else d.pos_weight
    if spec in ("none", None):
        return None
    if isinstance(spec, list):
        if len(spec) != n_labels:
            key = "data.class_weights" if task == "classification" else "data.pos_weight"
            faults.append(f"{key}: {len(spec)} weights given for {n_labels} labels")
            return None
        return [float(w) for w in spec]
    if task == "classification":  # balanced: n / (k * count_c), as scikit-learn defines it
        counts = np.bincount(y, minlength=n_labels)
        return [len(y) / (n_labels * c) if c else 0.0 for c in counts]
    pos = y.sum(axis=0)
    if spec == "one_minus_share":  # seed 000's formula: 1 - (the label's positives / all positives)
        total = pos.sum()
        return [float(1 - p / total) if total else 1.0 for p in pos]
    return [float((len(y) - p) / p) if p else 1.0 for p in pos]  # auto: negatives / positives per label


def _check_lengths(
    df: pd.DataFrame, d: DataConfig, texts: list[str], split: str, tokenizer, max_length: int, faults: list[str]
) -> np.ndarray:
    """The rows over ``data.max_length_factor`` x ``max_length`` tokens: truncation would drop most of them.

    They are faults with ``data.long_rows=error``, and always when they are over half of the split: that is a
    broken file or the wrong column, not a dataset with a few long rows.
    """
    limit = d.max_length_factor * max_length
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]])
    over = lengths > limit
    broken = over.sum() > len(over) / 2
    if over.any() and (d.long_rows == "error" or broken):
        why = (
            f"{over.sum()} of {len(over)} rows, likely a broken file or the wrong column"
            if broken
            else "data.long_rows=error; truncate or skip lets them train"
        )
        faults.append(
            f"{split}: {over.sum()} row(s) longer than {d.max_length_factor:g} x model.max_length={max_length} "
            f"tokens (longest {lengths.max()}): {why}; raise data.max_length_factor, or set it to null: "
            f"{_row_ids(df, d, over)}"
        )
    return over


def load_data(d: DataConfig, tokenizer=None, max_length: Optional[int] = None) -> TaskData:
    """Read, validate and split the configured dataset. Raises DataError listing every fault.

    With a tokenizer and ``max_length``, rows over ``data.max_length_factor`` x ``max_length``
    tokens are faults too, in the same report.
    """
    if d.task == "sft" and d.format == "messages" and (problem := chat.template_problem(tokenizer)):
        raise DataError([problem])
    frames = _read_frames(d)
    faults: list[str] = []
    ok = {split: _check_split(df, d, split, source, faults) for split, (df, source) in frames.items()}
    if not all(ok.values()):
        raise DataError(faults)
    labels = _labels(frames, d, faults)
    columns: dict[str, dict[str, Any]] = {}
    long_rows = 0
    for split, (df, _) in frames.items():
        columns[split] = _task_columns(df, d, labels, tokenizer, split, faults)
        if tokenizer is not None and max_length and d.max_length_factor is not None:
            columns[split], over = _long_rows(df, d, columns[split], split, tokenizer, max_length, faults)
            long_rows += over
    if faults:
        raise DataError(faults)
    if d.task == "classification":  # a label's typo is a class of its own: warn, as rare classes are real too
        counts = np.bincount(np.asarray(columns["train"]["label"], dtype=int), minlength=len(labels))
        for note in label_notes(dict(zip(labels, counts.tolist()))):
            console.log.warning(note)
    if "eval" not in columns:
        columns = _split_eval(columns["train"], d)
    for split, n in (("train", d.subsample), ("eval", d.eval_subsample)):
        columns[split] = _subsample(columns[split], n, d.subsample_seed)
    weights = None
    if labels is not None:
        _warn_unevaluated(d.task, labels, columns["eval"])
        y_train = np.asarray(columns["train"]["label" if d.task == "classification" else "labels"])
        weights = _weights(d.task, d, y_train, len(labels), faults)
        if faults:
            raise DataError(faults)
        _say_inferred_weight_order(d, labels)
    return TaskData(d.task, _to_dataset(columns["train"]), _to_dataset(columns["eval"]), labels, weights, long_rows)


def _read_frames(d: DataConfig) -> dict[str, tuple[pd.DataFrame, str]]:
    """The train split, and the eval split where one is given: (table, where it came from) by split."""
    if d.path:
        frames = {"train": (read_table(d.path), str(d.path))}
        if d.eval_path:
            frames["eval"] = (read_table(d.eval_path), str(d.eval_path))
        return frames
    frames = {"train": (_read_hub(d, d.train_split), f"{d.hub_id}:{d.train_split}")}
    if d.eval_split:
        frames["eval"] = (_read_hub(d, d.eval_split), f"{d.hub_id}:{d.eval_split}")
    return frames


def _labels(frames: dict[str, tuple[pd.DataFrame, str]], d: DataConfig, faults: list[str]) -> Optional[list[str]]:
    """The class names (given, else the train split's, sorted as text) or label columns; None for SFT."""
    if d.task == "multilabel":
        return list(d.label_columns)
    if d.task != "classification":
        return None
    if d.labels:
        labels = [canonical_label(label) for label in d.labels]
    else:
        labels = sorted({n for n in map(label_of, frames["train"][0][d.label_column]) if n is not None})
    if len(labels) < 2:
        faults.append(f"train: column {d.label_column!r} holds fewer than 2 classes: {labels}")
    _lookalike_labels(frames, d, faults)
    return labels


def _task_columns(
    df: pd.DataFrame, d: DataConfig, labels: Optional[list[str]], tokenizer, split: str, faults: list[str]
) -> dict[str, list]:
    """One split's columns for its task, and ``row_id`` (data.id_column's, else the row number)."""
    if d.task == "classification":
        columns = {"text": texts_of(df, d), "label": _label_index(df, d, labels, split, faults)}
    elif d.task == "multilabel":
        columns = {"text": texts_of(df, d), "labels": _multilabel_matrix(df, d, split, faults)}
    else:
        prompts, completions = (
            _chat_columns(df, d, tokenizer, split, faults) if d.format == "messages" else _sft_columns(df, d)
        )
        columns = {"prompt": prompts, "completion": completions}
    ids = df[d.id_column] if d.id_column and d.id_column in df.columns else pd.Series(range(len(df)))
    columns["row_id"] = [str(i) for i in ids]
    return columns


def _long_rows(
    df: pd.DataFrame, d: DataConfig, columns: dict[str, list], split: str, tokenizer, max_length: int, faults
) -> tuple[dict[str, list], int]:
    """The split's columns, less its over-long rows where data.long_rows=skip, and how many rows are over."""
    texts = columns["text"] if "text" in columns else [p + c for p, c in zip(columns["prompt"], columns["completion"])]
    over = _check_lengths(df, d, texts, split, tokenizer, max_length, faults)
    if d.long_rows == "skip" and over.any():
        columns = {k: [v for v, o in zip(col, over) if not o] for k, col in columns.items()}
    return columns, int(over.sum())


def _split_eval(train: dict[str, list], d: DataConfig) -> dict[str, dict[str, list]]:
    """The eval split cut from the train split (data.eval_fraction); an empty side is a DataError now, not after
    the model has loaded."""
    y = train.get("label", train.get("labels"))
    n = len(train["row_id"])
    mask = make_eval_split(d.task, np.asarray(y) if y is not None else None, n, d)
    if mask.all() or not mask.any():
        empty, fix = ("train", "lower") if mask.all() else ("eval", "raise")
        how = {"classification": " (stratified by class)", "multilabel": " (iterative stratification)"}
        raise DataError(
            [
                f"{empty} split is empty: {n} row(s) with data.eval_fraction={d.eval_fraction:g}"
                f"{how.get(d.task, '')}; {fix} data.eval_fraction, or give data.eval_path"
            ]
        )
    return {
        "train": {k: [v for v, m in zip(col, mask) if not m] for k, col in train.items()},
        "eval": {k: [v for v, m in zip(col, mask) if m] for k, col in train.items()},
    }


def _subsample(columns: dict[str, list], n: Optional[int], seed: int) -> dict[str, list]:
    """``n`` rows drawn with ``seed``, in their order; all of them where ``n`` is unset or not fewer."""
    if not n or n >= len(columns["row_id"]):
        return columns
    keep = sorted(np.random.default_rng(seed).permutation(len(columns["row_id"]))[:n])
    return {k: [col[i] for i in keep] for k, col in columns.items()}


def _to_dataset(columns: dict[str, Any]):
    """A ``datasets.Dataset`` of plain lists (multi-label rows as lists, class indices as ints)."""
    from datasets import Dataset

    columns = {k: (np.asarray(v).tolist() if k == "labels" else list(v)) for k, v in columns.items()}
    if "label" in columns:
        columns["label"] = [int(v) for v in columns["label"]]
    return Dataset.from_dict(columns)
