"""A study written through the sweeps' storage in one process is read by plain Optuna in another.

This is the contract ``optuna-dashboard <storage>`` relies on: the writer opens the storage as the
Optuna sweeper does (``src.trial.open_storage``: an SQLAlchemy URL, else a journal file)
and the reader, a separate interpreter that imports nothing from this project, sees the same
study, trials, states, params, values, intermediate values and user attrs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

# Trials by ask/tell, as the sweeper tells them: completed, failed, pruned after a report.
WRITER = textwrap.dedent("""
    import json, sys
    import optuna
    from optuna.trial import TrialState
    from src.trial import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="rank-alpha", storage=open_storage(sys.argv[1]), direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("mlflow_parent_run_id", "0123abcd")
    states = [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    for state in states:
        trial = study.ask()
        r = trial.suggest_categorical("lora.r", [4, 8, 16])
        lr = trial.suggest_float("train.learning_rate", 1e-4, 1e-2, log=True)
        trial.set_user_attr("mlflow_run_id", f"run-{trial.number}")
        if state == TrialState.COMPLETE:
            study.tell(trial, r / 16 + lr)
        elif state == TrialState.PRUNED:
            trial.report(0.1, step=1)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("fail_reason", "RuntimeError: boom")
            study.tell(trial, state=TrialState.FAIL)
""")

# Plain Optuna only: what a dashboard or a notebook would do with the storage.
READER = textwrap.dedent("""
    import json, sys
    import optuna

    spec = sys.argv[1]
    if "://" in spec:
        storage = spec
    else:
        from optuna.storages.journal import JournalFileBackend
        storage = optuna.storages.JournalStorage(JournalFileBackend(spec))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    print(json.dumps({
        "modules": sorted(m for m in sys.modules if m == "src" or m.startswith("src.")),
        "summary": {"name": summary.study_name, "direction": summary.direction.name, "n_trials": summary.n_trials,
                    "best_trial": summary.best_trial.number, "user_attrs": summary.user_attrs},
        "best": {"number": study.best_trial.number, "value": study.best_value, "params": study.best_params},
        "trials": [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
                    "intermediate": {str(k): v for k, v in t.intermediate_values.items()}, "user_attrs": t.user_attrs}
                   for t in study.get_trials(deepcopy=False)],
    }))
""")


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_study_written_by_one_process_is_read_by_optuna_in_another(tmp_path, kind):
    spec = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else str(tmp_path / "optuna.journal")
    written = _python(WRITER, spec)
    assert written.returncode == 0, written.stderr
    read = _python(READER, spec)
    assert read.returncode == 0, read.stderr
    seen = json.loads(read.stdout)

    # What the writer's seeded sampler proposed, recomputed here from the same sampler.
    import optuna

    replay = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    proposed = []
    for _ in range(5):
        trial = replay.ask()
        proposed.append(
            {
                "lora.r": trial.suggest_categorical("lora.r", [4, 8, 16]),
                "train.learning_rate": trial.suggest_float("train.learning_rate", 1e-4, 1e-2, log=True),
            }
        )
        replay.tell(trial, 0.0)

    assert seen["modules"] == []  # the reader is plain Optuna
    states = ["COMPLETE", "COMPLETE", "FAIL", "PRUNED", "COMPLETE"]
    # A pruned trial's value is its last reported intermediate value (Optuna's rule).
    values = [
        p["lora.r"] / 16 + p["train.learning_rate"] if s == "COMPLETE" else 0.1 if s == "PRUNED" else None
        for p, s in zip(proposed, states)
    ]
    assert seen["trials"] == [
        {
            "number": i,
            "state": s,
            "params": p,
            "value": v,
            "intermediate": {"1": 0.1} if s == "PRUNED" else {},
            "user_attrs": {
                "mlflow_run_id": f"run-{i}",
                **({"fail_reason": "RuntimeError: boom"} if s == "FAIL" else {}),
            },
        }
        for i, (s, p, v) in enumerate(zip(states, proposed, values))
    ]
    best = max((i for i, s in enumerate(states) if s == "COMPLETE"), key=lambda i: values[i])
    assert seen["best"] == {"number": best, "value": values[best], "params": proposed[best]}
    assert seen["summary"] == {
        "name": "rank-alpha",
        "direction": "MAXIMIZE",
        "n_trials": 5,
        "best_trial": best,
        "user_attrs": {"mlflow_parent_run_id": "0123abcd"},
    }
