"""What mattered in a study: the importance table, metrics and plots, on studies in SQLite made through Optuna's API,
and ``python -m src.compare --sweep ID --importance`` on a parent run made through MLflow's."""

from __future__ import annotations

import csv
import warnings

import mlflow
import optuna
import pytest

from src import compare
from src.sweeps.importance import importance_files
from src.sweeps.outcomes import DUPLICATE_OF_ATTR
from src.tracking import ensure_experiment

PLOTS = ["param_importances.png", "slice.png", "contour.png"]


def _study(tmp_path, n: int, params: tuple[str, ...] = ("lora.r", "lora.dropout"), directions=("maximize",)):
    """``n`` trials of a seeded random search where only lora.r moves the value."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(
        study_name="s", storage=storage, directions=list(directions), sampler=optuna.samplers.RandomSampler(seed=0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["eval_f1_macro", "trainable_params"][: len(directions)])

    def objective(trial):
        r = trial.suggest_categorical("lora.r", [2, 4, 8, 16]) if "lora.r" in params else 8
        if "lora.dropout" in params:
            trial.suggest_float("lora.dropout", 0.0, 0.1)
        return (r / 16, r * 100) if len(directions) > 1 else r / 16

    study.optimize(objective, n_trials=n)
    return study


def _files(tmp_path, study, names=("eval_f1_macro",)):
    out = tmp_path / "out"
    out.mkdir()
    found, files = importance_files(study, list(names), out)
    return found, {str(path.relative_to(out)) for path, _ in files}, out


def test_a_study_logs_its_importance_table_metrics_and_plots(tmp_path):
    study = _study(tmp_path, 12)
    found, files, out = _files(tmp_path, study)
    assert files == {"importance.md", "importance.csv", *(f"plots/{p}" for p in PLOTS)}
    assert list(found.values)[0] == "lora.r" and found.values["lora.r"] > found.values["lora.dropout"]
    assert sum(found.values.values()) == pytest.approx(1.0) and found.trials == 12 and found.notes == []
    assert found.values == optuna.importance.get_param_importances(study)  # Optuna's default evaluator
    rows = list(csv.DictReader((out / "importance.csv").open()))
    assert [r["param"] for r in rows] == list(found.values)
    assert [float(r["importance"]) for r in rows] == pytest.approx(list(found.values.values()))
    table = (out / "importance.md").read_text()
    assert table.startswith("Parameter importance for eval_f1_macro (Optuna's default evaluator, PED-ANOVA)")
    assert "from 12 completed trial(s)" in table and f"| lora.r | {found.values['lora.r']:.3f} |" in table
    assert found.metrics() == {f"importance/{k}": v for k, v in found.values.items()}
    assert all((out / "plots" / p).read_bytes().startswith(b"\x89PNG") for p in PLOTS)


def test_a_repeated_proposal_does_not_count_its_point_twice(tmp_path):
    study = _study(tmp_path, 6)
    first = study.trials[0]
    repeat = study.ask({k: first.distributions[k] for k in first.params})
    repeat.set_user_attr(DUPLICATE_OF_ATTR, first.number)
    study.tell(repeat, first.value)
    found, _, _ = _files(tmp_path, study)
    assert found.trials == 6


def test_too_few_trials_give_notes_not_a_failure(tmp_path):
    found, files, out = _files(tmp_path, _study(tmp_path, 1))
    assert files == {"importance.md"} and found.values == {} and found.metrics() == {}
    assert found.notes == [
        "no importances: 1 completed trial(s); they need at least 2",
        "no slice or contour plot: 1 completed trial(s); they need at least 2",
    ]
    assert "note: no importances: 1 completed trial(s)" in (out / "importance.md").read_text()


def test_one_varying_param_takes_all_the_importance_and_has_no_contour(tmp_path):
    found, files, _ = _files(tmp_path, _study(tmp_path, 5, params=("lora.r",)))
    assert found.values == {"lora.r": 1.0}
    assert files == {"importance.md", "importance.csv", "plots/param_importances.png", "plots/slice.png"}
    assert found.notes == [
        "only lora.r varies among the completed trials: it takes all the importance",
        "no contour.png: it pairs two params, and only lora.r varies",
    ]


def test_several_objectives_rank_the_params_for_the_pareto_front(tmp_path):
    study = _study(tmp_path, 8, directions=("maximize", "minimize"))
    found, files, _ = _files(tmp_path, study, names=("eval_f1_macro", "trainable_params"))
    assert found.target == "the Pareto front of eval_f1_macro, trainable_params"
    assert set(found.values) == {"lora.r", "lora.dropout"}
    assert files == {"importance.md", "importance.csv", *(f"plots/{p}" for p in PLOTS)}


def _parent(study, storage: str, uri: str) -> str:
    """The parent run a study's sweep leaves: tagged with its sweep id, naming its study and storage."""
    client = mlflow.MlflowClient(uri)
    experiment_id = ensure_experiment("lora-sweeps", uri)  # artifacts beside the store, not in the project
    tags = {"sweep_id": study.study_name, "sweep_kind": "optuna"}
    run_id = client.create_run(experiment_id, run_name=f"study-{study.study_name}", tags=tags).info.run_id
    client.log_param(run_id, "sweep.study", study.study_name)
    client.log_param(run_id, "sweep.storage", storage)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_compare_importance_prints_the_table_and_logs_it_to_the_parent_run(tmp_path, mlflow_store, capsys):
    study = _study(tmp_path, 10)
    run_id = _parent(study, f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_store)
    assert compare.main(["--sweep", "s", "--importance"]) == 0
    out, err = capsys.readouterr()
    expected = optuna.importance.get_param_importances(study)
    assert out.startswith("Parameter importance for eval_f1_macro")
    assert all(f"| {param} | {value:.3f} |" in out for param, value in expected.items())
    assert f"parent run {run_id}" in err
    client = mlflow.MlflowClient()
    assert {a.path for a in client.list_artifacts(run_id)} == {"importance.md", "importance.csv", "plots"}
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {f"plots/{p}" for p in PLOTS}
    metrics = client.get_run(run_id).data.metrics
    assert metrics == pytest.approx({f"importance/{k}": v for k, v in expected.items()})


def test_compare_importance_needs_an_optuna_study(tmp_path, mlflow_store, capsys):
    with pytest.raises(SystemExit) as exited:
        compare.main(["--importance"])
    assert exited.value.code == 2 and "--importance needs --sweep" in capsys.readouterr().err
    ensure_experiment("lora-sweeps", mlflow_store)
    assert compare.main(["--sweep", "nope", "--importance"]) == 2
    assert "error: no Optuna study 'nope' in the store" in capsys.readouterr().err
    study = _study(tmp_path, 2)
    _parent(study, f"sqlite:///{tmp_path / 'gone.db'}", mlflow_store)
    assert compare.main(["--sweep", "s", "--importance"]) == 2
    assert f"error: the Optuna storage sqlite:///{tmp_path / 'gone.db'} that parent run" in capsys.readouterr().err
    assert not (tmp_path / "gone.db").exists()  # not created empty by the look
