"""Packed trials (``hydra.sweeper.pack``, :mod:`src.packs.model`): several trials on one base, each as if alone."""

from __future__ import annotations

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from src.config import validate
from src.sweeps.job import run_pack_job
from tests.conftest import compose_config, train_run

COMMON = [
    "data=instructions",
    "data.subsample=40",
    "data.eval_subsample=8",
    "data.num_sample_prompts=1",
    "train.max_steps=4",
    "train.logging_steps=1",
    "train.eval_strategy=no",
    "train.per_device_train_batch_size=4",
    "lora.dropout=0.0",
]
# Three trials of different rank, targets and learning rate (and one a different schedule and seed).
TRIALS = [
    ["lora=attn_qv", "lora.r=4", "train.learning_rate=2e-3"],
    ["lora=all_linear", "lora.r=8", "lora.alpha=8", "train.learning_rate=5e-3", "train.seed=7"],
    ["lora=attn_qv", "lora.r=2", "train.learning_rate=1e-2", "train.lr_scheduler_type=constant", "train.max_steps=3"],
]


def _raw(tmp_path, name: str, overrides: list[str]) -> dict:
    raw = compose_config([*COMMON, *overrides])
    raw["output_dir"] = str(tmp_path / name)
    return raw


def _losses(run_id: str) -> list[float]:
    history = mlflow.MlflowClient().get_metric_history(run_id, "train_loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def _adapter(tmp_path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))


def test_each_trial_of_a_pack_trains_as_it_would_alone(tmp_path, mlflow_store):

    trials = [[*overrides, "eval=forgetting"] for overrides in TRIALS]  # each trial scores the text on its own slot
    alone = []
    for i, overrides in enumerate(trials):
        train_run(_raw(tmp_path, f"alone{i}", overrides))
        alone.append(mlflow.last_active_run().info.run_id)
    result = run_pack_job([(_raw(tmp_path, f"pack{i}", o), None) for i, o in enumerate(trials)])
    packed = result["pack"]
    assert [r["status"] for r in packed] == ["ok"] * 3, packed
    (stats,) = result["packs"]  # one base load, from the pack process's result file
    assert (stats["trained"], stats["slots"]) == (3, 3) and stats["joint_steps"] == 4
    assert stats["trials_per_step"] == pytest.approx((4 + 4 + 3) / 4)  # trial 2 trains 3 steps, the others 4
    for i, (solo_id, trial) in enumerate(zip(alone, packed)):
        solo_losses, pack_losses = _losses(solo_id), _losses(trial["run_id"])
        assert len(pack_losses) == (3 if i == 2 else 4)
        assert pack_losses == pytest.approx(solo_losses, rel=1e-5, abs=1e-6), (i, solo_losses, pack_losses)
        solo_w, pack_w = _adapter(tmp_path, f"alone{i}"), _adapter(tmp_path, f"pack{i}")
        assert sorted(solo_w) == sorted(pack_w)
        for key in solo_w:  # the tolerance: 1e-5 (Adam's step amplifies float noise in tiny gradients)
            torch.testing.assert_close(pack_w[key], solo_w[key], rtol=1e-5, atol=1e-5)
        lora_b = [key for key in pack_w if "lora_B" in key]
        assert all(pack_w[key].abs().max() > 0 for key in lora_b)  # it trained (B starts at zero)
        run_ = mlflow.get_run(trial["run_id"])
        assert run_.info.status == "FINISHED"
        assert run_.data.tags["pack_size"] == "3" and run_.data.tags["pack_trial"] == f"t{i}"
        solo_run = mlflow.get_run(solo_id)
        for metric in ("trainable_params", "total_params"):
            assert run_.data.metrics[metric] == solo_run.data.metrics[metric], metric
        for metric in ("forgetting_loss_base", "forgetting_loss_after", "forgetting_loss_delta"):
            assert run_.data.metrics[metric] == pytest.approx(solo_run.data.metrics[metric], rel=1e-5, abs=1e-6)
        assert run_.data.params["lora.resolved_targets"] == solo_run.data.params["lora.resolved_targets"]


def test_a_trial_that_fails_fails_alone(tmp_path, mlflow_store):

    bad = ["lora=attn_qv", "train.learning_rate=1e30", "train.stop_on_nonfinite_loss=true"]
    members = [(_raw(tmp_path, "good", TRIALS[0]), None), (_raw(tmp_path, "bad", bad), None)]
    result = run_pack_job(members)["pack"]
    assert result[0]["status"] == "ok", result
    assert result[1]["status"] == "failed" and result[1]["run_id"], result
    assert mlflow.get_run(result[1]["run_id"]).info.status == "FAILED"
    assert len(_losses(result[0]["run_id"])) == 4


def test_an_invalid_trial_fails_before_the_pack_starts(tmp_path, mlflow_store):

    members = [(_raw(tmp_path, "good", TRIALS[0]), None), (_raw(tmp_path, "bad", ["lora.r=0"]), None)]
    out = run_pack_job(members, isolate=False)
    result = out["pack"]
    assert [r["status"] for r in result] == ["ok", "failed"], result
    assert result[1]["error_type"] == "ConfigError"
    assert [p["trained"] for p in out["packs"]] == [1]  # in this process too; the invalid trial never joined


def test_unpackable_names_why():
    from src.sweeps.grouping import unpackable

    def cfg(overrides):
        raw = compose_config(overrides)
        raw["output_dir"] = "unused"
        return validate(raw, for_training=True)

    assert unpackable(cfg(["data=instructions"])) is None
    assert unpackable(cfg(["data=topics"])) is None  # a classifier packs: a head per trial
    assert "lora.bias" in unpackable(cfg(["data=instructions", "lora.bias=all"]))
    assert "fast_path" in unpackable(cfg(["data=instructions", "train.fast_path=false"]))


def test_a_packed_rslora_trial_trains_as_it_would_alone(tmp_path, mlflow_store):
    """rsLoRA packs: the slot bank takes each adapter's scale from peft (alpha / sqrt(r)), and its start from peft's
    own init (orthogonal: B starts nonzero)."""
    trials = [
        ["lora=attn_qv", "lora.r=4", "lora.alpha=8", "lora.use_rslora=true"],
        ["lora=all_linear", "lora.use_rslora=true", "lora.init=orthogonal", "train.learning_rate=5e-3"],
    ]
    alone = []
    for i, overrides in enumerate(trials):
        train_run(_raw(tmp_path, f"alone{i}", overrides))
        alone.append(mlflow.last_active_run().info.run_id)
    packed = run_pack_job([(_raw(tmp_path, f"pack{i}", o), None) for i, o in enumerate(trials)], isolate=False)["pack"]
    assert [r["status"] for r in packed] == ["ok"] * 2, packed
    for i, (solo_id, trial) in enumerate(zip(alone, packed)):
        assert _losses(trial["run_id"]) == pytest.approx(_losses(solo_id), rel=1e-5, abs=1e-6), i
        solo_w, pack_w = _adapter(tmp_path, f"alone{i}"), _adapter(tmp_path, f"pack{i}")
        assert sorted(solo_w) == sorted(pack_w)
        for key in solo_w:
            torch.testing.assert_close(pack_w[key], solo_w[key], rtol=1e-5, atol=1e-5)
        assert mlflow.get_run(trial["run_id"]).data.params["lora.use_rslora"] == "True"


@pytest.mark.slow  # about 20 s: two runs alone and a pack of two
def test_an_fp8_pack_s_trials_train_as_they_would_alone(tmp_path, mlflow_store):
    """quant=fp8 packs (its grouping key is the FP8 base's): each token's row is rounded to FP8 on its own, so a
    trial's first step in the joint step is its step alone (1e-5). After it, fp32 noise of the order of the
    non-FP8 pack's (1e-7) may move a value across an FP8 rounding step (e4m3: 6%), and Adam turns a tiny gradient's
    noise into a whole step: four steps on agree to 0.5% in loss and 3% in each adapter weight, where the two trials
    differ by far more. (The pack engine's exact equivalence is the test above, without FP8.)"""
    trials = [["quant=fp8", "lora=attn_qv", "lora.r=4"], ["quant=fp8", "lora=all_linear", "train.learning_rate=5e-3"]]
    alone = []
    for i, overrides in enumerate(trials):
        train_run(_raw(tmp_path, f"alone{i}", overrides))
        alone.append(mlflow.last_active_run().info.run_id)
    out = run_pack_job([(_raw(tmp_path, f"pack{i}", o), None) for i, o in enumerate(trials)], isolate=False)
    assert [r["status"] for r in out["pack"]] == ["ok"] * 2 and [p["trained"] for p in out["packs"]] == [2]
    for i, (solo_id, trial) in enumerate(zip(alone, out["pack"])):
        solo_losses, pack_losses = _losses(solo_id), _losses(trial["run_id"])
        assert len(pack_losses) == 4 and pack_losses[0] == pytest.approx(solo_losses[0], rel=1e-5), i
        assert pack_losses == pytest.approx(solo_losses, rel=5e-3), i
        solo_w, pack_w = _adapter(tmp_path, f"alone{i}"), _adapter(tmp_path, f"pack{i}")
        for (
            key
        ) in solo_w:  # within 3% of its norm: Adam turns a tiny gradient's noise into a step; a wrong trial's is ~100%
            assert (pack_w[key] - solo_w[key]).norm() <= 0.03 * solo_w[key].norm(), (i, key)
        assert mlflow.get_run(trial["run_id"]).info.run_name.startswith("tiny-instructions-fp8-")
    last = [_losses(solo_id)[-1] for solo_id in alone]
    assert abs(last[0] - last[1]) > 0.05 * last[0]  # the trials themselves are told apart at that tolerance


def test_a_variant_the_pack_engine_lacks_trains_alone_and_the_sweep_says_why():
    from src.sweeps.grouping import group

    def raw(overrides):
        return {**compose_config(["data=instructions", *overrides]), "output_dir": "unused"}

    raws = [
        raw([]),
        raw(["lora.use_dora=true"]),
        raw(["lora.use_rslora=true", "lora.r=16"]),
        raw(["lora.loraplus_lr_ratio=16"]),
        raw(["lora.init=pissa"]),
        raw(["lora.init=gaussian"]),
        raw(["lora.init=olora"]),
    ]
    said: dict[int, str] = {}
    assert group(raws, 4, say=said.__setitem__) == [[0, 2, 5], [1], [3], [4], [6]]
    assert said == {
        1: "lora.use_dora=true: DoRA's magnitude vectors are not in the pack engine",
        3: "lora.loraplus_lr_ratio=16: LoRA+'s own learning rate for B is not in the pack engine's optimizer",
        4: "lora.init=pissa: it changes the base weights, which the pack shares",
        6: "lora.init=olora: it changes the base weights, which the pack shares",
    }


def test_a_pack_refuses_a_variant_it_cannot_train():
    """Grouping keeps such jobs out; a pack that is handed one anyway refuses it before it attaches an adapter."""
    from src.config import ConfigError
    from src.packs.model import build_pack

    loras = [validate(compose_config(o)).lora for o in ([], ["lora.use_dora=true"], ["lora.init=pissa_niter_4"])]
    with pytest.raises(ConfigError) as refused:
        build_pack(torch.nn.Linear(2, 2), loras, "sft", seeds=[0, 0, 0])
    assert refused.value.problems == [
        "trial 1: lora.use_dora=true: DoRA's magnitude vectors are not in the pack engine",
        "trial 2: lora.init=pissa_niter_4: it changes the base weights, which the pack shares",
    ]


def _step_lines_by_name(output: str, names: list[str], max_steps: int) -> tuple[list[str], dict[str, list[str]]]:
    """The metric lines in ``output`` (train, eval and end-of-training), and those that start with each name."""
    lines = [line for line in output.splitlines() if f"/{max_steps}  " in line and "loss" in line]
    return lines, {name: [line for line in lines if f"[{name}] " in line] for name in names}


def test_the_metric_lines_of_a_pack_say_which_trial_each_is(tmp_path, mlflow_store, caplog):

    trials = [["lora=attn_qv", "lora.r=2"], ["lora=attn_qv", "lora.r=4"]]
    steps = ["train.max_steps=2", "train.eval_strategy=steps", "train.eval_steps=2"]
    members = [(_raw(tmp_path, f"pack{i}", [*o, *steps]), None) for i, o in enumerate(trials)]
    with caplog.at_level("INFO", logger="src"):
        result = run_pack_job(members, isolate=False)["pack"]
    assert [r["status"] for r in result] == ["ok", "ok"], result
    names = [mlflow.get_run(r["run_id"]).info.run_name for r in result]
    assert len(set(names)) == 2
    lines, labelled = _step_lines_by_name("\n".join(r.getMessage() for r in caplog.records), names, 2)
    assert len(lines) == sum(len(own) for own in labelled.values()), lines  # no line without its trial's name
    for name, own in labelled.items():  # two train lines, one eval line, the end-of-training line
        assert len(own) == 4, (name, lines)
        assert f"[{name}] eval  step 2/2" in "\n".join(own)
        assert all("tokens/s " in line for line in own if "eval  " not in line), own


def test_a_pack_that_does_not_fit_is_split():
    """The pack's estimate at its least (src.plan: the base once) against a forced free memory."""
    from src.memory import pack_estimate_gb, plan
    from src.sweeps.configs import FeasibilityConf
    from src.sweeps.feasibility import fit_pack

    def cfg(overrides):
        raw = compose_config(["data=instructions", "train.per_device_train_batch_size=1", *overrides])
        raw["train"]["activation_checkpointing"] = True  # the least the check plans for
        raw["output_dir"] = "unused"
        return validate(raw, for_training=True)

    cfgs = [cfg(["lora=attn_qv"]), cfg(["lora=all_linear"]), cfg(["lora=attn_qv", "lora.r=16"])]
    least = [plan(c).est_mem_breakdown_gb for c in cfgs]
    two, three = pack_estimate_gb(least[:2]), pack_estimate_gb(least)
    assert two < three
    assert fit_pack(cfgs, FeasibilityConf(mode="off")) == [[0, 1, 2]]
    assert fit_pack(cfgs, FeasibilityConf(available_gpu_mem_gb=1000.0)) == [[0, 1, 2]]
    assert fit_pack(cfgs, FeasibilityConf(available_gpu_mem_gb=(two + three) / 2)) == [[0, 1], [2]]
    assert fit_pack(cfgs, FeasibilityConf(available_gpu_mem_gb=0.001)) == [[0], [1], [2]]


@pytest.mark.slow  # 20 s to 3 min; its sides are the default tier's pack and solo runs, which the tests above check
@pytest.mark.parametrize("workload,trials", [("tiny-pack3", 3), ("tiny-multilabel-pack2", 2)])
def test_the_pack_bench_runs_both_sides_on_cpu(tmp_path, workload, trials):
    """``python -m src.bench --workload tiny-pack3 --device cpu`` (SFT) and its seed-000 multi-label twin: their
    code paths, not their numbers."""
    import json

    from src.bench import main

    out = tmp_path / "bench.json"
    args = ["--workload", workload, "--device", "cpu", "--examples", "16", "--model-dir", str(tmp_path / "m")]
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    seq, packed = result["sides"]["sequential"], result["sides"]["packed"]
    assert len(seq["run_ids"]) == len(packed["run_ids"]) == trials
    assert seq["train_tokens"] == packed["train_tokens"] > 0  # the same rows, once per trial, on both sides
    assert all(isinstance(v, float) for v in seq["eval_loss"] + packed["eval_loss"])
    assert result["speedup"] == pytest.approx(seq["wall_s"] / packed["wall_s"])


CLASSIFY = [
    "data.subsample=24",
    "data.eval_subsample=8",
    "train.max_steps=3",
    "train.logging_steps=1",
    "train.eval_strategy=no",
    "train.per_device_train_batch_size=8",
    "lora.dropout=0.0",
]
CLASSIFY_TRIALS = [
    ["lora=attn_qv", "lora.r=4", "train.learning_rate=2e-3"],
    ["lora=all_linear", "lora.r=2", "lora.alpha=8", "train.learning_rate=5e-3", "train.lr_scheduler_type=constant"],
]


def _binary_csv(tmp_path) -> list[str]:
    import csv

    path = tmp_path / "binary.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(40):
            writer.writerow(
                [f"{'good' if i % 3 else 'bad'} thing number {i} " * (1 + i % 4), "pos" if i % 3 else "neg"]
            )
    return [
        "data=file",
        f"data.path={path}",
        "data.task=classification",
        "data.text_columns=[text]",
        "data.label_column=label",
        "data.eval_fraction=0.25",
    ]


@pytest.mark.parametrize(
    "kind",
    ["multiclass-weighted", "multilabel-pos-weight", "binary", "bert"],
)
def test_each_classification_trial_of_a_pack_trains_as_it_would_alone(tmp_path, mlflow_store, kind, random_checkpoint):
    """A pack of 2 classifiers (their own rank, targets, learning rate and schedule; a head each): each trial's
    losses, LoRA weights and head match the same trial run alone within 1e-5 (CPU, fp32)."""
    data = {
        "multiclass-weighted": ["data=topics", "data.class_weights=balanced"],
        "multilabel-pos-weight": ["data=topics_multilabel"],
        "binary": _binary_csv(tmp_path),
        "bert": ["data=topics"],
    }[kind]
    if kind == "bert":
        bert = random_checkpoint(
            "bert",
            weights=True,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=1024,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        data = [*data, "model=bert_large", f"model.name_or_path={bert}", "model.max_length=64"]
    trials = [
        [*o, "lora=attn_qv", "lora.target_modules=[query,value]"] if kind == "bert" and "attn_qv" in o else o
        for o in CLASSIFY_TRIALS
    ]
    if kind == "bert":
        trials[1] = [o for o in trials[1] if o != "lora=all_linear"] + [
            "lora=attn_qv",
            "lora.target_modules=[query,key,value,dense]",
        ]

    def raw(name, overrides):
        composed = compose_config([*data, *CLASSIFY, *overrides])
        composed["output_dir"] = str(tmp_path / name)
        return composed

    alone = []
    for i, overrides in enumerate(trials):
        train_run(raw(f"alone{i}", overrides))
        alone.append(mlflow.last_active_run().info.run_id)
    packed = run_pack_job([(raw(f"pack{i}", o), None) for i, o in enumerate(trials)], isolate=False)["pack"]
    assert [r["status"] for r in packed] == ["ok"] * 2, packed
    for i, (solo_id, trial) in enumerate(zip(alone, packed)):
        solo_losses, pack_losses = _losses(solo_id), _losses(trial["run_id"])
        solo_w, pack_w = _adapter(tmp_path, f"alone{i}"), _adapter(tmp_path, f"pack{i}")
        assert len(pack_losses) == 3
        assert pack_losses == pytest.approx(solo_losses, rel=1e-5, abs=1e-6), (i, solo_losses, pack_losses)
        assert sorted(solo_w) == sorted(pack_w) and any("score" in k or "classifier" in k for k in pack_w)
        for key in solo_w:
            torch.testing.assert_close(pack_w[key], solo_w[key], rtol=1e-5, atol=1e-5)
        solo_run, pack_run = mlflow.get_run(solo_id), mlflow.get_run(trial["run_id"])
        for metric in ("trainable_params", "total_params", "objective"):
            assert pack_run.data.metrics[metric] == pytest.approx(solo_run.data.metrics[metric], rel=1e-5), metric
