"""End-to-end runs of the train entrypoint on the tiny model, and the MLflow record they leave."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import TrainerCallback, set_seed

from src import fit, guards, modeling
from src.config import ConfigError, validate
from src.data import load_data
from tests.conftest import ROOT, compose_config, train_run
from tests.unit.test_tracking import FAST as LOGGED_EACH_STEP
from tests.unit.test_tracking import _runs

FAST = [
    "train.max_steps=4",
    "train.logging_steps=2",
    "train.eval_strategy=no",
    "data.subsample=48",
    "data.eval_subsample=24",
    "train.per_device_train_batch_size=8",
]


def _run(tmp_path, overrides):
    raw = compose_config([*FAST, *overrides])
    raw["output_dir"] = str(tmp_path / "out")
    value = train_run(raw)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["start_time DESC"])
    return value, runs[0]


def _artifacts(run_id, path=None):
    return sorted(a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path))


@pytest.mark.parametrize(
    ("data", "quant"),
    [
        ("topics", "none"),
        ("topics", "4bit"),
        ("topics", "8bit"),
        ("topics", "fp8"),
        ("topics_multilabel", "none"),
        ("instructions", "none"),
        ("instructions", "4bit"),
        ("instructions", "fp8"),
        ("chat", "none"),
    ],
)
def test_end_to_end_run_is_recorded_by_contract(tmp_path, mlflow_store, data, quant):
    value, run_ = _run(tmp_path, [f"data={data}", f"quant={quant}"])
    bits = {"none": 16, "4bit": 4, "8bit": 8, "fp8": 8}[quant]
    assert run_.info.status == "FINISHED"
    base = "fp8" if quant == "fp8" else f"{bits}bit"
    assert run_.info.run_name == f"tiny-{data}-{base}-attn_qv-r8-a16"
    assert run_.data.params["quant.fp8"] == str(quant == "fp8")
    params, metrics = run_.data.params, run_.data.metrics
    assert params["lora.r"] == "8" and params["quant.bits"] == str(bits) and params["data.name"] == data
    assert params["model.name_or_path"] == "builtin:tiny-llama" and params["lora.resolved_targets"] == "q_proj,v_proj"
    for name in (
        "trainable_params",
        "total_params",
        "trainable_pct",
        "train_runtime_s",
        "train_tokens_per_s",
        "train_loss",
        "objective",
        "eval_loss",
    ):
        assert name in metrics, name
    assert metrics["objective"] == pytest.approx(value)
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["trainable_pct"] == pytest.approx(100 * metrics["trainable_params"] / metrics["total_params"])
    # tracking.system_metrics=null is off on a CPU; eval=none measures nothing besides
    assert not [name for name in metrics if name.startswith(("system/", "forgetting_"))]
    artifacts = _artifacts(run_.info.run_id)
    assert {"adapter", "config.yaml"} <= set(artifacts)
    adapter = _artifacts(run_.info.run_id, "adapter")
    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/label_map.json",
        "adapter/tokenizer.json",
    } <= set(adapter)
    assert not any(p.endswith((".bin", ".pt", ".pkl")) for p in adapter)
    if data in ("instructions", "chat"):
        assert "eval_perplexity" in metrics and "samples.json" in artifacts
        assert params["data.format"] == ("messages" if data == "chat" else "columns")
    elif data == "topics":
        assert {
            "eval_accuracy",
            "eval_balanced_accuracy",
            "eval_f1_micro",
            "eval_f1_macro",
            "eval_f1_weighted",
            "eval_mcc",
            "eval_f1_class_food",
        } <= set(metrics)
        assert {"classification_report.json", "confusion_matrix.json", "confusion_matrix.png"} <= set(artifacts)
    else:
        assert {
            "eval_f1_micro",
            "eval_f1_macro",
            "eval_f1_weighted",
            "eval_f1_samples",
            "eval_subset_accuracy",
            "eval_f1_label_music",
        } <= set(metrics)


def test_resolved_config_artifact_round_trips(tmp_path, mlflow_store):
    _, run_ = _run(tmp_path, ["lora=all_linear", "lora.r=4", "lora.alpha=8"])
    path = mlflow.MlflowClient().download_artifacts(run_.info.run_id, "config.yaml", str(tmp_path))
    import yaml

    saved = yaml.safe_load(open(path))
    cfg = validate(saved)
    assert (cfg.lora.preset, cfg.lora.r, cfg.lora.alpha) == ("all_linear", 4, 8)
    assert run_.info.run_name == "tiny-topics-16bit-all_linear-r4-a8"
    assert run_.data.params["lora.resolved_targets"] == "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"


def test_a_run_logs_its_config_as_written_from_the_validated_config_alone():
    """The Config is the one carrier below the entry point: it keeps the resolved dict it was validated from, which
    the run logs as params and config.yaml as written (the schema reads 3 epochs as 3.0 and fills data.format,
    which a config stored before that key lacks), and a changed copy (a sweep job's smaller micro-batch) changes
    both alike."""
    from src.fit import run_params

    raw = compose_config(["train.num_train_epochs=3"])
    raw["output_dir"] = "out"
    del raw["data"]["format"]
    cfg = validate(raw)
    assert cfg.train.num_train_epochs == 3.0 and cfg.data.format == "columns"
    assert cfg.resolved() == raw
    params = run_params(cfg)
    assert str(params["train.num_train_epochs"]) == "3" and "data.format" not in params and "output_dir" not in params
    smaller = cfg.with_train(per_device_train_batch_size=cfg.train.per_device_train_batch_size + 1)
    size = smaller.train.per_device_train_batch_size
    assert smaller.resolved()["train"]["per_device_train_batch_size"] == size
    assert smaller == validate(smaller.resolved()) and cfg.resolved() == raw  # the original is left as it was
    cfg.resolved()["lora"]["r"] = 99
    assert cfg.resolved()["lora"]["r"] == raw["lora"]["r"]  # each call hands out a copy


def test_class_weights_change_the_loss(tmp_path, mlflow_store):
    _, plain = _run(tmp_path / "a", [])
    _, weighted = _run(tmp_path / "b", ["data.class_weights=[1.0,1.0,50.0]"])
    assert plain.data.metrics["train_loss"] != pytest.approx(weighted.data.metrics["train_loss"], rel=1e-3)


def test_adapter_learns_while_base_stays_frozen_and_reload_predicts_the_same(tmp_path, mlflow_store):
    from peft import PeftModel

    cfg = validate(compose_config([*FAST, "train.max_steps=6"]))
    data = load_data(cfg.data)
    tokenizer = modeling.load_tokenizer(cfg.model)
    model = modeling.apply_lora(
        modeling.load_model(cfg.model, cfg.quant, data.task, data.labels, tokenizer.pad_token_id), cfg.lora, data.task
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, _, _ = fit.build_trainer(cfg, model, tokenizer, data, str(tmp_path / "ckpt"))
    trainer.train()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert changed, "no parameter changed"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    assert any("lora_B" in n for n in changed) and any("score" in n for n in changed)

    model.save_pretrained(tmp_path / "adapter")
    batch = tokenizer(["the football match was great", "a recipe with garlic"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    base = modeling.load_model(cfg.model, cfg.quant, data.task, data.labels, tokenizer.pad_token_id)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)


def test_bad_data_ends_the_run_failed_with_the_reason(tmp_path, mlflow_store):
    path = tmp_path / "bad.csv"
    path.write_text("id,text,label\n1,hello,a\n2,,b\n3,world,a\n4,again,b\n")
    raw = compose_config(
        [*FAST, "data=file", f"data.path={path}", "data.task=classification", "data.label_column=label"]
    )
    raw["output_dir"] = str(tmp_path / "out")
    with pytest.raises(ValueError, match="empty or missing text"):
        train_run(raw)
    run_ = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run_.info.status == "FAILED"
    assert run_.data.tags["error_type"] == "DataError"
    assert "id 2" in run_.data.tags["error"]
    assert not (tmp_path / "out" / "adapter").exists()


def test_invalid_config_still_leaves_a_failed_run(tmp_path, mlflow_store):
    raw = compose_config(["lora.r=0"])
    with pytest.raises(ValueError, match="lora.r"):
        train_run(raw)
    run_ = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run_.info.status == "FAILED" and run_.data.tags["error_type"] == "ConfigError"


@pytest.mark.parametrize("best_at_end", [False, True])
def test_the_last_steps_evaluation_is_the_final_one_unless_the_best_checkpoint_is_loaded(
    tmp_path, mlflow_store, best_at_end
):
    """The Trainer already evaluates at the last step here (eval_steps divides max_steps); the run used to
    evaluate again for the same numbers, a second pass over the eval split. With load_best_model_at_end the
    model that ends is the best checkpoint, which is evaluated again."""
    overrides = ["train.max_steps=4", "train.eval_strategy=steps", "train.eval_steps=2"]
    if best_at_end:
        overrides += ["train.save_strategy=steps", "train.save_steps=2", "train.load_best_model_at_end=true"]
    value, run_ = _run(tmp_path, overrides)
    history = mlflow.MlflowClient().get_metric_history(run_.info.run_id, "eval_f1_macro")
    assert [m.step for m in history] == ([2, 4, 4] if best_at_end else [2, 4])
    assert value == run_.data.metrics["objective"] == history[-1].value


def _one_step(tmp_path, overrides: list[str], micro_batch: int, accumulation: int):
    """One optimizer step through ``build_trainer``: the step's log and the trainable weights after it.

    Plain SGD with a constant rate and no effective clipping, so the update is the gradient times the rate (an Adam
    step, normalised per weight, or a clipped one, would hide a gradient that is off by a constant factor)."""
    raw = compose_config(
        [
            "data.subsample=32",
            "data.eval_subsample=8",
            "lora.dropout=0.0",
            "train.max_steps=1",
            "train.logging_steps=1",
            "train.eval_strategy=no",
            "train.optim=sgd",
            "train.lr_scheduler_type=constant",
            "train.warmup_steps=0",
            "train.max_grad_norm=1e6",
            f"train.per_device_train_batch_size={micro_batch}",
            f"train.gradient_accumulation_steps={accumulation}",
            *overrides,
        ]
    )
    raw["output_dir"] = str(tmp_path / f"out-{micro_batch}x{accumulation}")
    cfg = validate(raw)
    data = load_data(cfg.data)
    set_seed(cfg.train.seed)
    tokenizer = modeling.load_tokenizer(cfg.model)
    model = modeling.load_model(cfg.model, cfg.quant, data.task, data.labels, tokenizer.pad_token_id)
    model = modeling.apply_lora(model, cfg.lora, data.task)
    trainer, _, _ = fit.build_trainer(cfg, model, tokenizer, data, raw["output_dir"])
    trainer.train()
    (log,) = [row for row in trainer.state.log_history if "loss" in row]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return log, weights


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "padded"])
@pytest.mark.parametrize(
    "task",
    [
        ["data=topics"],
        ["data=topics", "data.class_weights=[0.2,1.0,8.0]"],  # micro-batches of unequal weight totals
        ["data=topics", "data.class_weights=balanced"],
        ["data=topics_multilabel"],  # pos_weight=auto
        ["data=topics_multilabel", "data.pos_weight=none"],
        pytest.param(["data=instructions"], marks=pytest.mark.slow),  # SFT's loss is the model's, normalised by HF
    ],
    ids=["classification", "class-weights", "balanced", "multilabel-pos-weight", "multilabel", "sft"],
)
def test_gradient_accumulation_is_loss_and_gradient_neutral(tmp_path, mlflow_store, task, fast_path):
    """A step of 16 examples as 4 micro-batches of 4 logs the loss and gradient norm of one batch of 16 and updates
    the LoRA weights alike: a class-weighted loss is normalised by the whole step's weight total, as one batch is.
    The console's line shows that loss too."""
    from src import console

    overrides = [*task, f"train.fast_path={str(fast_path).lower()}"]
    one_log, one_weights = _one_step(tmp_path, overrides, 16, 1)
    accumulated_log, accumulated_weights = _one_step(tmp_path, overrides, 4, 4)
    assert accumulated_log["loss"] == pytest.approx(one_log["loss"], rel=1e-5, abs=1e-6)
    assert accumulated_log["grad_norm"] == pytest.approx(one_log["grad_norm"], rel=1e-5, abs=1e-6)
    assert one_weights.keys() == accumulated_weights.keys() and any("lora_B" in n for n in one_weights)
    for name, weight in one_weights.items():
        torch.testing.assert_close(accumulated_weights[name], weight, atol=1e-5, rtol=1e-5, msg=name)
    line = console.metric_line(accumulated_log, 1, 1)
    assert f"loss {console.number(one_log['loss'])}" in line


VARIANTS = {
    "dora": ["lora.use_dora=true"],
    "dora-sft-4bit": ["data=instructions", "quant=4bit", "lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true"],
    "loraplus": ["lora.loraplus_lr_ratio=16"],
    "pissa": ["lora.init=pissa"],
    "olora-sft": ["data=instructions", "lora.init=olora"],
    "orthogonal-padded": ["lora.init=orthogonal", "train.fast_path=false"],
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_each_lora_variant_trains_and_counts_as_src_plan_counts(tmp_path, mlflow_store, overrides):
    from src.memory import plan, with_label_set

    _, run_ = _run(tmp_path, overrides)
    assert run_.info.status == "FINISHED"
    planned = plan(with_label_set(validate(compose_config([*FAST, *overrides]))))
    assert run_.data.metrics["trainable_params"] == planned.trainable_params
    assert run_.data.metrics["total_params"] == planned.total_params
    variant = [override.split("=") for override in overrides if override.startswith("lora.")]
    assert variant and all(run_.data.params[key].lower() == value for key, value in variant), run_.data.params


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "padded"])
@pytest.mark.parametrize("task", [["data=topics"], ["data=instructions"]], ids=["classification", "sft"])
def test_loraplus_steps_b_at_its_ratio_times_a_s_learning_rate(tmp_path, mlflow_store, task, fast_path):
    """One plain SGD step at a constant rate from B = 0 (A gets no gradient yet): LoRA+ with ratio 16 moves every B
    16 times as far as plain LoRA does and leaves every other weight as plain LoRA leaves it."""
    overrides = [*task, f"train.fast_path={str(fast_path).lower()}"]
    _, plain = _one_step(tmp_path / "plain", overrides, 8, 1)
    _, plus = _one_step(tmp_path / "plus", [*overrides, "lora.loraplus_lr_ratio=16"], 8, 1)
    assert plain.keys() == plus.keys() and any("lora_B" in name for name in plain)
    for name, weight in plain.items():
        expected = 16 * weight if "lora_B" in name else weight
        torch.testing.assert_close(plus[name], expected, atol=1e-6, rtol=1e-5, msg=name)
    assert any(weight.abs().max() > 0 for name, weight in plain.items() if "lora_B" in name)


def test_loraplus_gives_the_trainer_peft_s_parameter_groups(tmp_path, mlflow_store):
    raw = compose_config(["lora.loraplus_lr_ratio=8", "train.learning_rate=1e-3", "train.weight_decay=0.01"])
    raw["output_dir"] = str(tmp_path / "out")
    cfg = validate(raw)
    data = load_data(cfg.data)
    tokenizer = modeling.load_tokenizer(cfg.model)
    model = modeling.load_model(cfg.model, cfg.quant, data.task, data.labels, tokenizer.pad_token_id)
    model = modeling.apply_lora(model, cfg.lora, data.task)
    trainer, _, _ = fit.build_trainer(cfg, model, tokenizer, data, raw["output_dir"])
    names = {id(param): name for name, param in model.named_parameters()}
    groups = {
        frozenset("lora_B" in names[id(p)] for p in group["params"]): group
        for group in trainer.optimizer.param_groups
        if group["params"]
    }
    a_group, b_group = groups[frozenset({False})], groups[frozenset({True})]
    assert any("lora_A" in names[id(p)] for p in a_group["params"])
    assert a_group["lr"] == 1e-3 and b_group["lr"] == pytest.approx(8 * 1e-3)
    assert a_group["weight_decay"] == b_group["weight_decay"] == 0.01
    assert trainer.create_optimizer() is trainer.optimizer  # the one the Trainer trains with


class _StopBeforeLoading(Exception):
    pass


@pytest.mark.parametrize(
    "overrides, noted",
    [
        ([], False),  # the quick start: the shipped data stays quiet
        (["data=instructions"], False),
        (["data.path=USER"], True),
        (["data.eval_path=USER"], True),
        (["data.path=null", "data.eval_path=null", "data.hub_id=someone/intents"], True),
        (["model=qwen25_05b", "data.path=USER"], False),
    ],
    ids=["shipped", "shipped-sft", "user-train-file", "user-eval-file", "hub-dataset", "real-model"],
)
def test_the_tiny_model_on_a_users_data_says_once_it_is_a_demo(tmp_path, mlflow_store, monkeypatch, overrides, noted):
    import shutil

    from src import console
    from src.bundled import DATA_DIR

    user = tmp_path / "mine.csv"
    shutil.copy(DATA_DIR / "topics_train.csv", user)
    raw = compose_config([o.replace("USER", str(user)) for o in overrides])
    raw["output_dir"] = str(tmp_path / "out")
    said: list[str] = []
    monkeypatch.setattr(console, "say", said.append)

    def stop(*_args, **_kwargs):
        raise _StopBeforeLoading

    monkeypatch.setattr(modeling, "load_tokenizer", stop)  # the note comes first; nothing needs to train
    with pytest.raises(_StopBeforeLoading):
        train_run(raw)
    notes = [line for line in said if "2-layer demo model" in line]
    assert len(notes) == int(noted), said
    if noted:
        assert all(f"model={name}" in notes[0] for name in ("qwen25_05b", "openllama3b", "mistral7b"))
        assert "model=tiny" not in notes[0].split(":", 2)[-1]  # the real choices, not the toy again


N = 4

RESUME = [
    *LOGGED_EACH_STEP,
    f"train.max_steps={N + 10}",
    "train.save_strategy=steps",
    f"train.save_steps={N}",
    "train.save_total_limit=null",
    "lora.dropout=0.1",  # dropout draws random numbers: the RNG state must be restored too
]


class StopAt(TrainerCallback):
    """Stop training after ``step``, as a killed job would (its checkpoint-``step`` is written first)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _fresh_trainer(cfg, data, tokenizer, output_dir: Path):
    """A new model and trainer, as a new process builds them."""
    set_seed(cfg.train.seed)
    model = modeling.load_model(cfg.model, cfg.quant, data.task, data.labels, tokenizer.pad_token_id)
    model = modeling.apply_lora(model, cfg.lora, data.task)
    trainer, _, _ = fit.build_trainer(cfg, model, tokenizer, data, str(output_dir))
    return trainer, model


def _losses(trainer) -> dict[int, float]:
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow  # two trainings and a resume, ~25 s
@pytest.mark.parametrize("quant", ["none", pytest.param("4bit", marks=pytest.mark.slow)])
def test_resumed_run_continues_as_the_uninterrupted_one(tmp_path, mlflow_store, quant):
    cfg = validate(compose_config([*RESUME, f"quant={quant}"]))
    data = load_data(cfg.data)
    tokenizer = modeling.load_tokenizer(cfg.model)

    whole, whole_model = _fresh_trainer(cfg, data, tokenizer, tmp_path / "whole")
    whole.train()

    first, _ = _fresh_trainer(cfg, data, tokenizer, tmp_path / "split")
    first.add_callback(StopAt(N))
    first.train()
    assert first.state.global_step == N and (tmp_path / "split" / f"checkpoint-{N}").is_dir()

    checkpoint = guards.resume_checkpoint("latest", tmp_path / "split")
    assert checkpoint == str(tmp_path / "split" / f"checkpoint-{N}")
    second, second_model = _fresh_trainer(cfg, data, tokenizer, tmp_path / "split")
    trained = StepRecorder()
    second.add_callback(trained)
    second.train(resume_from_checkpoint=checkpoint)

    assert trained.steps == list(range(N + 1, N + 11))  # only the steps after the checkpoint ran
    expected, got = _losses(whole), _losses(second)
    assert got == pytest.approx(expected, abs=2e-4)  # the Trainer rounds logged losses
    for name, value in _lora_state(second_model).items():
        torch.testing.assert_close(value, _lora_state(whole_model)[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_train_resume_from_checkpoint_latest_continues_the_loss_curve(tmp_path, mlflow_store):
    """Through the entrypoint: the second run resumes checkpoint-N and logs the steps after it."""
    constant = [*RESUME, "train.lr_scheduler_type=constant", "train.warmup_steps=0"]

    def history(overrides, out):
        raw = compose_config([*constant, *overrides])
        raw["output_dir"] = str(out)
        train_run(raw)
        run_ = _runs(mlflow_store)[0]
        steps = mlflow.MlflowClient(mlflow_store).get_metric_history(run_.info.run_id, "train_loss")
        return run_, {m.step: m.value for m in steps}

    _, whole = history([], tmp_path / "whole")
    history([f"train.max_steps={N}"], tmp_path / "split")
    assert (tmp_path / "split" / "checkpoints" / f"checkpoint-{N}" / guards.FINGERPRINT_NAME).is_file()
    resumed, tail = history(["train.resume_from_checkpoint=latest"], tmp_path / "split")
    assert resumed.data.tags["resumed_from"].endswith(f"checkpoint-{N}")
    assert sorted(tail) == list(range(N + 1, N + 11))
    assert tail == pytest.approx({s: whole[s] for s in tail}, abs=2e-4)


def test_resume_latest_without_a_checkpoint_starts_fresh_and_a_bad_path_is_an_error(tmp_path):
    assert guards.resume_checkpoint(None, tmp_path) is None
    assert guards.resume_checkpoint("latest", tmp_path / "none-yet") is None
    with pytest.raises(FileNotFoundError, match="not a Trainer checkpoint"):
        guards.resume_checkpoint(str(tmp_path), tmp_path)


def _checkpoint_of(cfg, tmp_path: Path) -> Path:
    """A checkpoint as the Trainer leaves one (safetensors weights, trainer_state.json), with ``cfg``'s fingerprint."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "first" / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(checkpoint / "adapter_model.safetensors"))
    (checkpoint / "trainer_state.json").write_text("{}")
    labels = load_data(cfg.data).labels
    (checkpoint / guards.FINGERPRINT_NAME).write_text(json.dumps(guards.run_fingerprint(cfg, "classification", labels)))
    return checkpoint


def test_resume_from_a_checkpoint_of_another_configuration_is_refused_naming_the_keys(
    tmp_path, mlflow_store, monkeypatch
):
    """Another data file with the same three classes, or another rank and max_length: refused before the model
    loads, with each differing key as checkpoint vs this run. Before the fix the run trained on without a word."""
    from src.config import ConfigError

    checkpoint = _checkpoint_of(validate(compose_config(LOGGED_EACH_STEP)), tmp_path)
    reordered = tmp_path / "other_topics.csv"  # the same label set, other rows
    lines = (ROOT / "src" / "assets" / "data" / "topics_train.csv").read_text().splitlines(keepends=True)
    reordered.write_text("".join([lines[0], *reversed(lines[1:])]))

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the resume was checked")

    monkeypatch.setattr(modeling, "load_model", no_model)
    cases = [
        ([f"data.path={reordered}"], ["data.path.sha256: "]),
        (["lora.r=4", "model.max_length=32"], ["lora.r: 8 vs 4", "model.max_length: 128 vs 32"]),
    ]
    for i, (overrides, named) in enumerate(cases):
        raw = compose_config([*LOGGED_EACH_STEP, f"train.resume_from_checkpoint={checkpoint}", *overrides])
        raw["output_dir"] = str(tmp_path / f"second-{i}")
        with pytest.raises(ConfigError) as refused:
            train_run(raw)
        message = str(refused.value)
        assert "was trained on another configuration" in message and all(n in message for n in named), message
        assert len(message.splitlines()) == 2 + len(named), message  # only the keys that differ
        run_ = _runs(mlflow_store)[0]
        assert run_.info.status == "FAILED" and named[0] in run_.data.tags["error"]


def test_resume_with_the_checkpoints_own_configuration_is_not_refused(tmp_path, capsys):
    cfg = validate(compose_config(LOGGED_EACH_STEP))
    checkpoint = _checkpoint_of(cfg, tmp_path)
    guards.check_resume(str(checkpoint), guards.run_fingerprint(cfg, "classification", load_data(cfg.data).labels))
    (checkpoint / guards.FINGERPRINT_NAME).unlink()  # saved before fingerprints: a note, not a refusal
    guards.check_resume(str(checkpoint), {"data.task": "sft"})
    assert "has no run_fingerprint.json" in capsys.readouterr().err
    assert guards.run_fingerprint(cfg, "sft", None)["data.labels"] is None  # SFT has no labels


def test_a_checkpoint_saved_before_the_lora_variant_keys_resumes_as_plain_lora_and_not_as_dora(tmp_path, capsys):
    cfg = validate(compose_config(LOGGED_EACH_STEP))
    checkpoint = _checkpoint_of(cfg, tmp_path)
    fingerprint = json.loads((checkpoint / guards.FINGERPRINT_NAME).read_text())
    assert not {"lora.use_dora", "lora.use_rslora", "lora.loraplus_lr_ratio", "lora.init"} & set(fingerprint)
    labels = load_data(cfg.data).labels
    guards.check_resume(str(checkpoint), guards.run_fingerprint(cfg, "classification", labels))
    dora = validate(compose_config([*LOGGED_EACH_STEP, "lora.use_dora=true"]))
    with pytest.raises(ConfigError, match=r"lora.use_dora: \"\(unset\)\" vs true"):
        guards.check_resume(str(checkpoint), guards.run_fingerprint(dora, "classification", labels))


def test_an_sft_run_logs_the_loss_it_gained_on_the_forgetting_text(tmp_path, mlflow_store):
    _, run_ = _run(tmp_path, ["data=instructions", "eval=forgetting"])
    metrics = run_.data.metrics
    base, after = metrics["forgetting_loss_base"], metrics["forgetting_loss_after"]
    assert metrics["forgetting_loss_delta"] == pytest.approx(after - base, abs=1e-12)
    assert 0 < base < 50 and after != base  # four steps moved the adapter, and the text's loss with it


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_base_changing_init_measures_forgetting_from_the_original_base(tmp_path, mlflow_store, init):
    """PiSSA and OLoRA take the adapter's start out of the base: before training the model with its adapter is the
    original base, and its loss on the forgetting text is the plain run's base loss."""
    overrides = ["data=instructions", "eval=forgetting", "train.max_steps=1"]
    _, plain = _run(tmp_path / "plain", overrides)
    _, changed = _run(tmp_path / init, [*overrides, f"lora.init={init}"])
    base = plain.data.metrics["forgetting_loss_base"]
    assert changed.data.metrics["forgetting_loss_base"] == pytest.approx(base, rel=1e-5)


def test_the_forgetting_delta_of_an_adapter_with_b_zero_is_zero(tmp_path, mlflow_store):
    """peft starts B at zero, so the untouched adapter computes as the base (dropout is off in eval mode): the two
    losses are the same number, and a nonzero B is what moves the adapted one."""
    raw = compose_config(["data=instructions", "eval=forgetting", "data.subsample=8", "data.eval_subsample=4"])
    cfg = validate({**raw, "output_dir": str(tmp_path)}, for_training=True)
    loaded = fit.load(cfg, tmp_path)
    lora_b = [p for name, p in loaded.model.named_parameters() if "lora_B" in name]
    assert lora_b and not any(p.any() for p in lora_b)
    text = fit.forgetting_text(cfg)
    with mlflow.start_run() as active:
        base = fit.log_base_loss(cfg, loaded, text)
        fit.log_forgetting(cfg, loaded, text, base)
    metrics = mlflow.get_run(active.info.run_id).data.metrics
    assert metrics["forgetting_loss_delta"] == 0.0
    assert metrics["forgetting_loss_after"] == metrics["forgetting_loss_base"] == base
    with torch.no_grad():
        for p in lora_b:
            p.fill_(0.05)
    assert fit.forgetting_loss(loaded, text, cfg.model.max_length, trained=True) != base
    assert fit.forgetting_loss(loaded, text, cfg.model.max_length, trained=False) == base  # the base, adapter or not
