"""Config errors through the real command: one message, no traceback, before the model loads; and ``--help``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # its command and checks run in the default tier (tests/integration/test_console_cli.py)
def test_cli_reports_config_errors_without_traceback(tmp_path):
    proc = _train(tmp_path, "lora.r=0", "train.learning_rate=-1")
    assert proc.returncode == 2, proc.stderr
    assert "lora.r: must be >= 1, got 0" in proc.stderr
    assert "train.learning_rate: must be > 0, got -1.0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_forgetting_text_stops_the_run_before_the_model_loads(tmp_path):
    missing = tmp_path / "missing.txt"
    proc = _train(tmp_path, "data=instructions", f"eval.forgetting_path={missing}")
    assert proc.returncode == 2, proc.stderr
    assert f"eval.forgetting_path: '{missing}' cannot be read: No such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "adapter").exists()


def _train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m src.train`` with ``overrides``, its store and run dir under ``tmp_path``."""
    command = [sys.executable, "-m", "src.train", *overrides, f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    command.append(f"hydra.run.dir={tmp_path / 'out'}")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
