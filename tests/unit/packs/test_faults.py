"""Packed trials when things go wrong (``hydra.sweeper.pack``): a trial that fails before the base loads, a stop
while it loads, a base that cannot load; each trial's run must end, none may stay RUNNING or wait forever."""

from __future__ import annotations

import os
import signal
import threading
import time

import mlflow
import pytest

from src import tracking
from src.config import validate
from src.packs.runtime import trial_functions
from src.sweeps.job import run_pack_job
from tests.conftest import compose_config
from tests.unit.packs.test_packs import TRIALS, _raw

HANG_S = 120  # a pack of 2 tiny trials takes ~10 s on CPU; past this it waits for a trial that is gone


def _runs(raw: dict) -> list:
    """The runs of a job's output directory, newest first."""
    return tracking.runs_of_output_dir(validate(raw))


def _run_pack_in_thread(members, pack_train, isolate=False) -> list:
    """run_pack_job in a thread, so that a pack that waits forever fails the test instead of hanging it."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(run_pack_job(members, isolate=isolate, trials=pack_train)))
    worker.daemon = True
    worker.start()
    worker.join(HANG_S)
    assert not worker.is_alive(), "the pack hangs: its live trials wait in Pack.step for a trial that has ended"
    return out[0]["pack"]


def test_a_trial_that_fails_before_the_base_loads_does_not_hold_up_the_others(tmp_path, mlflow_store):
    """Trial 1's output directory cannot be made (a file is in the way): it fails at once, before it asks for the
    base, while trial 0 loads it. Trial 0 must train on without it, not wait in Pack.step for its steps."""

    good = _raw(tmp_path, "good", TRIALS[0])
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    bad = _raw(tmp_path, "bad", TRIALS[1])
    bad["output_dir"] = str(blocked / "out")
    result = _run_pack_in_thread([(good, None), (bad, None)], trial_functions)
    assert result[0]["status"] == "ok", result
    assert result[1]["status"] == "failed", result
    assert mlflow.get_run(result[0]["run_id"]).info.status == "FINISHED"


def _stopping_while_the_base_loads(jobs, slots=None):
    """trial_functions, its base's load preceded by a stop (SIGTERM of the pack's process arriving while the base
    loads, which on a GPU takes minutes)."""
    trains, shared = trial_functions(jobs, slots)
    load = shared.load

    def load_after_a_stop(index):
        shared.stop(tracking.Terminated("received signal SIGTERM"))
        return load(index)

    shared.load = load_after_a_stop
    return trains, shared


def test_a_stop_while_the_base_loads_stops_every_trial(tmp_path, mlflow_store):
    members = [(_raw(tmp_path, f"t{i}", TRIALS[i]), None) for i in range(2)]
    result = _run_pack_in_thread(members, _stopping_while_the_base_loads)
    assert [r["status"] for r in result] == ["failed", "failed"], result
    assert {r["error_type"] for r in result} == {"Terminated"}, result
    runs = _runs(members[0][0]) + _runs(members[1][0])
    assert [r.info.status for r in runs] == ["KILLED", "KILLED"]
    assert all("train_loss" not in r.data.metrics for r in runs)  # stopped before any step


def test_sigterm_of_a_pack_in_the_sweepers_process_stops_the_sweep(tmp_path, mlflow_store):
    """hydra.sweeper.isolate=false: the pack trains in the sweeper's process. A SIGTERM there ends every trial's
    run KILLED and then reaches the sweeper (raised, as for a job alone), which must not go on to its next job."""

    shared_of = []

    def pack_train(jobs, slots=None):
        trains, shared = trial_functions(jobs, slots)
        shared_of.append(shared)
        return trains, shared

    def kill_once_stepping():
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            pack = shared_of[0].pack if shared_of else None
            if pack is not None and pack.steps >= 1:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    members = [(_raw(tmp_path, f"t{i}", [*TRIALS[i], "train.max_steps=200"]), None) for i in range(2)]
    threading.Thread(target=kill_once_stepping, daemon=True).start()
    with pytest.raises(tracking.Terminated):
        run_pack_job(members, isolate=False, trials=pack_train)
    runs = _runs(members[0][0]) + _runs(members[1][0])
    assert [r.info.status for r in runs] == ["KILLED", "KILLED"]


def test_grouping_says_why_a_job_trains_alone():
    """Jobs of other data never share a pack; a job that cannot be packed is a unit alone, and the sweep is told
    why (else ``pack=4`` that runs one job at a time looks like a bug)."""
    from src.sweeps.grouping import group

    def raw(overrides):
        return {**compose_config(overrides), "output_dir": "unused"}

    raws = [
        raw(["data=instructions"]),
        raw(["data=instructions", "lora.bias=all"]),
        raw(["data=instructions", "lora.r=16"]),
        raw(["data=instructions", "data.subsample=10"]),
        raw(["data=instructions", "train.fast_path=false"]),
        None,
    ]
    said: dict[int, str] = {}
    assert group(raws, 4, say=said.__setitem__) == [[0, 2], [1], [3], [4], [5]]
    assert sorted(said) == [1, 4, 5]
    assert "lora.bias=all" in said[1] and "fast_path" in said[4] and "compose" in said[5]
    said.clear()
    assert group(raws, 1, say=said.__setitem__) == [[i] for i in range(6)]
    assert said == {}  # pack=1: every job is alone anyway


def slow_loading_pack(jobs, slots=None):
    """trial_functions whose base takes 30 s to load (a 7B model from disk): a trial's thread cannot be interrupted
    there, so a SIGTERM waits for it. Module level: the pack's process gets it by name."""
    trains, shared = trial_functions(jobs, slots)
    load = shared.load

    def slow_load(index):
        time.sleep(30)
        return load(index)

    shared.load = slow_load
    return trains, shared


def test_a_pack_killed_after_its_stop_grace_leaves_no_run_running(tmp_path, mlflow_store, monkeypatch):
    """SIGTERM of the sweeper while its pack's base loads: the pack's process cannot stop within the grace and is
    killed; every trial's run must still end (FAILED, with the reason), not stay RUNNING."""
    from src.sweeps import job
    from src.sweeps.record import install_sigterm_handler, restore_sigterm_handler

    monkeypatch.setattr(job, "TRIAL_STOP_GRACE_S", 2)
    members = [(_raw(tmp_path, f"t{i}", TRIALS[i]), None) for i in range(2)]

    def kill_once_both_runs_started():
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if all(_runs(raw) for raw, _ in members):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.2)

    threading.Thread(target=kill_once_both_runs_started, daemon=True).start()
    previous = install_sigterm_handler()  # as the sweeper does: SIGTERM raises
    try:
        with pytest.raises(tracking.Terminated):
            run_pack_job(members, isolate=True, trials=slow_loading_pack)
    finally:
        restore_sigterm_handler(previous)
    runs = [r for raw, _ in members for r in _runs(raw)]
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"], [r.data.tags.get("error") for r in runs]
    assert all(r.data.tags["error_type"] == "TrialProcessDied" for r in runs)


def test_the_trials_tokenizers_do_not_race(tmp_path):
    """A fast tokenizer's padding and truncation are state that each call sets: one trial generating its samples
    (``padding=True``) while another tokenizes its rows (no padding) made the first fail ("Unable to create tensor,
    you should probably activate ... padding") when they shared one. Each trial has its own."""
    from src import tracking as tracking_mod

    raws = [_raw(tmp_path, f"t{i}", TRIALS[i]) for i in range(2)]
    _, shared = trial_functions([(tracking_mod.validated(raw), None) for raw in raws])
    generating, encoding = shared.load(0)[0], shared.load(1)[0]
    errors: list[str] = []
    until = time.monotonic() + 3

    def generate_prompts():
        while time.monotonic() < until:
            try:
                generating(["a prompt", "a somewhat longer prompt than that"], return_tensors="pt", padding=True)
            except ValueError as exc:
                errors.append(str(exc))

    def tokenize_rows():
        while time.monotonic() < until:
            encoding(["some row text " * 20] * 8, truncation=True, max_length=64)

    threads = [threading.Thread(target=generate_prompts), threading.Thread(target=tokenize_rows)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [], errors[:1]
