"""Runs you can tell apart: the dataset is in the run name, and a file's stem names ``data=file`` runs."""

from __future__ import annotations

from src import tracking, ui_links
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


def test_a_run_name_says_the_lora_variant_and_a_sweep_label_does_not_repeat_it():
    variant = ["lora.use_rslora=true", "lora.use_dora=true", "lora.loraplus_lr_ratio=16", "lora.init=pissa_niter_4"]
    assert tracking.run_name(compose_config(variant)) == (
        "tiny-topics-16bit-attn_qv-r8-a16-rslora-dora-loraplus16-init=pissa_niter_4"
    )
    assert tracking.run_name(compose_config(["lora.init=false"])) == "tiny-topics-16bit-attn_qv-r8-a16-init=false"
    assert tracking.run_name(compose_config(["lora.use_dora=false"]), "lora.use_dora") == (
        "tiny-topics-16bit-attn_qv-r8-a16"  # plain LoRA
    )


def test_experiments_are_marked_as_model_training(tmp_path):
    """MLflow 3's experiment type: ours are model development, new and old experiments alike."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    new = tracking.ensure_experiment("fresh", uri)
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("made-before")  # a store from an earlier version gets the tag too
    assert tracking.ensure_experiment("made-before", uri) == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_every_ui_link_asks_for_the_model_training_mode():
    """MLflow 3.17's UI ignores the experiment's type and opens in GenAI mode (an empty traces overview) unless the
    link says ``workflowType=machine_learning`` (tests/integration/test_browser.py loads these links in Chromium)."""
    from src import console

    mode = "workflowType=machine_learning"
    assert ui_links.experiment_url("http://h:5000/", "3") == f"http://h:5000/#/experiments/3?{mode}"
    assert ui_links.sweep_view_url("http://h:5000", "3", "s1") == (
        f"http://h:5000/#/experiments/3/runs?viewStateShareKey=s1&{mode}"
    )
    served = console.view_hint("http://h:5000", "3", "abc")
    assert served == f"http://h:5000/#/experiments/3/runs/abc?{mode}"
    local = console.view_hint("sqlite:///m.db", "3", "abc")
    assert local.endswith(f"then http://127.0.0.1:5000/#/experiments/3/runs/abc?{mode}")
    assert console.sweep_view_hint("sqlite:///m.db", "3", "s1").startswith(
        f"http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=s1&{mode}"
    )


def test_a_sweeps_runs_are_named_by_the_keys_it_varies(monkeypatch):
    """Runs of a sweep that differ in a key the base name does not show get it appended, short: its last component
    and its value. Keys the base name shows (lora.r, quant.bits...) and keys absent from the config add nothing."""
    balanced = compose_config(["data.class_weights=balanced"])
    assert (
        tracking.run_name(balanced, "data.class_weights") == "tiny-topics-16bit-attn_qv-r8-a16-class_weights=balanced"
    )
    assert (
        tracking.run_name(compose_config([]), "data.class_weights")
        == "tiny-topics-16bit-attn_qv-r8-a16-class_weights=none"
    )
    several = compose_config(["lora.r=16", "train.learning_rate=0.00123456", "lora.dropout=0.1"])
    assert (
        tracking.run_name(several, "lora.r,train.learning_rate,lora.dropout,lora.alpha_ratio,quant.bits")
        == "tiny-topics-16bit-attn_qv-r16-a16-learning_rate=0.001235,dropout=0.1"
    )
    # Two keys with one last component keep their whole names; a list joins with '+'.
    raw = {**compose_config([]), "x": {"seed": 1}, "y": {"seed": 2, "modules": ["a", "b"]}}
    assert tracking.sweep_label(raw, ["x.seed", "y.seed", "y.modules"]) == "x.seed=1,y.seed=2,modules=a+b"
    # An explicit name replaces the base only; swept, it is the label itself.
    mine = compose_config(["tracking.run_name=mine", "data.class_weights=balanced"])
    assert tracking.run_name(mine, "data.class_weights,tracking.run_name") == "mine-class_weights=balanced"
    # A job of a sweep learns its keys from the environment the sweep sets; outside a sweep nothing is added.
    monkeypatch.setenv(tracking.SWEEP_KEYS_ENV, "data.class_weights")
    assert tracking.run_name(balanced).endswith("-class_weights=balanced")
    monkeypatch.delenv(tracking.SWEEP_KEYS_ENV)
    assert tracking.run_name(balanced) == "tiny-topics-16bit-attn_qv-r8-a16"
