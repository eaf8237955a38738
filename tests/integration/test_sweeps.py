"""Sweeps as real subprocesses on the tiny model: grids, Optuna studies, failures, resumes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from src.sweeps.study import (
    counted,
)
from tests.conftest import ROOT, TINY
from tests.integration.sweeping import split_runs, sweep


@pytest.mark.slow  # ~1.5 min; a grid end to end: test_a_failing_job_is_recorded_and_the_sweep_goes_on
def test_grid_of_4_gives_4_finished_children_under_1_parent(tmp_path, mlflow_store):
    result = sweep(["--multirun", "lora.r=2,4", "lora=attn_qv,mlp", *TINY[1:]], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parents, children = split_runs(mlflow_store)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    sweep_id = parent.data.tags["sweep_id"]
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["sweep_id"] for c in children} == {sweep_id}
    assert sorted((c.data.params["lora.r"], c.data.params["lora.preset"]) for c in children) == [
        ("2", "attn_qv"),
        ("2", "mlp"),
        ("4", "attn_qv"),
        ("4", "mlp"),
    ]
    # Every job wrote to its own output directory, a tag: as a param it was the one that always differs, noise
    # in the UI's compare view.
    assert not [c for c in children if "output_dir" in c.data.params]
    assert len({c.data.tags["output_dir"] for c in children}) == 4
    assert all(Path(c.data.tags["output_dir"]).is_dir() for c in children)
    summary = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=parent.info.run_id, artifact_path="summary.json", tracking_uri=mlflow_store
            )
        ).read_text()
    )
    assert summary["counts"]["FINISHED"] == 4 and len(summary["jobs"]) == 4
    assert parent.data.metrics["jobs_finished"] == 4
    done = re.findall(rf"\[sweep {re.escape(sweep_id)}\] job (\d)/4 \(#\d\) FINISHED eval_f1_macro=", result.stdout)
    assert done == ["1", "2", "3", "4"], result.stdout[-3000:]
    assert result.stdout.count(f"[sweep {sweep_id}] job #") == 4  # one launch line per job, with its own overrides
    assert "env_set" not in result.stdout + result.stderr  # the sweep's internal overrides stay out of sight
    assert "best: eval_f1_macro=" in result.stdout
    for child in children:  # each trial process logged its run to the job's own train.log
        assert " finished: eval_f1_macro " in (Path(child.data.tags["output_dir"]) / "train.log").read_text()
    # The one-click view of the sweep in the MLflow UI (tests/integration/test_browser.py opens it in Chromium): a
    # shared view on the experiment, this sweep's runs best first, the swept keys and the comparison's metrics as
    # columns.
    experiment = mlflow.MlflowClient().get_experiment(parent.info.experiment_id)
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{sweep_id}"])
    assert view["searchFilter"] == f"tags.sweep_id = '{sweep_id}'"
    assert view["orderByKey"] == "metrics.`objective`" and view["orderByAsc"] is False  # F1: higher is better
    assert view["selectedColumns"] == [
        *(f"params.`{k}`" for k in ("data.name", "quant.bits", "lora.preset", "lora.resolved_targets", "lora.r")),
        "params.`lora.alpha`",
        *(f"metrics.`{k}`" for k in ("objective", "eval_f1_macro", "trainable_params", "peak_gpu_mem_gb")),
        "metrics.`train_tokens_per_s`",
        "metrics.`train_runtime_s`",
    ]  # lora.r is swept and fixed both; "lora" (a group) shows as lora.preset
    link = f"#/experiments/{parent.info.experiment_id}/runs?viewStateShareKey={sweep_id}&workflowType=machine_learning"
    assert f"compare in the UI: http://127.0.0.1:5000/{link}" in result.stdout


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, mlflow_store):
    result = sweep(["--multirun", "lora.r=0,4", *TINY[1:]], tmp_path)
    assert result.returncode != 0, "a failed job must show in the exit code"
    assert "1 job(s) failed (#0)" in result.stderr
    assert "FAILED #0 lora.r=0" in result.stdout and "lora.r: must be >= 1, got 0" in result.stdout
    parents, children = split_runs(mlflow_store)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # one job of two ran
    by_status = {c.info.status: c for c in children}
    assert sorted(by_status) == ["FAILED", "FINISHED"] and len(children) == 2
    assert by_status["FINISHED"].data.params["lora.r"] == "4"
    failed = by_status["FAILED"]  # failed at validation, before its params were logged: the name says r0
    assert "-r0-" in failed.info.run_name and failed.data.tags["error_type"] == "ConfigError"
    assert "lora.r: must be >= 1" in failed.data.tags["error"]
    assert parents[0].data.metrics["jobs_failed"] == 1 and parents[0].data.metrics["jobs_finished"] == 1


@pytest.mark.slow
def test_seed_table_runs_its_four_rows_on_the_tiny_model(tmp_path, mlflow_store):
    args = [
        "-cd",
        "sweeps",
        "-cn",
        "seed_table",
        *TINY,
        "data=instructions",
        "data.num_sample_prompts=1",
        "quant.compute_dtype=float32",
    ]
    result = sweep(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parents, children = split_runs(mlflow_store)
    assert len(parents) == 1 and len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    rows = sorted(
        (c.data.params["quant.bits"], c.data.params["lora.r"], "lm_head" in c.data.params["lora.resolved_targets"])
        for c in children
    )
    assert rows == [("4", "16", False), ("4", "8", False), ("4", "8", True), ("8", "8", True)]


@pytest.mark.slow
def test_an_infeasible_job_is_skipped_with_its_reason(tmp_path, mlflow_store):
    """With 1 MiB of GPU memory (injected, so it runs on CPU) nothing fits: the job is skipped, not run."""
    result = sweep(
        ["--multirun", "lora.r=4", *TINY[1:], "hydra.sweeper.feasibility.available_gpu_mem_gb=0.001"], tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SKIPPED #0 lora.r=4" in result.stdout and "GiB of GPU memory" in result.stdout
    parents, children = split_runs(mlflow_store)
    assert len(parents) == 1 and children == []
    assert parents[0].data.metrics["jobs_skipped"] == 1


def _optuna_args(storage: str, n_trials: int, *extra: str) -> list[str]:
    return [
        "--multirun",
        "hydra/sweeper=lora_optuna",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweeper.storage={storage}",
        "lora.r=choice(2,4,8,16)",
        "lora.dropout=choice(0.0,0.1)",
        *TINY[1:],
        *extra,
    ]


@pytest.mark.slow
def test_optuna_study_resumes_after_sigterm_without_duplicates(tmp_path, mlflow_store):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = _optuna_args(storage, 6)
    cmd = [sys.executable, "-m", "src.train", *args, f"hydra.sweep.dir={tmp_path / 'first'}"]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 900
        complete = 0
        while complete < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(2)
            try:
                (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage)]
                trials = optuna.load_study(study_name=name, storage=storage).get_trials()
                complete = sum(t.state == TrialState.COMPLETE for t in trials)
            except (ValueError, KeyError, Exception):  # the study does not exist yet
                continue
        assert complete >= 2, (tmp_path / "first.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) != 0
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    interrupted = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert not [t for t in interrupted if t.state == TrialState.RUNNING]

    result = sweep(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=storage)
    ran = [t for t in study.get_trials() if counted(t)]
    assert len(ran) == 6 and all(t.state == TrialState.COMPLETE for t in ran)
    assert len({json.dumps(t.params, sort_keys=True) for t in ran}) == 6  # no config ran twice
    parents, children = split_runs(mlflow_store)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the study's parent run, resumed
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 6
    assert len({(c.data.params["lora.r"], c.data.params["lora.dropout"]) for c in finished}) == 6
    assert {c.data.tags["optuna_trial"] for c in finished} == {str(t.number) for t in ran}
    assert "error" not in parents[0].data.tags  # the SIGTERM that stopped the first run is no longer its state
    # The resumed parent describes the whole study, and the study names its metric (optuna-dashboard shows it).
    assert parents[0].data.metrics["jobs_finished"] == 6
    text = mlflow.artifacts.load_text(f"runs:/{parents[0].info.run_id}/summary.txt")
    assert text.startswith(f"sweep {name}: 6 job(s), ") and "of them in this run of it (6 finished)" in text
    assert study.metric_names == ["eval_f1_macro"]


def test_a_named_study_refuses_a_sweep_with_another_configuration(tmp_path, mlflow_store):
    """One study name, two configurations (train.max_steps 2 and 3): the second sweep is refused before any trial,
    naming the keys. The searched params, the sampler's seed and run control do not define a study. The trial
    fails validation (lora.r=0), so nothing trains."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    base = [a for a in _optuna_args(storage, 1, "hydra.sweeper.study_name=shared") if not a.startswith("lora.")]
    first = sweep([*base, "lora.r=choice(0)"], tmp_path)
    study = optuna.load_study(study_name="shared", storage=storage)
    assert len(study.trials) == 1 and "FAILED" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    assert study.user_attrs["definition"]["train.max_steps"] == 2 and "lora.r" not in study.user_attrs["definition"]

    other = [a.replace("train.max_steps=2", "train.max_steps=3") for a in base]
    refused = sweep([*other, "lora.r=choice(0)", "data.eval_subsample=8"], tmp_path)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "2 key(s) differ" in text, text[-3000:]
    assert "train.max_steps: 2 vs 3" in text and "data.eval_subsample: 16 vs 8" in text
    assert len(optuna.load_study(study_name="shared", storage=storage).trials) == 1  # nothing ran

    joined = sweep(
        [
            *[a.replace("seed=0", "seed=7") for a in base],
            "lora.r=choice(0,2)",
            "train.per_device_eval_batch_size=4",
            "hydra.sweeper.max_failure_rate=1.0",
        ],
        tmp_path,
    )
    text = joined.stdout + joined.stderr
    assert "differ" not in text and "1/1 trials done" in text, text[-3000:]


@pytest.mark.slow
def test_optuna_failing_and_pruned_trials(tmp_path, mlflow_store):
    """A trial that raises is FAIL/FAILED with its reason; a pruned one PRUNED in Optuna and MLflow."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # The threshold pruner prunes at the first report (F1 < 2 always); lora.r=0 is invalid.
    args = [
        "--multirun",
        "hydra/sweeper=lora_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "+hydra.sweeper.pruner.lower=2.0",
        "lora.r=choice(0,4)",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        *TINY[1:],
        "train.max_steps=3",
        "train.eval_strategy=steps",
        "train.eval_steps=1",
    ]
    result = sweep(args, tmp_path)
    assert result.returncode != 0, result.stdout[-3000:]
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = {
        t.params["lora.r"]: t
        for t in optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
        if counted(t)
    }
    assert trials[0].state == TrialState.FAIL and "lora.r: must be >= 1" in trials[0].user_attrs["fail_reason"]
    assert trials[4].state == TrialState.PRUNED and trials[4].intermediate_values
    _, children = split_runs(mlflow_store)
    by_status = {c.info.status: c for c in children}
    assert sorted(by_status) == ["FAILED", "KILLED"] and len(children) == 2
    assert "-r0-" in by_status["FAILED"].info.run_name and by_status["FAILED"].data.tags["error_type"] == "ConfigError"
    pruned = by_status["KILLED"]
    assert pruned.data.params["lora.r"] == "4" and pruned.data.tags["status"] == "PRUNED"
    assert pruned.data.tags["optuna_trial"] == str(trials[4].number)


@pytest.mark.slow  # ~40 s: 4 trials of the TPE preset, in packs of 2
def test_a_packed_tpe_study_states_its_sampler_and_logs_what_mattered(tmp_path, mlflow_store):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [
        "--multirun",
        "hydra/sweeper=lora_optuna",  # the tpe preset
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.pack=2",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=tpe",
        "lora.r=choice(2,4,8,16)",
        "train.learning_rate=tag(log, interval(1e-4, 1e-1))",
        *TINY[1:],
    ]
    result = sweep(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == (
        "[sweep tpe] sampler: TPE (multivariate, constant liar, 10 random startup trials, seed 0); "
        "up to 4 trial(s) asked at a time"
    )
    (parent,), children = split_runs(mlflow_store)
    assert len(children) == 4 and {c.data.tags["pack_size"] for c in children} == {"2"}
    client = mlflow.MlflowClient(mlflow_store)
    run_id = parent.info.run_id
    assert {"importance.md", "importance.csv", "plots"} <= {a.path for a in client.list_artifacts(run_id)}
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {f"plots/{p}.png" for p in ("param_importances", "slice", "contour")} <= plots
    table = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="importance.csv")).read_text()
    importances = {row.split(",")[0]: float(row.split(",")[1]) for row in table.splitlines()[1:]}
    assert set(importances) == {"lora.r", "train.learning_rate"} and sum(importances.values()) == pytest.approx(1)
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("importance/")} == pytest.approx(
        {f"importance/{k}": v for k, v in importances.items()}
    )
    assert "[sweep tpe] importance: " in result.stdout
    # Again on demand, from the study's storage that the parent run names.
    shown = subprocess.run(
        [sys.executable, "-m", "src.compare", "--sweep", "tpe", "--importance"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert all(f"| {param} | {value:.3f} |" in shown.stdout for param, value in importances.items())
    assert f"to parent run {run_id}" in shown.stderr


@pytest.mark.slow
def test_pareto_sweep_is_multi_objective(tmp_path, mlflow_store):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [
        "-cd",
        "sweeps",
        "-cn",
        "pareto",
        *TINY,
        "hydra.sweeper.n_trials=3",
        f"hydra.sweeper.storage={storage}",
        "quant=none",
        "lora=choice(attn_qv,all_linear)",
        "hydra.sweeper.sampler.seed=1",
    ]  # the command line wins
    result = sweep(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]  # eval_f1_macro up, params down
    parents, children = split_runs(mlflow_store)
    trainable = {c.data.tags["optuna_trial"]: c.data.metrics["trainable_params"] for c in children}
    ran = [t for t in study.get_trials() if counted(t)]
    assert len(ran) == 3 and {t.state for t in ran} == {TrialState.COMPLETE}
    for trial in ran:
        assert trial.values[1] == trainable[str(trial.number)]
    client = mlflow.MlflowClient(mlflow_store)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"pareto_front.json", "summary.json", "trials.csv", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parents[0].info.run_id, "plots")}
    assert "plots/pareto_front.png" in plots
    front = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=parents[0].info.run_id, artifact_path="pareto_front.json", tracking_uri=mlflow_store
            )
        ).read_text()
    )
    assert {t["trial"] for t in front["trials"]} == {t.number for t in study.best_trials if counted(t)}


@pytest.mark.slow  # ~1 min: two training jobs
def test_a_grid_over_a_key_the_name_does_not_show_names_its_runs_apart(tmp_path, mlflow_store):
    result = sweep(["--multirun", "data.class_weights=none,balanced", *TINY[1:]], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, children = split_runs(mlflow_store)
    assert sorted(c.info.run_name for c in children) == [
        "tiny-topics-16bit-attn_qv-r8-a16-class_weights=balanced",
        "tiny-topics-16bit-attn_qv-r8-a16-class_weights=none",
    ]
