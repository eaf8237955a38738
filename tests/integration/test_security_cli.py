"""Sweeps as processes: code named in a sweep config never runs, and quotes in names keep statuses true."""

from __future__ import annotations

import pytest

from tests.unit.test_security import OPEN


def test_a_sweep_naming_code_stops_before_anything_is_built(tmp_path):
    """The issue's command, also with hydra.sweeper._recursive_=true (Hydra would build the sampler's arguments
    with the sweeper): the file is not truncated, and the error names the key."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    base = [sys.executable, "-m", "src.train", "--multirun", "hydra/sweeper=lora_optuna", "hydra.sweeper.n_trials=1"]
    stores = [
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'o.db'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
    ]
    seed = f"hydra.sweeper.sampler.seed={OPEN.replace('VICTIM', str(victim))}"
    result = subprocess.run(
        [*base, *stores, f"hydra.sweep.dir={tmp_path / 'ms'}", seed, "hydra.sweeper._recursive_=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: refused: the config names code to build (_target_) at hydra.sweeper.sampler.seed._target_" in (
        result.stderr
    )
    assert victim.read_text() == "precious"
    assert not (tmp_path / "ms").exists() and not (tmp_path / "o.db").exists()


@pytest.mark.slow
def test_an_optuna_sweep_with_quotes_in_its_names_records_true_statuses(tmp_path, mlflow_store):
    """A real study named with an apostrophe, in a sweep directory with one: its trial's run FINISHED, the parent
    run FINISHED with its saved view, and a second start finds the finished trial instead of training it again."""
    import subprocess
    import sys

    import mlflow

    from src import ui_links
    from src.sweeps.outcomes import quote
    from tests.conftest import ROOT, TINY

    study, sweep_dir = "Bob's study", tmp_path / "O'Brien's sweep"
    args = [
        *("--multirun", "hydra/sweeper=lora_optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=1"),
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"hydra.sweeper.study_name={quote(study)}",
        f"hydra.sweep.dir={quote(str(sweep_dir))}",
        "lora.r=choice(2,4)",
        *TINY[1:],
    ]
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "src.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert "1/1 trials done" in result.stdout, result.stdout[-2000:]
    client = mlflow.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("lora-sweeps")
    found = client.search_runs([experiment.experiment_id])
    trials = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.status for r in trials] == ["FINISHED"] and trials[0].data.tags["optuna_study"] == study
    assert "'" in trials[0].data.tags["output_dir"]
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FINISHED"] and parents[0].data.tags["sweep_id"] == study
    assert ui_links.SHARED_VIEW_PREFIX + ui_links.sweep_view_key(study) in experiment.tags
