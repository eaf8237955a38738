"""The Optuna study's storage (src.trial): where the default one sits."""

from __future__ import annotations

from tests.conftest import ROOT


def test_the_default_study_storage_sits_beside_the_mlflow_store(tmp_path, monkeypatch):
    """Without hydra.sweeper.storage a study lives beside the runs' store, never in the project by itself: a test's
    scratch store gets a scratch study, and the user's store in the project root gets the project's optuna.db."""
    from src.tracking import DEFAULT_TRACKING_URI
    from src.trial import default_storage

    monkeypatch.chdir(tmp_path)
    scratch = tmp_path / "store"
    assert default_storage(f"sqlite:///{scratch / 'mlflow.db'}") == f"sqlite:///{scratch / 'optuna.db'}"
    assert default_storage("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"  # relative
    assert default_storage(DEFAULT_TRACKING_URI) == f"sqlite:///{ROOT / 'optuna.db'}"
    assert default_storage(f"file://{tmp_path / 'mlruns'}") == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert default_storage("./mlruns") == f"sqlite:///{tmp_path / 'optuna.db'}"
    for server in ("http://127.0.0.1:5000", "postgresql+psycopg://u@db/mlflow", "databricks"):
        assert default_storage(server) == f"sqlite:///{tmp_path / 'optuna.db'}", server  # the working directory
