"""The SFT bench as a process on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # about 25 s: loads transformers, trl and two tiny models in a subprocess
def test_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.bench",
            "--device",
            "cpu",
            "--workload",
            "tiny",
            "--examples",
            "16",
            "--sides",
            "seed,recipe,fast",
            "--json",
            str(out),
            "--profile",
            str(tmp_path / "profile"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = json.loads(out.read_text())["runs"][0]
    sides = {s["side"]: s for s in run["sides"] if not s.get("settings", {}).get("variant")}
    assert set(sides) == {"seed", "recipe", "fast"}
    for side in sides.values():  # every example trained on once, each token counted once
        assert side["tokens"] == run["dataset_tokens"] and side["tokens_per_s"] > 0
    fast, seed, recipe = (sides[k]["tokens_per_s"] for k in ("fast", "seed", "recipe"))
    assert sides["fast"]["ratio_over_seed"] == pytest.approx(fast / seed)
    assert sides["fast"]["ratio_over_recipe"] == pytest.approx(fast / recipe)
    assert sides["recipe"]["ratio_over_seed"] == pytest.approx(recipe / seed)  # the independent check of the seed side
    assert sides["recipe"]["settings"] == {"micro_batch_size": 8, "checkpointed": "all", "optim": "adamw_torch"}
    assert all(name in proc.stdout for name in ("seed", "recipe", "fast"))  # the table
    # --profile: one more fast run, profiled over its steps (2 here), its operator table written out.
    (profiled,) = [s for s in run["sides"] if s["settings"].get("variant") == "profile"]
    summary = profiled["profile"]
    assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0 and summary["gpu_busy"] is None
    table = (tmp_path / "profile" / "tiny-rank0.txt").read_text()
    assert summary["table"] == str(tmp_path / "profile" / "tiny-rank0.txt") and "aten::" in table
