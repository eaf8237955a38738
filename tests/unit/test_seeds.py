"""The five seed experiments (conf/experiment/seed*.yaml): each encodes its tutorial's recipe, runs end to end on
the tiny model, and plans the trainable-parameter count of its real architecture; and full fine-tuning (lora=none).

The recipe table below is each tutorial's (docs/configuration.md cites them), setting by setting; the counts of seeds
000 and 002 are worked out here again from the layer shapes.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from src import memory as P
from src import modeling
from src.config import ConfigError, validate
from src.data import load_data
from tests.conftest import ROOT, SMALL_ENCODER, compose_config, train_run
from tests.seed_standins import EXPERIMENTS, write_standin

# What each tutorial fixes for its seed, as the composed config spells it.
RECIPES = {
    "000": {
        "model.name_or_path": "mistralai/Mistral-7B-v0.1",
        "data.task": "multilabel",
        "data.text_template": "Title: {TITLE}\n\nAbstract: {ABSTRACT}",
        "data.pos_weight": "one_minus_share",
        "data.eval_fraction": 0.1,
        "quant.bits": 4,
        "quant.quant_type": "nf4",
        "quant.double_quant": True,
        "quant.compute_dtype": "bfloat16",
        "lora.r": 16,
        "lora.alpha": 8,
        "lora.dropout": 0.05,
        "lora.bias": "none",
        "lora.preset": "attn",
        "train.learning_rate": 1e-4,
        "train.per_device_train_batch_size": 8,
        "train.per_device_eval_batch_size": 8,
        "train.num_train_epochs": 10,
        "train.weight_decay": 0.01,
        "train.eval_strategy": "epoch",
        "train.save_strategy": "epoch",
        "train.load_best_model_at_end": True,
    },
    "001": {
        "model.name_or_path": "bert-large-uncased",
        "data.task": "classification",
        "data.name": "driver_intents",
        "quant.bits": 4,
        "quant.double_quant": True,
        "quant.compute_dtype": "bfloat16",
        "lora.r": 32,
        "lora.alpha": 64,
        "lora.dropout": 0.1,
        "lora.bias": "all",
        "lora.preset": "all_but_head",
        "train.learning_rate": 5e-4,
        "train.per_device_train_batch_size": 8,
        "train.gradient_accumulation_steps": 8,
        "train.num_train_epochs": 8,
        "train.optim": "paged_adamw_8bit",
        "train.eval_strategy": "steps",
        "train.eval_steps": 10,
        "train.save_steps": 10,
        "train.logging_steps": 10,
        "train.save_total_limit": 5,
        "train.early_stopping_patience": 2,
        "train.metric_for_best_model": "accuracy",
        "train.load_best_model_at_end": True,
        "objective.metric": "eval_accuracy",
    },
    "002": {
        "model.name_or_path": "openlm-research/open_llama_3b_v2",
        "model.max_length": 256,
        "data.task": "sft",
        "data.hub_id": "xiyuez/red-dot-design-award-product-description",
        "data.subsample": 5000,
        "quant.bits": 4,
        "lora.r": 8,
        "lora.alpha": 8,
        "lora.dropout": 0.05,
        "lora.bias": "none",
        "lora.preset": "attn_qv",
        "train.num_train_epochs": 3,
    },
    "003": {
        "model.name_or_path": "mistralai/Mistral-7B-v0.1",
        "model.max_length": 512,
        "data.hub_id": "gbharti/finance-alpaca",
        "data.input_column": None,
        "data.response_only_loss": False,
        "data.split_seed": 1234,
        "data.eval_fraction": 0.1,
        "quant.bits": 4,
        "quant.double_quant": True,
        "quant.compute_dtype": "bfloat16",
        "lora.r": 8,
        "lora.alpha": 16,
        "lora.dropout": 0.1,
        "lora.bias": "none",
        "lora.target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"],
        "train.per_device_train_batch_size": 1,
        "train.gradient_accumulation_steps": 4,
        "train.num_train_epochs": 1,
        "train.learning_rate": 2e-4,
        "train.fp16": True,
        "train.bf16": False,
        "train.optim": "paged_adamw_8bit",
        "train.lr_scheduler_type": "cosine",
        "train.warmup_steps": 0.05,
    },
    "004": {
        "model.name_or_path": "microsoft/Phi-3-mini-4k-instruct",
        "model.dtype": "float32",
        "data.task": "classification",
        "data.hub_id": "minhaozhang/mbti",
        "data.label_column": "J-P",
        "data.labels": ["J", "P"],
        "data.class_weights": [0.6, 0.4],
        "quant.bits": 16,
        "lora.preset": "none",
        "lora.r": None,
        "train.learning_rate": 2e-5,
        "train.per_device_train_batch_size": 4,
        "train.per_device_eval_batch_size": 4,
        "train.gradient_accumulation_steps": 2,
        "train.num_train_epochs": 1,
        "train.weight_decay": 0.01,
        "train.optim": "adamw_bnb_8bit",
        "train.tf32": True,
        "train.bf16": False,
        "train.eval_steps": 1000,
        "train.save_steps": 1000,
        "train.load_best_model_at_end": True,
    },
}
# The planner's trainable parameters on each seed's real architecture (docs/configuration.md, seed table).
SEED_COUNTS = {"000": 13_656_064, "001": 14_498_821, "002": 2_662_400, "003": 10_223_616, "004": 3_722_585_088}
# Config-only copies of the real architectures' config.json (the values of their hub config files).
ARCHITECTURES = {
    "mistral7b": (
        "mistral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=32768,
            sliding_window=4096,
        ),
    ),
    "bert_large": (
        "bert",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=30522),
    ),
    "phi3mini": (
        "phi3",
        dict(
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            pad_token_id=32000,
            eos_token_id=32000,
            sliding_window=2047,
        ),
    ),
    "openllama3b": (
        "llama",
        dict(
            hidden_size=3200,
            intermediate_size=8640,
            num_hidden_layers=26,
            num_attention_heads=32,
            vocab_size=32000,
            max_position_embeddings=2048,
        ),
    ),
}
SEED_MODELS = {"000": "mistral7b", "001": "bert_large", "002": "openllama3b", "003": "mistral7b", "004": "phi3mini"}
# On the CPU: the tiny model, two steps, and no GPU-only precision (the seeds' fp16 and tf32 need CUDA).
ON_CPU = ["model=tiny", "train.max_steps=2", "train.bf16=false", "train.fp16=false", "train.tf32=null"]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _compose(seed: str, *overrides: str) -> dict:
    extra = ["data.path=train.csv"] if seed == "000" else []
    return compose_config([f"experiment={EXPERIMENTS[seed]}", *extra, *overrides])


@pytest.mark.parametrize("seed", sorted(RECIPES))
def test_each_experiment_composes_validates_and_encodes_its_recipe(seed):
    raw = _compose(seed)
    validate(raw)
    flat = _flat(raw)
    wrong = {key: (flat.get(key), want) for key, want in RECIPES[seed].items() if flat.get(key) != want}
    assert not wrong, f"seed {seed}: (composed, the recipe's) {wrong}"


# The public title of each seed's tutorial, as docs/configuration.md cites it.
TUTORIALS = {
    "000": "Multilabel Classification using Mistral-7B on a single GPU with quantization and LoRA",
    "001": "Fine-Tuning BERT for Classification",
    "002": "Efficient Fine-Tuning with LoRA: A Guide to Optimal Parameter Selection for Large Language Models",
    "003": "Elevating Mistral-7B's Performance through QLoRA",
    "004": "Fine Tune LLM for Classification",
}


def test_each_experiment_names_its_tutorial_and_its_command():
    cited = (ROOT / "docs" / "configuration.md").read_text()
    for seed, name in EXPERIMENTS.items():
        lines = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text().splitlines()
        assert lines[1].startswith(f"# python -m src.train experiment={name}")
        header = " ".join(line.removeprefix("# ") for line in lines[2:6])
        assert f'as published in "{TUTORIALS[seed]}"' in header, f"{name} does not name its tutorial"
        assert TUTORIALS[seed] in cited, f"docs/configuration.md does not cite seed {seed}'s tutorial"


def test_group_overrides_on_the_command_line_win_over_an_experiments_choices():
    """What the seed table's rows rely on: lora=all_linear and quant=8bit replace the experiment's lora and quant,
    while its values (alpha 8, 256 tokens) stay."""
    raw = _compose("002", "lora=all_linear", "quant=8bit", "lora.r=16")
    assert (raw["lora"]["preset"], raw["quant"]["bits"], raw["lora"]["r"]) == ("all_linear", 8, 16)
    assert (raw["lora"]["alpha"], raw["model"]["max_length"]) == (8, 256)


def test_the_seed_table_sweep_is_seed_002_plus_its_rows():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
        rows = list(compose(config_name="seed_table", return_hydra_config=True).hydra.sweeper.rows)
    base = _flat(compose_config([], ROOT / "sweeps", "seed_table"))
    seed002 = _flat(_compose("002"))
    assert {k: v for k, v in base.items() if k != "output_dir"} == {
        k: v for k, v in seed002.items() if k != "output_dir"
    }
    assert len(rows) == 4 and all("lora.alpha" not in row for row in rows)  # alpha 8 comes from the experiment


@pytest.mark.parametrize("seed", sorted(EXPERIMENTS))
def test_each_experiment_trains_end_to_end_on_the_tiny_model(seed, tmp_path, mlflow_store):
    # the tiny model has 512 positions; seeds 000 and 004 ask for 1024, which validation refuses for it
    overrides = (*ON_CPU, "model.max_length=512", "data.eval_subsample=16")
    raw = _compose(seed, *overrides, *write_standin(seed, tmp_path / "data"))
    raw["output_dir"] = str(tmp_path / "out")
    value = train_run(raw)
    (finished,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert finished.info.status == "FINISHED" and finished.data.metrics["objective"] == pytest.approx(value)
    saved = "model" if seed == "004" else "adapter"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(finished.info.run_id)}
    assert {saved, "config.yaml"} <= artifacts
    metrics = finished.data.metrics
    if seed == "004":  # full fine-tuning: every weight trained
        assert metrics["trainable_params"] == metrics["total_params"]
        assert finished.info.run_name == "tiny-mbti-16bit-full"
    else:
        assert 0 < metrics["trainable_params"] < metrics["total_params"]


@pytest.fixture(scope="module")
def config_only_models(random_checkpoint):
    """config.json-only directories of the seeds' real architectures (no weights), by name."""
    return {name: random_checkpoint(model_type, **arch) for name, (model_type, arch) in ARCHITECTURES.items()}


@pytest.mark.parametrize("seed", sorted(SEED_COUNTS))
def test_the_planner_counts_each_seeds_trainable_parameters_on_its_architecture(seed, config_only_models):
    path = config_only_models[SEED_MODELS[seed]]
    result = P.plan(P.with_label_set(validate(_compose(seed, f"model.name_or_path={path}"))))  # as src.plan does
    assert result.trainable_params == SEED_COUNTS[seed]


def test_seed_000_and_002_counts_by_hand_from_the_layer_shapes():
    """LoRA on a d_in -> d_out layer adds r * (d_in + d_out) weights."""
    hidden, kv, layers, labels = 4096, 8 * 128, 32, 6  # Mistral-7B: 8 key/value heads of 128
    per_layer = sum(16 * (hidden + out) for out in (hidden, kv, kv, hidden))  # q, k, v, o at r=16
    assert layers * per_layer + hidden * labels == SEED_COUNTS["000"]  # plus the trained score head, no bias
    hidden, layers = 3200, 26  # OpenLLaMA-3B: q and v are 3200 -> 3200
    assert layers * 2 * 8 * (hidden + hidden) == SEED_COUNTS["002"]


def test_the_docs_seed_table_lists_each_experiment_and_count():
    page = (ROOT / "docs" / "configuration.md").read_text()
    for seed, name in EXPERIMENTS.items():
        assert f"experiment={name}" in page
        assert f"{SEED_COUNTS[seed]:,}" in page, f"seed {seed}'s count is not in docs/configuration.md's seed table"


# ---------------------------------------------------------------------------------------------
# Full fine-tuning (lora=none), the schema extensions the seeds need
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_full_fine_tuning_refuses_a_quantized_base(quant):
    with pytest.raises(ConfigError, match=f"lora=none \\(full fine-tuning\\) with quant.bits={quant[0]}"):
        validate(compose_config(["lora=none", f"quant={quant}"]))


def test_full_fine_tuning_refuses_lora_settings():
    with pytest.raises(ConfigError) as caught:
        validate(compose_config(["lora=none", "lora.r=8", "lora.target_modules=[q_proj]"]))
    assert {p.split(":")[0] for p in caught.value.problems} == {"lora.r", "lora.target_modules"}


def test_a_lora_preset_still_needs_its_rank_and_alpha():
    with pytest.raises(ConfigError, match="lora.r: required"):
        validate(compose_config(["lora.r=null"]))


def test_full_fine_tuning_trains_and_saves_every_weight(tmp_path, mlflow_store, tiny_model_dir, capsys):
    raw = compose_config(["lora=none", "train.max_steps=3", "train.eval_strategy=no", "data.subsample=48"])
    raw["output_dir"] = str(tmp_path / "out")
    train_run(raw)
    (finished,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    metrics, params = finished.data.metrics, finished.data.params
    assert metrics["trainable_params"] == metrics["total_params"] and params["lora.preset"] == "none"
    assert params["lora.resolved_targets"] == "" and finished.info.run_name == "tiny-topics-16bit-full"
    from src.runs import compare

    capsys.readouterr()
    assert compare.main(["--runs", finished.info.run_id, "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["targets"] == "all weights (full fine-tuning)"  # src.compare shows the full row as such
    saved = tmp_path / "out" / "model"
    assert (saved / "model.safetensors").is_file() and not (saved / "adapter_config.json").exists()
    assert json.loads((saved / "label_map.json").read_text())["task"] == "classification"
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    trained = AutoModelForSequenceClassification.from_pretrained(saved)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.mlp.down_proj.weight"  # a weight LoRA presets never adapt in place
    assert not torch.equal(trained.state_dict()[name], base.state_dict()[name])
    assert "Full fine-tuning of the 16-bit tiny" in finished.data.tags["mlflow.note.content"]


def test_the_planner_counts_full_fine_tunings_gradients_and_optimizer_state(tiny_model_dir):
    result = P.plan(validate(compose_config(["lora=none", "train.optim=adamw_torch"])))
    params = result.total_params
    assert result.trainable_params == params and result.lora_resolved_targets == ""
    breakdown = result.est_mem_breakdown_gb
    # fp32 weights (counted once), an fp32 gradient and AdamW's two fp32 moments each
    assert breakdown.weights == pytest.approx(params * 4 / 2**30, abs=1e-3)
    assert breakdown.trainable_states == pytest.approx(params * (4 + 8) / 2**30, abs=1e-3)
    eight_bit = P.plan(validate(compose_config(["lora=none", "train.optim=adamw_bnb_8bit"])))
    assert eight_bit.est_mem_breakdown_gb.trainable_states == pytest.approx(params * (4 + 2) / 2**30, abs=1e-3)


def test_one_minus_share_pos_weight_is_seed_000s_formula(tmp_path):
    raw = compose_config(["data=topics_multilabel", "data.pos_weight=one_minus_share"])
    data = load_data(validate(raw).data)
    y = np.array(data.train["labels"])
    expected = 1 - y.sum(axis=0) / y.sum()  # label_weights = 1 - labels.sum(axis=0) / labels.sum()
    np.testing.assert_allclose(data.label_weights, expected, rtol=1e-6)  # float32 labels


def test_all_but_head_adds_berts_pooler_and_leaves_the_head_out():
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    bert = BertForSequenceClassification(
        BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    )
    lora = validate(compose_config(["lora=all_but_head"])).lora
    targets = modeling.apply_lora(bert, lora, "classification")
    adapted = {n for n, m in targets.named_modules() if hasattr(m, "lora_A")}
    assert "base_model.model.bert.pooler.dense" in adapted
    assert not any("classifier" in n for n in adapted)
    assert len(adapted) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; the pooler
    llama = LlamaForSequenceClassification(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    )
    all_linear = validate(compose_config(["lora=all_linear"])).lora
    assert modeling.resolve_target_modules(llama, lora) == modeling.resolve_target_modules(llama, all_linear)


def test_a_4bit_bert_classifier_trains_its_head_unquantized(tmp_path, mlflow_store, random_checkpoint):
    """Seed 001's base: transformers found BERT's head by its last parameter, classifier.bias, named no module,
    and quantized the head, whose 4-bit weight then failed in training (bitsandbytes' AssertionError)."""
    bert = random_checkpoint("bert", weights=True, **SMALL_ENCODER)
    raw = _compose("001", *ON_CPU, f"model.name_or_path={bert}", "model.max_length=64")
    raw["output_dir"] = str(tmp_path / "out")
    train_run(raw)
    (finished,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert finished.info.status == "FINISHED"
    assert finished.data.metrics["trainable_params"] == P.plan(P.with_label_set(validate(raw))).trainable_params
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    head = [k for k in saved if "classifier" in k]
    assert head and all(saved[k].dtype == torch.float32 for k in head), head  # a full-precision head, saved
