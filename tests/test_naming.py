"""Runs you can tell apart: the dataset is in the run name, and a file's stem names ``data=file`` runs."""

from __future__ import annotations

from src import tracking
from tests.conftest import compose_config


def test_a_file_dataset_is_named_after_its_file_unless_named():
    raw = compose_config(["data=file", "data.path=/data/sms_spam.csv", "data.task=classification"])
    assert raw["data"]["name"] == "sms_spam"
    named = compose_config(["data=file", "data.path=/data/x.csv", "data.task=classification", "data.name=spam"])
    assert named["data"]["name"] == "spam"
    assert compose_config(["data=file"])["data"]["name"] == "file"  # no path yet: validation reports it


def test_run_names_carry_the_dataset():
    trec = compose_config(["data=file", "data.path=trec.csv", "data.task=classification", "lora.r=16"])
    assert tracking.run_name(trec) == "tiny-trec-16bit-attn_qv-r16-a16"
    assert (
        tracking.run_name(compose_config(["data=instructions", "quant=4bit"]))
        == "tiny-instructions-4bit-attn_qv-r8-a16"
    )
    assert tracking.run_name(compose_config(["tracking.run_name=mine"])) == "mine"


def test_experiments_open_on_their_runs_table_in_mlflow_3(tmp_path):
    """MLflow 3.x opens an experiment without a kind on its GenAI overview; ours are model development."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    new = tracking.ensure_experiment("fresh", uri)
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("made-before")  # a store from an earlier version gets the tag too
    assert tracking.ensure_experiment("made-before", uri) == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
