"""A grid with a full fine-tuning row beside its LoRA rows, as a real sweep."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # a grid end to end: test_sweeps.py; full fine-tuning and its compare row: the tests above
def test_a_grid_holds_a_full_fine_tuning_row_beside_its_lora_rows(tmp_path, mlflow_store):
    """``--multirun lora=attn_qv,none``: two finished children, and src.compare shows the full row as such."""
    from tests.conftest import TINY
    from tests.integration.sweeping import split_runs, sweep

    result = sweep(["--multirun", "lora=attn_qv,none", *TINY[1:]], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, children = split_runs(mlflow_store)
    by_preset = {c.data.params["lora.preset"]: c for c in children}
    assert set(by_preset) == {"attn_qv", "none"} and {c.info.status for c in children} == {"FINISHED"}
    full = by_preset["none"].data.metrics
    assert full["trainable_params"] == full["total_params"] > by_preset["attn_qv"].data.metrics["trainable_params"]
    table = subprocess.run(
        [sys.executable, "-m", "src.compare", "--format", "json"], cwd=ROOT, capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr[-2000:]
    rows = {row["targets"]: row for row in json.loads(table.stdout)["rows"]}
    assert set(rows) == {"q_proj,v_proj", "all weights (full fine-tuning)"}, rows.keys()
