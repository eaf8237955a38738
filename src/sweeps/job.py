"""One job of a sweep, seen from the job: a fresh process, a memory check (:mod:`src.sweeps.feasibility`), and a
result (pruning: ``src.trial``).

In a multirun, ``src.train.main`` validates each job's resolved config (:func:`validated_job`: an invalid
one is a FAILED job, its run FAILED with the reason) and hands the validated config to :func:`run_job`, which
trains it with :func:`src.fit.run` (imported by name; the sweeps never import ``src.train``). By default
the job trains in a fresh process, forked from a server process that has imported the training
stack once but never touched a GPU: an out-of-memory error, a crash or a leaked CUDA context in
trial k cannot reach trial k+1, and no job pays the imports again. The result travels back as a
JSON file in the job's output directory (``job_result.json``).

What a job gives the sweeper (:mod:`src.sweeps.outcomes`):

- success: ``{"run_id": ..., "metrics": {...}}``, the final metrics of the job's MLflow run plus
  ``objective`` (the value ``run`` returned, which may be None or NaN: the sweeper decides);
- :class:`JobFailed`: the job raised; the message is ``ErrorType: message``;
- :class:`JobSkipped`: the feasibility check found the config cannot fit the GPU;
- ``optuna.TrialPruned``: the Optuna pruner stopped it. Its MLflow run ends KILLED with the tag
  ``status=PRUNED`` (KILLED, not FAILED: nothing went wrong, the sweep stopped it).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from src import console, distributed, tracking
from src.config import Config, ConfigError, literal
from src.sweeps.configs import FeasibilityConf
from src.sweeps.feasibility import check_feasibility, fit_pack
from src.sweeps.outcomes import JobFailed, JobResult, Status, quote
from src.trial import STUDY_ENV, TRIAL_ENV

RESULT_FILE = "job_result.json"
# A pack's process appends each trial's result here as it ends, so that a kill -9 of the process loses only the
# trials still training (:func:`_read_pack_result`).
PARTIAL_SUFFIX = ".partial.jsonl"
# How long a job waits for its trial process to end after passing on SIGTERM or Ctrl-C.
TRIAL_STOP_GRACE_S = 60


Train = Callable[[Config], Optional[float]]  # src.fit.run, or one pack trial's (src.packs.runtime)
# src.packs.runtime.trial_functions: a pack's (cfg, env) jobs -> one Train per trial and their shared base.
# Tests pass their own (a base that loads slowly) to run_pack_job; a sweep never does.
Trials = Callable[[list[tuple[Config, Optional[dict]]]], tuple[list[Train], Any]]


def validated_job(raw: dict, unresolved: Optional[dict[str, str]] = None) -> Config:
    """The job's config, validated for training; an invalid one (or one with ``unresolved`` values:
    :func:`src.config.resolve`) raises JobFailed, and its MLflow run ends FAILED with every problem
    (:func:`src.tracking.validated`)."""
    before = _last_run_id()
    try:
        return tracking.validated(raw, unresolved)
    except ConfigError as exc:
        run_id = _last_run_id()
        raise JobFailed(type(exc).__name__, str(exc), run_id if run_id != before else None) from exc


def run_job(cfg: Config, isolate: bool = True, feasibility: Optional[FeasibilityConf] = None) -> dict[str, Any]:
    """Train one job (:func:`src.fit.run`) and return ``{"run_id", "metrics"}``.

    ``cfg`` is the job's validated config (:func:`validated_job`). Raises JobFailed, JobSkipped or
    optuna.TrialPruned (see the module docstring).
    """
    feasibility = feasibility or FeasibilityConf()
    if isolate and multiprocessing.current_process().daemon:
        console.log.warning(
            "warning: this launcher runs jobs in daemon processes, which cannot start one: the job runs "
            "in the launcher's process (hydra.sweeper.isolate=false)"
        )
        isolate = False
    if not isolate:
        return _run(cfg, feasibility)
    result_path = Path(cfg.output_dir) / RESULT_FILE
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    sweeper = (os.getpid(), tracking.process_start(os.getpid()))
    process = _context().Process(
        target=_trial_process,
        args=(cfg, feasibility, dict(os.environ), str(result_path), sweeper),
        name="lora-sweep-job",
    )
    process.start()
    try:
        process.join()
    except BaseException:  # SIGTERM or Ctrl-C while training: stop the trial so its run ends KILLED
        _stop(process)
        raise
    try:
        return _read_result(result_path, process.exitcode)
    except JobFailed as exc:
        if exc.error_type == "TrialProcessDied":
            exc.run_id = close_lost_run(cfg, str(exc)) or exc.run_id
        raise


def close_lost_run(cfg: Config, reason: str) -> Optional[str]:
    """End FAILED the MLflow run of a trial process that died without a word (``kill -9``, the OOM killer):
    it would stay RUNNING, and its last eval could be ranked as if it had finished. Returns its id."""
    import mlflow

    runs = tracking.runs_of_output_dir(cfg, running_only=True)
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg.tracking.tracking_uri))
    tags = {"error_type": "TrialProcessDied", "error": reason[: tracking.MAX_TAG_LEN]}
    for run in runs:
        tracking.terminate(client, run.info.run_id, "FAILED", tags)
    return runs[0].info.run_id if runs else None


def _context():
    """Fork from a server that imported the training stack once (spawn where fork is unavailable)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(forkserver_preload())
    return ctx


def forkserver_preload() -> list[str]:
    """The modules the fork server imports once for every trial: none of them may start CUDA there.

    A server that starts CUDA leaves every trial it forks unable to use the GPU ("Cannot re-initialize CUDA
    in forked subprocess"). bitsandbytes starts it at import (``torch.cuda.get_device_capability``), and peft
    imports bitsandbytes, as does transformers' Trainer through peft; so with a CUDA build of torch each trial
    imports those itself (a few seconds); with a CPU build there is no CUDA to start, and the server imports
    them too. tests/integration/test_cuda_isolation.py records any CUDA start outside a trial.
    Not src.train itself: the server runs the main module as __mp_main__, and a preloaded copy would make
    that a second import of the same module.
    """
    import torch

    modules = ["torch", "transformers", "datasets", "mlflow", "optuna", "src.data"]
    if not torch.backends.cuda.is_built():
        modules += ["peft", "src.modeling", "src.training"]
    # A launcher's worker may run under its own start method (joblib's "loky"), which each forked trial sets
    # again before it starts: the server must know it.
    method_module = type(multiprocessing.get_context()).__module__
    if method_module != "multiprocessing.context":
        modules.append(method_module)
    return modules


def _stop(process) -> None:
    if process.is_alive():
        process.terminate()  # SIGTERM: tracked_run ends the MLflow run KILLED
        process.join(TRIAL_STOP_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join()


def _die_with_parent() -> None:
    """Linux: receive SIGTERM if the forking server dies (the sweep was killed), instead of running on."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _die_with_sweeper(sweeper: tuple[int, Optional[str]], interval_s: float = 1.0) -> None:
    """SIGTERM this trial once the process that launched it is gone (``kill -9`` of the sweeper).

    The kernel's death signal (:func:`_die_with_parent`) follows the fork server, which can outlive the
    sweeper; a trial must not train on to FINISHED under a dead sweep. The sweeper is known by its pid and
    start time, so a new process that reuses the pid does not count."""
    import threading

    pid, start = sweeper
    if start is None:  # not Linux: no way to tell a reused pid; the death signal is all there is
        return

    def watch() -> None:
        while tracking.process_start(pid) == start:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)  # tracked_run ends the run KILLED

    threading.Thread(target=watch, name="lora-sweep-watch", daemon=True).start()


def _trial_process(
    cfg: Config,
    feasibility: FeasibilityConf,
    env: dict[str, str],
    result_path: str,
    sweeper: tuple[int, Optional[str]],
) -> None:
    """Entry point of the fresh process: the job's environment, then _run, then the result file."""
    os.environ.clear()
    os.environ.update(env)  # the forking server's environment is not the job's (hydra.job.env_set, GPU pinning)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with_parent()
    _die_with_sweeper(sweeper)
    console.log_to_file(Path(cfg.output_dir) / "train.log")  # the parent's Hydra logging is not ours here

    try:
        result = JobResult(Status.OK, **_run(cfg, feasibility))
    except BaseException as exc:  # noqa: B036  the trial process reports everything, Ctrl-C included
        result = JobResult.of_exception(exc, traceback.format_exc())
    Path(result_path).write_text(json.dumps(result.to_json(), indent=2, default=str))
    sys.exit(0 if result.status is Status.OK else 1)


def _read_result(path: Path, exitcode: Optional[int]) -> dict[str, Any]:
    if not path.is_file():
        how = f"was killed by signal {-exitcode}" if exitcode and exitcode < 0 else f"exited with code {exitcode}"
        hint = " (out of host memory?)" if exitcode == -signal.SIGKILL else ""
        raise JobFailed("TrialProcessDied", f"the trial process {how}{hint} before writing a result")
    result = JobResult.from_json(json.loads(path.read_text()))
    if result.traceback:
        console.log.error(result.traceback)
    return result.raise_unless_ok()


def _run(cfg: Config, feasibility: FeasibilityConf) -> dict[str, Any]:
    """Check feasibility, train (:func:`src.fit.run`), and gather the run's id and final metrics."""
    from src.fit import run

    cfg, note = check_feasibility(cfg, feasibility)
    if cfg.train.nproc_per_node > 1 and not distributed.under_torchrun():
        return _run_ddp(cfg, note)
    return _train_and_collect(cfg, run, note, None)


def write_ddp_config(cfg: Config, output_dir: Path) -> Path:
    """The job's resolved config as the config file its DDP ranks compose: escaped, so that Hydra resolving it
    again reads every value as it is (:func:`src.config.literal`)."""
    from omegaconf import OmegaConf

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "ddp_config.yaml"
    OmegaConf.save(OmegaConf.create(literal(cfg.resolved())), path)
    return path


def _run_ddp(cfg: Config, feasibility_note: Optional[str]) -> dict[str, Any]:
    """A job with ``train.nproc_per_node`` > 1: src.train under torchrun on the job's GPUs, from the job's
    resolved config; rank 0's MLflow run (found by its ``output_dir`` tag) is the job's run."""
    import mlflow
    import optuna

    output_dir = Path(cfg.output_dir).resolve()
    write_ddp_config(cfg, output_dir)
    argv = [
        f"--config-path={output_dir}",
        "--config-name=ddp_config",
        f"hydra.run.dir={quote(str(output_dir))}",
        "hydra.output_subdir=null",
    ]
    code = distributed.relaunch(cfg.train.nproc_per_node, argv)
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.tracking.tracking_uri))
    runs = tracking.runs_of_output_dir(cfg)
    if not runs:
        raise JobFailed("TrialProcessDied", f"the DDP ranks exited with code {code} before rank 0 started its run")
    run_ = runs[0]
    run_id, tags = run_.info.run_id, run_.data.tags
    _tag_run(run_id, feasibility_note)
    if tags.get("status") == "PRUNED":
        mlflow.MlflowClient().set_terminated(run_id, "KILLED")
        raise optuna.TrialPruned(tags.get("error", "pruned"))
    if code != 0 or run_.info.status != "FINISHED":
        error = tags.get("error", f"the DDP ranks exited with {code}")
        raise JobFailed(tags.get("error_type", "DDPFailed"), error, run_id)
    return {"run_id": run_id, "metrics": dict(run_.data.metrics)}


def run_pack_job(
    members: list[tuple[dict, Optional[dict]]],
    isolate: bool = True,
    feasibility: Optional[FeasibilityConf] = None,
    trials: Optional[Trials] = None,
    slots: Optional[int] = None,
) -> dict[str, Any]:
    """Train a pack of jobs (``hydra.sweeper.pack``; their resolved configs and Optuna environments) on one base,
    in one fresh process, at most ``slots`` at once (None: all): as one ends, the next takes its slot, on the base
    loaded once. Returns ``{"pack": [one result per job], "packs": [what each pack trained]}``: each result a
    :class:`~src.sweeps.outcomes.JobResult` as JSON (:meth:`~src.sweeps.outcomes.JobResult.to_json`), a job that
    fails, is pruned or skipped being that job's outcome alone; each pack's :meth:`src.packs.model.Pack.stats`
    (one a base load: two where a pack too big for the GPU was split). A job whose config does not validate fails
    alone, before the pack starts."""
    feasibility = feasibility or FeasibilityConf()
    results: list[Optional[dict[str, Any]]] = [None] * len(members)
    valid, packs = [], []
    for i, (raw, env) in enumerate(members):
        try:
            valid.append((i, validated_job(raw), env))
        except JobFailed as exc:
            results[i] = _failure(exc)
    if valid and isolate and not multiprocessing.current_process().daemon:
        result_path = Path(valid[0][1].output_dir) / RESULT_FILE
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        partial_path(result_path).unlink(missing_ok=True)
        sweeper = (os.getpid(), tracking.process_start(os.getpid()))
        process = _context().Process(
            target=_pack_process,
            args=(valid, feasibility, trials, slots, dict(os.environ), str(result_path), sweeper),
            name="lora-sweep-pack",
        )
        process.start()
        try:
            process.join()
        except BaseException:
            _stop(process)
            if not result_path.is_file():  # killed after the grace (a base still loading): close its runs
                _read_pack_result(result_path, process.exitcode, valid)
            raise
        packed, packs = _read_pack_result(result_path, process.exitcode, valid)
    elif valid:
        packed = _run_pack(valid, feasibility, trials, slots, on_pack=packs.append)
    else:
        packed = []
    for (i, *_), result in zip(valid, packed):
        results[i] = result
    return {"pack": results, "packs": packs}


def _failure(exc: BaseException) -> dict[str, Any]:
    return JobResult.of_exception(exc).to_json()


def _pack_process(valid, feasibility, trials, slots, env, result_path, sweeper) -> None:
    """Entry point of a pack's fresh process: the jobs' trials in threads, then one result file for all."""
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with_parent()
    _die_with_sweeper(sweeper)
    console.log_to_file(Path(valid[0][1].output_dir) / "train.log")
    partial = partial_path(Path(result_path))
    packs: list[dict[str, Any]] = []
    try:
        results = _run_pack(valid, feasibility, trials, slots, on_result=_appender(partial), on_pack=packs.append)
    except tracking.Terminated as exc:  # SIGTERM: the trials that finished before it stay finished
        results = getattr(exc, "pack_results", None) or [_failure(exc)] * len(valid)
    except BaseException as exc:  # noqa: B036  the pack process reports everything; the trials that ended, as they did
        ended = _ended_results(partial)
        results = [ended.get(i) or _failure(exc) for i in range(len(valid))]
    # Written whole or not at all: a process killed while writing leaves no half file for the sweeper to trip on.
    scratch = Path(result_path).with_name(Path(result_path).name + ".tmp")
    scratch.write_text(json.dumps({"results": results, "packs": packs}, indent=2, default=str))
    os.replace(scratch, result_path)
    sys.exit(0)


def partial_path(result_path: Path) -> Path:
    return result_path.with_name(result_path.name + PARTIAL_SUFFIX)


def _appender(path: Path) -> Callable[[int, dict[str, Any]], None]:
    """``on_result`` for :func:`_run_pack` in a pack's process: each trial's result appended to ``path`` as one
    JSON line, written through to disk before the trial's thread goes on."""
    import threading

    lock = threading.Lock()

    def append(index: int, result: dict[str, Any]) -> None:
        line = json.dumps({"index": index, "result": result}, default=str) + "\n"
        try:
            with lock, open(path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # the result file at the end still carries it; only a kill -9 would lose it
            console.say(f"note: could not record trial {index}'s result in {path}: {exc}")

    return append


def _ended_results(partial: Path) -> dict[int, dict[str, Any]]:
    """The results the pack's trials appended as they ended (:func:`_appender`), by trial index."""
    ended: dict[int, dict[str, Any]] = {}
    if partial.is_file():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the process died
                continue
            ended[entry["index"]] = JobResult.from_json(entry["result"]).to_json()
    return ended


def _read_pack_result(path: Path, exitcode: Optional[int], valid) -> tuple[list[dict[str, Any]], list[dict]]:
    """The pack's results and its packs' stats from its process's result file; where the process died before
    writing it (``kill -9``, the OOM killer), the results its trials that ended had appended (:func:`_appender`),
    and FAILED for the others, whose runs are closed FAILED (never left RUNNING), and no stats."""
    if path.is_file():
        written = json.loads(path.read_text())
        return [JobResult.from_json(result).to_json() for result in written["results"]], written["packs"]
    ended = _ended_results(partial_path(path))
    how = f"was killed by signal {-exitcode}" if exitcode and exitcode < 0 else f"exited with code {exitcode}"
    reason = f"the pack's process {how} before its trial ended"
    results = []
    for i, (_, cfg, _) in enumerate(valid):
        if i not in ended:
            run_id = close_lost_run(cfg, reason)
            ended[i] = JobResult(Status.FAILED, run_id, error_type="TrialProcessDied", message=reason).to_json()
        results.append(ended[i])
    return results, []


def _run_pack(
    valid,
    feasibility: FeasibilityConf,
    trials: Optional[Trials] = None,
    slots: Optional[int] = None,
    on_result: Optional[Callable[[int, dict[str, Any]], None]] = None,
    on_pack: Optional[Callable[[dict[str, Any]], None]] = None,
) -> list[dict[str, Any]]:
    """Each trial of the pack in its own thread, at most ``slots`` at once, on one shared base; SIGTERM stops them
    all (their runs end KILLED). Memory: the feasibility check of the first job sets the budget the pack plans
    within. ``on_result(i, result)`` is called as trial ``i`` ends; ``on_pack(stats)`` once the pack is done
    (:meth:`src.packs.model.Pack.stats`; not where its base never loaded)."""
    groups = fit_pack([cfg for _, cfg, _ in valid], feasibility, slots)
    if len(groups) > 1:
        return _run_split_pack(valid, groups, feasibility, trials, slots, on_result, on_pack)
    checked, note = check_feasibility(valid[0][1], feasibility)
    budget = checked.train.memory_budget_gb
    jobs = [
        (cfg if cfg.train.memory_budget_gb == budget else cfg.with_train(memory_budget_gb=budget), env)
        for _, cfg, env in valid
    ]
    from src.packs.runtime import trial_functions

    trains, shared = (trials or trial_functions)(jobs, slots)
    results = [{}] * len(jobs)

    def trial(index: int) -> None:
        cfg, env = jobs[index]
        try:
            results[index] = {"status": "ok", **_train_and_collect(cfg, trains[index], note, env)}
        except BaseException as exc:  # noqa: B036  one trial's end is its own
            results[index] = _failure(exc)
        finally:
            shared.leave(index)
        if on_result is not None:
            on_result(index, results[index])

    try:
        _run_threads(trial, len(jobs), shared, results, slots)
    finally:  # a stopped pack trained what it trained
        summary, stats = shared.summary(), shared.stats()
        if summary:
            console.say(summary)
        if stats is not None and on_pack is not None:
            on_pack(stats)
    return results


def _run_split_pack(
    valid,
    groups: list[list[int]],
    feasibility: FeasibilityConf,
    trials,
    slots: Optional[int] = None,
    on_result=None,
    on_pack=None,
) -> list[dict[str, Any]]:
    """A pack too big for the GPU, as the consecutive packs of ``groups`` (:func:`fit_pack`), one after another."""
    sizes = ", ".join(str(len(g)) for g in groups)
    console.say(f"feasibility: the pack of {len(valid)} does not fit; split into packs of {sizes}")
    results: list[dict[str, Any]] = []
    for group in groups:
        try:
            reported = None if on_result is None else (lambda i, result, group=group: on_result(group[i], result))
            results += _run_pack([valid[i] for i in group], feasibility, trials, slots, reported, on_pack)
        except tracking.Terminated as exc:  # the parts not started end as the stop
            done = results + getattr(exc, "pack_results", [_failure(exc)] * len(group))
            exc.pack_results = done + [_failure(exc)] * (len(valid) - len(done))
            raise
    return results


def _run_threads(trial: Callable[[int], None], count: int, shared, results: list, slots: Optional[int] = None) -> None:
    """``trial(i)`` for each trial in a thread of its own, at most ``slots`` at a time (None: all): as one ends the
    next starts. A SIGTERM (in the main thread) or Ctrl-C stops them all (:meth:`src.packs.runtime.SharedBase.stop`)
    and is raised once they end, with ``results`` as they are (a trial never started keeps its empty result)."""
    import threading

    free = threading.Semaphore(slots or count)

    def held(index: int) -> None:
        try:
            if shared.stopping is None:
                trial(index)
            else:  # a stop came before its slot freed: it ends as the stop, never started
                results[index] = _failure(shared.stopping)
        finally:
            free.release()

    threads = [threading.Thread(target=held, args=(i,), name=f"lora-pack-t{i}") for i in range(count)]
    previous = None
    terminated: list[BaseException] = []
    if threading.current_thread() is threading.main_thread():

        def terminate(signum, frame):
            terminated.append(tracking.Terminated(f"received signal {signal.Signals(signum).name}"))
            shared.stop(terminated[0])

        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        for thread in threads:
            while not free.acquire(timeout=0.5):  # the main thread stays free to take SIGTERM
                pass
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)  # the main thread stays free to take SIGTERM
    except KeyboardInterrupt as exc:
        shared.stop(exc)
        for thread in threads:
            thread.join()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if terminated:  # the trials' runs ended KILLED; the signal goes on to the sweeper, as a job alone's does
        terminated[0].pack_results = results  # what the pack's process still reports (_pack_process)
        raise terminated[0]


def _train_and_collect(cfg: Config, train: Train, note: Optional[str], env) -> dict[str, Any]:
    """Train one job and gather its run's id and final metrics (a pack trial: in its own thread, whose MLflow run
    is its own); raises JobFailed or optuna.TrialPruned with the run's id."""
    import mlflow
    import optuna

    before = _last_run_id()
    try:
        value = train(cfg)
    except BaseException as exc:
        run_id = _last_run_id()
        run_id = run_id if run_id != before else None
        if run_id and isinstance(exc, optuna.TrialPruned):
            client = mlflow.MlflowClient()
            client.set_tag(run_id, "status", "PRUNED")
            client.set_terminated(run_id, "KILLED")
        if run_id:
            _tag_run(run_id, note, env)
        if isinstance(exc, (optuna.TrialPruned, KeyboardInterrupt)):
            raise
        raise JobFailed(type(exc).__name__, str(exc), run_id) from exc
    run_id = _last_run_id()
    _tag_run(run_id, note, env)
    metrics = dict(mlflow.MlflowClient().get_run(run_id).data.metrics)
    metrics["objective"] = value
    return {"run_id": run_id, "metrics": metrics}


def _last_run_id() -> Optional[str]:
    import mlflow

    try:
        last = mlflow.last_active_run()
    except mlflow.exceptions.MlflowException:  # its store is no longer the one in use
        return None
    return last.info.run_id if last else None


def _tag_run(run_id: str, feasibility_note: Optional[str], env: Optional[dict] = None) -> None:
    import mlflow

    env = os.environ if env is None else env
    tags = {}
    if env.get(TRIAL_ENV):
        tags.update(optuna_study=env.get(STUDY_ENV, ""), optuna_trial=env[TRIAL_ENV])
    if feasibility_note:
        tags["feasibility"] = feasibility_note
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
