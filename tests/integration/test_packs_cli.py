"""Packed trials (``hydra.sweeper.pack``) as real sweeps: child runs, step lines, pruning, a SIGTERM, a kill -9."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from src.sweeps.job import RESULT_FILE, partial_path, run_pack_job
from tests.unit.packs.test_faults import HANG_S, _runs
from tests.unit.packs.test_packs import COMMON, TRIALS, _raw, _step_lines_by_name


def test_a_packed_grid_gives_one_child_run_per_trial_under_the_parent(tmp_path, mlflow_store):
    """``hydra.sweeper.pack=3`` over a grid of 4 SFT jobs: one pack process trains all 4, 3 at a time (the 4th takes
    the first free slot), on the base loaded once."""
    from tests.integration.sweeping import runs, split_runs, sweep

    args = [
        "--multirun",
        "lora.r=2,4",
        "lora=attn_qv,all_linear",
        "hydra.sweeper.pack=3",
        *COMMON[:3],
        "train.max_steps=2",
        "train.eval_strategy=no",
        "tracking.log_adapter=false",
    ]
    result = sweep(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "4 jobs as 1 launches (hydra.sweeper.pack=3: 1 pack processes, each training 3 at a time)" in output
    assert output.count("pack of 4 trial(s) in 3 slot(s)") == 1  # one plan: the base loaded once
    assert "pack: trained 4 trial(s) in 3 slot(s) on one base" in output
    assert "] pack 1: trained 4 trial(s) in 3 slot(s) on one base load;" in output  # the sweeper's line
    assert "packs: 1 base load(s), trials trained by each: 4" in output  # its summary
    parents, children = split_runs(mlflow_store)
    assert len(parents) == 1 and len(children) == 4 and len(runs(mlflow_store)) == 5
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    packed = sorted(c.data.tags.get("pack_trial", "-") for c in children)
    assert packed == ["t0", "t1", "t2", "t3"] and {c.data.tags["pack_size"] for c in children} == {"3"}
    assert sorted((c.data.params["lora.r"], c.data.params["lora.preset"]) for c in children) == [
        ("2", "all_linear"),
        ("2", "attn_qv"),
        ("4", "all_linear"),
        ("4", "attn_qv"),
    ]
    assert len({c.data.tags["output_dir"] for c in children}) == 4
    assert parents[0].data.metrics["jobs_finished"] == 4
    assert parents[0].data.metrics["pack_processes"] == 1 and parents[0].data.metrics["pack_trials_trained"] == 4


@pytest.mark.slow  # ~45 s on a shared CPU: a packed grid of 2 as a real sweep, its trials' lines on its output
def test_each_step_line_of_a_packed_sweep_names_its_trial(tmp_path, mlflow_store):
    from tests.integration.sweeping import split_runs, sweep

    args = ["--multirun", "train.learning_rate=1e-3,5e-3", "hydra.sweeper.pack=2", *COMMON[:3]]
    args += ["train.max_steps=2", "train.logging_steps=1", "train.eval_strategy=steps", "train.eval_steps=2"]
    result = sweep([*args, "tracking.log_adapter=false"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 jobs as 1 launches (hydra.sweeper.pack=2: 1 pack processes, each training 2 at a time)" in result.stdout
    _, children = split_runs(mlflow_store)
    names = sorted(c.info.run_name for c in children)
    assert len(set(names)) == 2 and all(c.data.tags["pack_size"] == "2" for c in children)
    lines, labelled = _step_lines_by_name(result.stdout + result.stderr, names, 2)
    assert len(lines) == sum(len(own) for own in labelled.values()), lines  # no line without its trial's name
    for name, own in labelled.items():  # two train lines, one eval line, the end-of-training line
        assert len(own) == 4, (name, lines)
        assert f"[{name}] eval  step 2/2" in "\n".join(own)
        assert all("tokens/s " in line for line in own if "eval  " not in line), own


@pytest.mark.slow  # ~1 min: an Optuna study in packs of 3, successive halving at steps 2 and 4
def test_an_optuna_pack_prunes_its_trials_and_refills_their_slots(tmp_path, mlflow_store):
    """6 trials in packs of 3: one pack process trains all 6 on one base, a pruned or finished trial's slot
    going to the next."""
    import optuna

    from tests.integration.sweeping import split_runs, sweep

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [
        "--multirun",
        "hydra/sweeper=lora_optuna",
        "hydra/sweeper/pruner=successive_halving",
        "hydra.sweeper.pruner.min_resource=2",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.sampler.constant_liar=true",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.pack=3",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=packed",
        "lora.r=choice(2,4,8,16)",
        "train.learning_rate=interval(1e-5,1e-1)",
        *COMMON[:4],
        "train.max_steps=6",
        "train.eval_strategy=steps",
        "train.eval_steps=2",
        "tracking.log_adapter=false",
    ]
    result = sweep(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = optuna.load_study(study_name="packed", storage=storage).trials
    states = sorted(t.state.name for t in trials)
    assert len(trials) == 6 and "PRUNED" in states and "COMPLETE" in states, states
    output = result.stdout + result.stderr
    assert output.count("pack of 6 trial(s) in 3 slot(s)") == 1  # the base loaded once, for all 6
    assert "pack: trained 6 trial(s) in 3 slot(s) on one base" in output
    parents, children = split_runs(mlflow_store)
    assert parents[0].data.metrics["pack_trials_trained"] == 6 and parents[0].data.metrics["pack_processes"] == 1
    assert len(children) == 6 and {c.data.tags["pack_size"] for c in children} == {"3"}
    by_trial = {int(c.data.tags["optuna_trial"]): c for c in children}
    for trial in trials:
        run_ = by_trial[trial.number]
        if trial.state.name == "PRUNED":
            assert run_.info.status == "KILLED" and run_.data.tags["status"] == "PRUNED"
        else:
            assert run_.info.status == "FINISHED"
            assert run_.data.metrics["objective"] == pytest.approx(trial.value)


def _short_and_long(tmp_path) -> list:
    """A pack of two trials: one of 1 step, one of 400 (still training when the short one has ended)."""
    return [
        (_raw(tmp_path, "short", [*TRIALS[0], "train.max_steps=1"]), None),
        (_raw(tmp_path, "long", [*TRIALS[1], "train.max_steps=400"]), None),
    ]


def _signal_the_pack_once(ready, signum: int) -> None:
    """In a thread: send ``signum`` to the pack's process once ``ready()`` holds (within HANG_S)."""
    import multiprocessing

    def watch():
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if ready():
                (process,) = [p for p in multiprocessing.active_children() if p.name == "lora-sweep-pack"]
                os.kill(process.pid, signum)
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def test_a_sigterm_of_the_packs_process_keeps_the_trials_that_finished(tmp_path, mlflow_store):
    """SIGTERM of the pack's own process (its sweeper still waiting): the trial still training ends KILLED, and the
    one that had finished stays a finished job in the result the sweeper reads."""
    members = _short_and_long(tmp_path)

    def short_one_finished() -> bool:
        runs = _runs(members[0][0])
        return bool(runs) and runs[0].info.status == "FINISHED"

    _signal_the_pack_once(short_one_finished, signal.SIGTERM)
    result = run_pack_job(members, isolate=True)["pack"]
    assert result[0]["status"] == "ok", result
    assert result[1]["status"] == "failed" and result[1]["error_type"] == "Terminated", result
    assert _runs(members[1][0])[0].info.status == "KILLED"


@pytest.mark.slow  # ~40 s on a shared CPU: a packed grid of 2 as a real sweep
def test_a_dora_job_of_a_packed_grid_trains_alone_and_the_sweep_says_why(tmp_path, mlflow_store):
    from tests.integration.sweeping import split_runs, sweep

    args = ["--multirun", "lora.use_dora=false,true", "hydra.sweeper.pack=2", *COMMON[:3], "train.max_steps=2"]
    result = sweep([*args, "train.eval_strategy=no", "tracking.log_adapter=false"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "2 jobs as 2 launches" in output
    assert "#1 trains alone: lora.use_dora=true: DoRA's magnitude vectors are not in the pack engine" in output
    _, children = split_runs(mlflow_store)
    assert sorted((c.data.params["lora.use_dora"], c.info.status) for c in children) == [
        ("False", "FINISHED"),
        ("True", "FINISHED"),
    ]
    dora = next(c for c in children if c.data.params["lora.use_dora"] == "True")
    assert "pack_trial" not in dora.data.tags and dora.info.run_name.endswith("-dora")


def test_a_kill_9_of_the_packs_process_keeps_the_trials_that_ended_and_fails_the_others(tmp_path, mlflow_store):
    """kill -9 of the pack's process (no result file written): the trial that had ended keeps its result (each
    trial's result is on disk as it ends), and the one still training is a FAILED job whose run ends FAILED, not
    RUNNING."""
    from pathlib import Path

    members = _short_and_long(tmp_path)
    partial = partial_path(Path(members[0][0]["output_dir"]) / RESULT_FILE)

    def short_one_ended_long_one_running() -> bool:
        long_runs = _runs(members[1][0])
        return (
            partial.is_file()
            and bool(partial.read_text())
            and bool(long_runs)
            and long_runs[0].info.status == "RUNNING"
        )

    _signal_the_pack_once(short_one_ended_long_one_running, signal.SIGKILL)
    result = run_pack_job(members, isolate=True)["pack"]
    assert result[0]["status"] == "ok" and result[0]["run_id"] == _runs(members[0][0])[0].info.run_id, result
    assert result[1]["status"] == "failed" and result[1]["error_type"] == "TrialProcessDied", result
    assert "killed by signal 9" in result[1]["message"], result
    assert [r.info.status for r in _runs(members[0][0])] == ["FINISHED"]
    assert [r.info.status for r in _runs(members[1][0])] == ["FAILED"]
