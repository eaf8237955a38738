"""The run commands as processes: ``python -m src.compare`` and ``python -m src.predict`` on stdin."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.unit.runs import test_compare, test_predict

# The fixtures of the in-process tests, shared.
sweep_store_template, sweep_store = test_compare.sweep_store_template, test_compare.sweep_store
cls_run = test_predict.cls_run
TEXTS = test_predict.TEXTS


def test_command_line_entry_point(sweep_store):
    """``python -m src.compare`` as a user runs it, with the store from $MLFLOW_TRACKING_URI."""
    done = subprocess.run(
        [sys.executable, "-m", "src.compare", "--format", "json"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert [r["run_ids"] for r in rows] == [[sweep_store["ids"][k] for k in keys] for keys in ("AB", "C", "D", "E")]


@pytest.mark.slow  # predict end to end in-process: the tests above through src.predict.main
def test_stdin_lines_through_a_real_subprocess(cls_run, tmp_path):
    lines = "\n".join([TEXTS[0], "", TEXTS[1], TEXTS[2]]) + "\n"  # blank lines are skipped
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.predict",
            "--run",
            cls_run.run_id,
            "--tracking-uri",
            cls_run.tracking_uri,
            "--input",
            "-",
        ],
        input=lines,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in records] == TEXTS[:3]
    assert "classify" in proc.stderr  # the progress bar goes to stderr, the predictions alone to stdout
    labels = json.loads((cls_run.adapter_dir / "label_map.json").read_text())["labels"]
    assert all(set(r["probabilities"]) == set(labels) for r in records)
