"""src.export: the merged model stands alone and predicts as base + adapter does."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from safetensors import safe_open

from src.runs import export, inference
from src.tiny import resolve_builtin
from tests.unit.runs.test_predict import TEXTS, TrainedRun, trained_run

FIXED_INPUTS = TEXTS + ["", "music music music", "a very long sentence about " + "the league and the stadium " * 10]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> TrainedRun:
    return trained_run("classification", tmp_path_factory)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> TrainedRun:
    return trained_run("sft", tmp_path_factory)


def _export(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = export.main(args)
    return code, capsys.readouterr().err


def test_merged_classifier_is_standalone_and_matches_base_plus_adapter(cls_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    code, err = _export(["--run", cls_run.run_id, "--tracking-uri", cls_run.tracking_uri, "--out", str(out)], capsys)
    assert code == 0, err
    files = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "label_map.json",
        "config.yaml",
    } <= files
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "modules_to_save" in k] and "score.weight" in keys
    label_map = json.loads((out / "label_map.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(label_map["labels"])}
    assert "quantization_config" not in config

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers, no peft
    tokenizer = AutoTokenizer.from_pretrained(out)
    source = inference.read_source(cls_run.adapter_dir)
    unmerged = inference.load_finetuned(source, inference.load_run_tokenizer(source), quantized=False)
    max_length = source.cfg.model.max_length
    expected = inference.classify_logits(unmerged, tokenizer, FIXED_INPUTS, max_length, batch_size=4)
    got = inference.classify_logits(merged, tokenizer, FIXED_INPUTS, max_length, batch_size=4)
    assert got.shape == (len(FIXED_INPUTS), len(label_map["labels"]))
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected), atol=1e-4, rtol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # The merge did fold the adapter in: the merged weights differ from the base checkpoint's.
    base = AutoModelForCausalLM.from_pretrained(resolve_builtin(source.cfg.model.name_or_path))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(merged.named_parameters())[name], dict(base.named_parameters())[name])


def test_export_from_an_adapter_directory(cls_run, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = _export(["--adapter", str(cls_run.adapter_dir), "--out", str(out)], capsys)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    code, err = _export(["--adapter", str(cls_run.adapter_dir), "--out", str(out)], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --out") and "not empty" in err
    code, err = _export(
        ["--adapter", str(cls_run.adapter_dir), "--out", str(tmp_path / "x"), "--log-to-mlflow"], capsys
    )
    assert code == 2 and "--log-to-mlflow needs the run" in err and not (tmp_path / "x").exists()


def test_export_errors_are_one_line(cls_run, tmp_path, capsys):
    code, err = _export(
        ["--run", "feedfacefeedface", "--tracking-uri", cls_run.tracking_uri, "--out", str(tmp_path / "m")], capsys
    )
    assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: no MLflow run")


@pytest.mark.slow
def test_log_to_mlflow_logs_a_loadable_transformers_model(cls_run, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = _export(
        ["--run", cls_run.run_id[:8], "--tracking-uri", cls_run.tracking_uri, "--out", str(out), "--log-to-mlflow"],
        capsys,
    )
    assert code == 0, err
    mlflow.set_tracking_uri(cls_run.tracking_uri)
    run = mlflow.get_run(cls_run.run_id)
    assert run.info.status == "FINISHED"
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        output_format="list",
        filter_string=f"source_run_id = '{cls_run.run_id}'",
    )
    assert [m.name for m in models] == [export.MERGED_MODEL_NAME]
    pipeline = mlflow.transformers.load_model(models[0].model_uri)
    label_map = json.loads((out / "label_map.json").read_text())
    merged_pred = pipeline(FIXED_INPUTS[:3])
    assert all(p["label"] in label_map["labels"] for p in merged_pred)


@pytest.mark.slow
def test_merged_sft_model_generates_as_base_plus_adapter(sft_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    code, err = _export(["--run", sft_run.run_id, "--tracking-uri", sft_run.tracking_uri, "--out", str(out)], capsys)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    source = inference.read_source(sft_run.adapter_dir)
    unmerged = inference.load_finetuned(source, inference.load_run_tokenizer(source), quantized=False)
    batch = tokenizer(FIXED_INPUTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, unmerged(**batch).logits, atol=1e-4, rtol=1e-4)
    prompts = [f"### Instruction:\n{t}\n\n### Response:\n" for t in TEXTS]
    assert inference.generate(merged, tokenizer, prompts, batch_size=8, max_new_tokens=12) == inference.generate(
        unmerged, tokenizer, prompts, batch_size=8, max_new_tokens=12
    )


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["4bit", "fp8"])
def test_a_quantized_run_merges_into_a_16bit_copy_of_its_base(tmp_path_factory, tmp_path, capsys, quant):
    """A 4-bit run, and an FP8 one (whose base must load without its FP8 conversion: merging into an e4m3 weight
    fails in torch)."""
    run_4bit = trained_run("classification", tmp_path_factory, (f"quant={quant}",))
    out = tmp_path / "merged"
    code, err = _export(["--run", run_4bit.run_id, "--tracking-uri", run_4bit.tracking_uri, "--out", str(out)], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"  # the run's model.dtype
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32
