"""Predict with a trained adapter: labels and probabilities, or generations.

    python -m src.predict --run RUN_ID --input data.csv --output predictions.csv
    python -m src.predict --sweep-best SWEEP_ID --input data.jsonl
    echo "the striker scored a goal" | python -m src.predict --adapter outputs/.../adapter

The model is rebuilt from the run's own artifacts (:mod:`src.runs.inference`): the recorded base model
with the run's quantization, the adapter and classification head, the label map and, for SFT,
the run's prompt template or chat template. Input rows use the run's data columns (``data.text_columns``,
``data.instruction_column``/``data.input_column`` or ``data.messages_column``); each stdin line is one text,
instruction or user message.
Output is JSONL on stdout unless ``--output`` names a .csv or .jsonl file.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

import numpy as np
import pandas as pd

from src import chat
from src.config import DataConfig
from src.data import STRUCTURED, DataError, read_table, sft_prompts, template_fields, texts_of
from src.errors import UserError, report, run_cli
from src.logger import say
from src.runs import scoring
from src.runs.inference import (
    InferenceError,
    Source,
    add_source_arguments,
    classify_logits,
    generate,
    load_finetuned,
    load_run_tokenizer,
    open_source_of,
    quiet_inference_libraries,
)
from src.tiny import demo_note, is_builtin, is_bundled

LINE_COLUMN = "text"  # stdin lines become this column; each is a whole text or instruction


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__.split("\n")[0])
    add_source_arguments(parser)
    parser.add_argument(
        "--input", default="-", help="CSV/TSV/JSONL/JSON/Parquet file, a .txt file of one text per line, or - for stdin"
    )
    parser.add_argument("--output", help="a .csv or .jsonl file (default: JSONL on stdout)")
    parser.add_argument("--text-column", help="input column holding the text (or, for SFT, the instruction)")
    parser.add_argument("--batch-size", type=int, help="default: the run's train.per_device_eval_batch_size")
    parser.add_argument("--threshold", type=float, help="multi-label decision threshold (default: the run's)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="SFT: tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="SFT: 0 is greedy; > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="SFT: nucleus sampling mass when sampling")
    parser.add_argument("--seed", type=int, default=0, help="SFT: seed for sampling")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        parser.error("--threshold must be in (0, 1)")
    return args


def read_inputs(path: str, stdin: TextIO) -> tuple[pd.DataFrame, bool]:
    """(rows, from_lines): a table from a file, or one row per non-empty line of stdin or a ``.txt`` file."""
    if path == "-" or path.lower().endswith(".txt"):
        try:
            lines = stdin.readlines() if path == "-" else Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InferenceError(f"input: cannot read {path}: {exc}") from exc
        lines = [line.rstrip("\r\n") for line in lines]
        return pd.DataFrame({LINE_COLUMN: [line for line in lines if line.strip()]}), True
    try:
        return read_table(path), False
    except DataError as exc:
        raise InferenceError(f"input: {'; '.join(exc.faults)}") from exc
    except ValueError as exc:  # pandas: malformed JSON lines, a CSV with ragged rows...
        raise InferenceError(f"input: cannot read {path}: {exc}") from exc


def _require(df: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InferenceError(
            f"input has no column(s) {missing} ({what}); its columns are {list(df.columns)}; "
            "name the text column with --text-column"
        )
    for column in columns:  # as in training: a list or mapping cell would be predicted on as its repr
        rows = [i for i, v in enumerate(df[column]) if isinstance(v, STRUCTURED)]
        if rows:
            shown = ", ".join(map(str, rows[:10])) + (f", ... ({len(rows)} in all)" if len(rows) > 10 else "")
            raise InferenceError(f"input column {column!r} holds lists or mappings, not text, at row {shown}")


def classification_texts(df: pd.DataFrame, d: DataConfig, text_column: Optional[str]) -> list[str]:
    """The model input per row, built from the run's text columns and template, as in training."""
    if text_column:
        _require(df, [text_column], "from --text-column")
        return df[text_column].astype(str).tolist()
    _require(
        df,
        list(dict.fromkeys(d.text_columns + template_fields(d.text_template or ""))),
        "the run's data.text_columns / data.text_template",
    )
    return texts_of(df, d)


def sft_data(df: pd.DataFrame, d: DataConfig, text_column: Optional[str]) -> DataConfig:
    """The run's data config as predict reads SFT rows: with --text-column, that column is the instruction."""
    if text_column:
        _require(df, [text_column], "from --text-column")
        return dataclasses.replace(d, instruction_template=None, instruction_column=text_column)
    if d.instruction_template:
        _require(df, template_fields(d.instruction_template), "the run's data.instruction_template")
    else:
        _require(df, [d.instruction_column], "the run's data.instruction_column")
    return d


def chat_prompts(
    df: pd.DataFrame, d: DataConfig, tokenizer, text_column: Optional[str]
) -> tuple[list[list[dict]], list[Optional[str]], list[str]]:
    """(the turns each prompt holds, the reply each row already has or None, the prompts) for a data.format=messages
    run, rendered as training rendered them (:mod:`src.chat`): a conversation that ends in an assistant turn is
    prompted up to it, and its content is the reference; another is prompted for the next turn. With
    --text-column (or stdin lines) each cell is one user turn."""
    if problem := chat.template_problem(tokenizer):
        raise InferenceError(problem)
    if text_column:
        _require(df, [text_column], "from --text-column")
        conversations = [[{"role": "user", "content": str(v)}] for v in df[text_column]]
    else:
        if d.messages_column not in df.columns:
            raise InferenceError(
                f"input has no column {d.messages_column!r} (the run's data.messages_column); its columns are "
                f"{list(df.columns)}; name a column of user messages with --text-column"
            )
        cells = df[d.messages_column].tolist()
        faults = chat.conversation_faults(cells, need_assistant=False)
        if faults:
            raise InferenceError(
                "input: " + "; ".join(f"column {d.messages_column!r}: {f} at row {_rows(m)}" for f, m in faults.items())
            )
        conversations = [chat.turns_of(cell) for cell in cells]
    # A row that ends in an assistant turn is asked for that turn again, as training asked; a row that ends in
    # another turn is asked for the next one.
    replied = [bool(turns) and turns[-1]["role"] == "assistant" for turns in conversations]
    contexts = [turns[:-1] if r else turns for turns, r in zip(conversations, replied)]
    references = [turns[-1]["content"] if r else None for turns, r in zip(conversations, replied)]
    return contexts, references, [chat.prompt_of(tokenizer, context) for context in contexts]


def _rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask).tolist()
    return ", ".join(map(str, rows[:10])) + (f", ... ({len(rows)} in all)" if len(rows) > 10 else "")


def _generate(model, tokenizer, prompts: list[str], args: argparse.Namespace, batch_size: int) -> list[str]:
    if args.temperature > 0:
        from transformers import set_seed

        set_seed(args.seed)
    progress = not args.no_progress
    return generate(model, tokenizer, prompts, batch_size, args.max_new_tokens, args.temperature, args.top_p, progress)


PREDICTION, PROBABILITIES, GENERATION, REFERENCE = "prediction", "probabilities", "generation", "reference"
PROB_PREFIX = "prob_"  # CSV: one column per class, prob_<label>


@dataclass
class Predicted:
    """The model's output per row (prediction fields only) and, for classifiers, the logits behind it."""

    outputs: list[dict[str, Any]]
    logits: Optional[np.ndarray] = None
    threshold: float = 0.5


def predict(
    source: Source, model, tokenizer, df: pd.DataFrame, args: argparse.Namespace, from_lines: bool = False
) -> Predicted:
    """The prediction of each input row; rows read from lines are whole texts or instructions."""
    cfg = source.cfg
    text_column = LINE_COLUMN if from_lines else args.text_column
    batch_size = args.batch_size or cfg.train.per_device_eval_batch_size
    progress = not args.no_progress
    if source.task == "sft" and cfg.data.format == "messages":
        _, references, prompts = chat_prompts(df, cfg.data, tokenizer, text_column)
        generations = _generate(model, tokenizer, prompts, args, batch_size)
        return Predicted(
            [{**({REFERENCE: r} if r is not None else {}), GENERATION: g} for r, g in zip(references, generations)]
        )
    if source.task == "sft":
        prompts = sft_prompts(df, sft_data(df, cfg.data, text_column))  # training's own builder
        return Predicted([{GENERATION: g} for g in _generate(model, tokenizer, prompts, args, batch_size)])

    texts = classification_texts(df, cfg.data, text_column)
    logits = classify_logits(model, tokenizer, texts, cfg.model.max_length, batch_size, progress)
    if source.task == "multilabel":
        threshold = args.threshold if args.threshold is not None else source.threshold
        probs = 1.0 / (1.0 + np.exp(-logits))
        chosen = [[name for name, q in zip(source.labels, p) if q >= threshold] for p in probs]
    else:
        threshold = source.threshold
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        chosen = [source.labels[int(p.argmax())] for p in probs]
    outputs = [
        {PREDICTION: c, PROBABILITIES: {name: float(q) for name, q in zip(source.labels, p)}}
        for c, p in zip(chosen, probs)
    ]
    return Predicted(outputs, logits, threshold)


def output_suffix(columns: list[str], labels: Optional[list[str]]) -> str:
    """ "" when no prediction column (JSONL or CSV name) is an input column's name, else the first free "_N"."""
    taken = set(map(str, columns))
    names = [PREDICTION, PROBABILITIES, GENERATION, REFERENCE, *(PROB_PREFIX + name for name in labels or [])]
    n = 0
    while any(name + (f"_{n}" if n else "") in taken for name in names):
        n += 1
    return f"_{n}" if n else ""


def _plain(value: Any) -> Any:
    """An input cell as JSON and CSV write it: a missing cell (NaN, None) is null, numpy numbers are numbers."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return None if value is pd.NA or value is pd.NaT else value


def with_inputs(df: pd.DataFrame, outputs: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    """Each input row with every column as it was, then its prediction fields (named with ``suffix``)."""
    rows = df.to_dict("records")
    return [
        {**{str(k): _plain(v) for k, v in row.items()}, **{k + suffix: v for k, v in out.items()}}
        for row, out in zip(rows, outputs)
    ]


def _flat(record: dict[str, Any], probabilities: str, suffix: str) -> dict[str, Any]:
    """A CSV row: the probabilities become prob_<label><suffix> columns, a predicted label list joins with ';'."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        if key == probabilities:
            row.update({f"{PROB_PREFIX}{name}{suffix}": q for name, q in value.items()})
        elif key == PREDICTION + suffix and isinstance(value, list):
            row[key] = ";".join(value)
        elif isinstance(value, list):  # a conversation's turns
            row[key] = json.dumps(value, ensure_ascii=False)
        else:
            row[key] = value
    return row


def write_records(records: list[dict[str, Any]], output: Optional[str], stdout: TextIO, suffix: str = "") -> None:
    """Write JSONL to stdout, or a .jsonl/.csv file by its suffix."""
    kind = Path(output).suffix.lower() if output else ".jsonl"
    if kind == ".csv":
        rows = [_flat(r, PROBABILITIES + suffix, suffix) for r in records]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        stdout.write(text)
        stdout.flush()


def scores_path(output: str) -> Path:
    return Path(output + ".scores.json")


def report_scores(source: Source, df: pd.DataFrame, predicted: Predicted, output: Optional[str]) -> None:
    """When the input holds the run's label column(s): print the scores, and save them beside ``output``."""
    if predicted.logits is None:
        return
    columns = scoring.label_columns_of(source.task, source.cfg.data)
    missing = [c for c in columns if c not in df.columns]
    if missing and len(missing) < len(columns):  # some label columns, not all: a multi-label row is not known
        say(f"note: not scored: the input lacks the run's label column(s) {missing}", logging.WARNING)
    scores = scoring.score(df, source.task, source.cfg.data, source.labels, predicted.logits, predicted.threshold)
    if scores is None:
        return
    say(scoring.scores_summary(scores))
    if output:
        scores_path(output).write_text(json.dumps(scores.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
        say(f"scores saved to {scores_path(output)}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".jsonl"):
        return report(UserError(f"--output must end in .csv or .jsonl, got {args.output}"))
    quiet_inference_libraries()

    def body() -> None:
        with open_source_of(args) as source:
            df, from_lines = read_inputs(args.input, sys.stdin)
            if df.empty:
                raise InferenceError(f"input {args.input if args.input != '-' else '(stdin)'} has no rows")
            if is_builtin(source.cfg.model.name_or_path) and not is_bundled(args.input):
                say(demo_note(), logging.WARNING)  # stdin or a file the project does not ship: a user's text
            tokenizer = load_run_tokenizer(source)
            model = load_finetuned(source, tokenizer)
            predicted = predict(source, model, tokenizer, df, args, from_lines)
            suffix = output_suffix(list(df.columns), source.labels)
            if suffix:
                renamed = [GENERATION] if source.task == "sft" else [PREDICTION, PROBABILITIES, f"{PROB_PREFIX}<label>"]
                say(
                    "note: the input has a column named as a prediction column; predictions go to "
                    + ", ".join(name + suffix for name in renamed),
                    logging.WARNING,
                )
            write_records(with_inputs(df, predicted.outputs, suffix), args.output, sys.stdout, suffix)
            report_scores(source, df, predicted, args.output)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
