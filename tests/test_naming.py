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
