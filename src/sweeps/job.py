"""One job of a sweep, seen from the job: a fresh process, a memory check, and a result (pruning: ``trial``).

In a multirun, ``src.train.main`` validates each job's resolved config (:func:`validated_job`: an invalid
one is a FAILED job, its run FAILED with the reason) and hands it to :func:`run_job`, with the training function
(:func:`src.fit.run`, imported by name; the sweeps never import ``src.train``). By default
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
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from src import console, distributed, tracking
from src.config import Config, ConfigError, literal
from src.plan import PlanError, plan, plans_own_micro_batches
from src.sweeps.configs import FeasibilityConf
from src.sweeps.outcomes import JobFailed, JobSkipped, quote
from src.trial import STUDY_ENV, TRIAL_ENV

RESULT_FILE = "job_result.json"
# How long a job waits for its trial process to end after passing on SIGTERM or Ctrl-C.
STOP_GRACE_S = 60


Train = Callable[[dict, Config], Optional[float]]  # src.fit.run, or one pack trial's (src.packs.runtime)
# src.packs.runtime.trial_functions: a pack's (raw, cfg, env) jobs -> one Train per trial and their shared base.
# Tests pass their own (a base that loads slowly) to run_pack_job; a sweep never does.
Trials = Callable[[list[tuple[dict, Config, Optional[dict]]]], tuple[list[Train], Any]]


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


def run_job(
    raw: dict, cfg: Config, isolate: bool = True, feasibility: Optional[FeasibilityConf] = None
) -> dict[str, Any]:
    """Train one job (:func:`src.fit.run`) and return ``{"run_id", "metrics"}``.

    ``raw`` is the job's resolved config as a plain dict (the run logs it as params), ``cfg`` the same validated
    (:func:`validated_job`). Raises JobFailed, JobSkipped or optuna.TrialPruned (see the module docstring).
    """
    feasibility = feasibility or FeasibilityConf()
    if isolate and multiprocessing.current_process().daemon:
        print(
            "warning: this launcher runs jobs in daemon processes, which cannot start one: the job runs "
            "in the launcher's process (hydra.sweeper.isolate=false)",
            file=sys.stderr,
        )
        isolate = False
    if not isolate:
        return _run(raw, cfg, feasibility)
    result_path = Path(raw["output_dir"]) / RESULT_FILE
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    sweeper = (os.getpid(), tracking.process_start(os.getpid()))
    process = _context().Process(
        target=_trial_process,
        args=(raw, cfg, feasibility, dict(os.environ), str(result_path), sweeper),
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
            exc.run_id = close_lost_run(raw, cfg, str(exc)) or exc.run_id
        raise


def close_lost_run(raw: dict, cfg: Config, reason: str) -> Optional[str]:
    """End FAILED the MLflow run of a trial process that died without a word (``kill -9``, the OOM killer):
    it would stay RUNNING, and its last eval could be ranked as if it had finished. Returns its id."""
    import mlflow

    runs = tracking.runs_of_output_dir(raw, running_only=True)
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
        process.join(STOP_GRACE_S)
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
    raw: dict,
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
    import optuna

    console.log_to_file(Path(cfg.output_dir) / "train.log")  # the parent's Hydra logging is not ours here

    try:
        result: dict[str, Any] = {"status": "ok", **_run(raw, cfg, feasibility)}
    except optuna.TrialPruned as exc:
        result = {"status": "pruned", "message": str(exc)}
    except JobSkipped as exc:
        result = {"status": "skipped", "message": str(exc)}
    except JobFailed as exc:
        result = {
            "status": "failed",
            "error_type": exc.error_type,
            "message": exc.message,
            "run_id": exc.run_id,
            "traceback": traceback.format_exc(),
        }
    except BaseException as exc:  # noqa: B036  the trial process reports everything, Ctrl-C included
        result = {
            "status": "failed",
            "error_type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
    Path(result_path).write_text(json.dumps(result, indent=2, default=str))
    sys.exit(0 if result["status"] == "ok" else 1)


def _read_result(path: Path, exitcode: Optional[int]) -> dict[str, Any]:
    if not path.is_file():
        how = f"was killed by signal {-exitcode}" if exitcode and exitcode < 0 else f"exited with code {exitcode}"
        hint = " (out of host memory?)" if exitcode == -signal.SIGKILL else ""
        raise JobFailed("TrialProcessDied", f"the trial process {how}{hint} before writing a result")
    result = json.loads(path.read_text())
    status = result.pop("status")
    if status == "ok":
        return result
    if status == "pruned":
        import optuna

        raise optuna.TrialPruned(result["message"])
    if status == "skipped":
        raise JobSkipped(result["message"])
    print(result.get("traceback", ""), file=sys.stderr)
    raise JobFailed(result["error_type"], result["message"], result.get("run_id"))


def _run(raw: dict, cfg: Config, feasibility: FeasibilityConf) -> dict[str, Any]:
    """Check feasibility, train (:func:`src.fit.run`), and gather the run's id and final metrics."""
    from src.fit import run
    raw, cfg, note = check_feasibility(raw, cfg, feasibility)
    if cfg.train.nproc_per_node > 1 and not distributed.under_torchrun():
        return _run_ddp(raw, cfg, note)
    return _train_and_collect(raw, cfg, run, note, None)


def write_ddp_config(raw: dict, output_dir: Path) -> Path:
    """The job's resolved config as the config file its DDP ranks compose: escaped, so that Hydra resolving it
    again reads every value as it is (:func:`src.config.literal`)."""
    from omegaconf import OmegaConf

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "ddp_config.yaml"
    OmegaConf.save(OmegaConf.create(literal(raw)), path)
    return path


def _run_ddp(raw: dict, cfg: Config, feasibility_note: Optional[str]) -> dict[str, Any]:
    """A job with ``train.nproc_per_node`` > 1: src.train under torchrun on the job's GPUs, from the job's
    resolved config; rank 0's MLflow run (found by its ``output_dir`` tag) is the job's run."""
    import mlflow
    import optuna

    output_dir = Path(cfg.output_dir).resolve()
    write_ddp_config(raw, output_dir)
    argv = [
        f"--config-path={output_dir}",
        "--config-name=ddp_config",
        f"hydra.run.dir={quote(str(output_dir))}",
        "hydra.output_subdir=null",
    ]
    code = distributed.relaunch(cfg.train.nproc_per_node, argv)
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.tracking.tracking_uri))
    runs = tracking.runs_of_output_dir(raw)
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
) -> dict[str, Any]:
    """Train a pack of jobs (``hydra.sweeper.pack``; their resolved configs and Optuna environments) on one base,
    in one fresh process; ``{"pack": [one result per job]}``, each ``{"status": "ok", "run_id", "metrics"}`` or
    ``{"status": "failed" | "pruned" | "skipped", ...}``: a job that fails, is pruned or skipped is that job's
    outcome alone. A job whose config does not validate fails alone, before the pack starts."""
    feasibility = feasibility or FeasibilityConf()
    results: list[Optional[dict[str, Any]]] = [None] * len(members)
    valid = []
    for i, (raw, env) in enumerate(members):
        try:
            valid.append((i, raw, validated_job(raw), env))
        except JobFailed as exc:
            results[i] = _failure(exc)
    if valid and isolate and not multiprocessing.current_process().daemon:
        first = valid[0][1]
        result_path = Path(first["output_dir"]) / RESULT_FILE
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        sweeper = (os.getpid(), tracking.process_start(os.getpid()))
        process = _context().Process(
            target=_pack_process,
            args=(valid, feasibility, trials, dict(os.environ), str(result_path), sweeper),
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
        packed = _read_pack_result(result_path, process.exitcode, valid)
    elif valid:
        packed = _run_pack(valid, feasibility, trials)
    else:
        packed = []
    for (i, *_), result in zip(valid, packed):
        results[i] = result
    return {"pack": results}


def _failure(exc: BaseException) -> dict[str, Any]:
    import optuna

    if isinstance(exc, optuna.TrialPruned):
        return {"status": "pruned", "message": str(exc)}
    if isinstance(exc, JobSkipped):
        return {"status": "skipped", "message": str(exc)}
    if isinstance(exc, JobFailed):
        return {"status": "failed", "error_type": exc.error_type, "message": exc.message, "run_id": exc.run_id}
    return {"status": "failed", "error_type": type(exc).__name__, "message": str(exc), "run_id": None}


def _pack_process(valid, feasibility, trials, env, result_path, sweeper) -> None:
    """Entry point of a pack's fresh process: the jobs' trials in threads, then one result file for all."""
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with_parent()
    _die_with_sweeper(sweeper)
    console.log_to_file(Path(valid[0][2].output_dir) / "train.log")
    try:
        results = _run_pack(valid, feasibility, trials)
    except tracking.Terminated as exc:  # SIGTERM: the trials that finished before it stay finished
        results = getattr(exc, "pack_results", None) or [_failure(exc)] * len(valid)
    except BaseException as exc:  # noqa: B036  the pack process reports everything
        results = [_failure(exc)] * len(valid)
    Path(result_path).write_text(json.dumps(results, indent=2, default=str))
    sys.exit(0)


def _read_pack_result(path: Path, exitcode: Optional[int], valid) -> list[dict[str, Any]]:
    if path.is_file():
        return json.loads(path.read_text())
    how = f"was killed by signal {-exitcode}" if exitcode and exitcode < 0 else f"exited with code {exitcode}"
    reason = f"the pack's process {how} before writing a result"
    results = []
    for _, raw, cfg, _ in valid:
        run_id = close_lost_run(raw, cfg, reason)
        results.append({"status": "failed", "error_type": "TrialProcessDied", "message": reason, "run_id": run_id})
    return results


def _run_pack(valid, feasibility: FeasibilityConf, trials: Optional[Trials] = None) -> list[dict[str, Any]]:
    """Each trial of the pack in its own thread, on one shared base; SIGTERM stops them all (their runs end
    KILLED). Memory: the feasibility check of the first job sets the budget the pack plans within."""
    import threading

    groups = fit_pack([cfg for _, _, cfg, _ in valid], feasibility)
    if len(groups) > 1:
        sizes = ", ".join(str(len(g)) for g in groups)
        print(f"feasibility: the pack of {len(valid)} does not fit; split into packs of {sizes}", file=sys.stderr)
        results: list[dict[str, Any]] = []
        for group in groups:
            try:
                results += _run_pack([valid[i] for i in group], feasibility, trials)
            except tracking.Terminated as exc:  # the parts not started end as the stop
                done = results + getattr(exc, "pack_results", [_failure(exc)] * len(group))
                exc.pack_results = done + [_failure(exc)] * (len(valid) - len(done))
                raise
        return results
    first_raw, first_cfg = valid[0][1], valid[0][2]
    _, checked, note = check_feasibility(first_raw, first_cfg, feasibility)
    budget = checked.train.memory_budget_gb
    jobs = []
    for _, raw, cfg, env in valid:
        if budget != cfg.train.memory_budget_gb:
            raw = {**raw, "train": {**raw["train"], "memory_budget_gb": budget}}
            cfg = replace(cfg, train=replace(cfg.train, memory_budget_gb=budget))
        jobs.append((raw, cfg, env))
    from src.packs.runtime import trial_functions

    trains, shared = (trials or trial_functions)(jobs)
    results = [{}] * len(jobs)

    def trial(index: int) -> None:
        raw, cfg, env = jobs[index]
        try:
            results[index] = {"status": "ok", **_train_and_collect(raw, cfg, trains[index], note, env)}
        except BaseException as exc:  # noqa: B036  one trial's end is its own
            results[index] = _failure(exc)
        finally:
            shared.leave(index)

    threads = [threading.Thread(target=trial, args=(i,), name=f"lora-pack-t{i}") for i in range(len(jobs))]
    previous = None
    terminated: list[BaseException] = []
    if threading.current_thread() is threading.main_thread():

        def terminate(signum, frame):
            terminated.append(tracking.Terminated(f"received signal {signal.Signals(signum).name}"))
            shared.stop(terminated[0])

        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        for thread in threads:
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
    return results


def fit_pack(cfgs: list[Config], feasibility: FeasibilityConf) -> list[list[int]]:
    """The pack's jobs (by index) as consecutive packs that each fit the GPU's free memory at their least (one example
    per micro-batch, every layer checkpointed: ``src.plan``'s pack estimate, the base once); all as one where no GPU
    is measured, the check is off, or the plan cannot be made. A job that does not fit even alone is a pack of one
    (its run then reports the memory error)."""
    from src.plan import pack_estimate_gb

    available = feasibility.available_gpu_mem_gb if feasibility.mode != "off" else None
    if available is None and feasibility.mode != "off":
        available = free_gpu_mem_gb()
    if available is None or len(cfgs) < 2:
        return [list(range(len(cfgs)))]
    try:
        least = [
            plan(replace(c, train=replace(c.train, per_device_train_batch_size=1, activation_checkpointing=True)))
            for c in cfgs
        ]
    except PlanError as exc:
        print(f"warning: feasibility check of the pack skipped: {exc}", file=sys.stderr)
        return [list(range(len(cfgs)))]
    groups: list[list[int]] = [[]]
    for i, result in enumerate(least):
        trial = [least[j]["est_mem_breakdown_gb"] for j in groups[-1]] + [result["est_mem_breakdown_gb"]]
        if groups[-1] and pack_estimate_gb(trial) > available:
            groups.append([])
        groups[-1].append(i)
    return groups


def _train_and_collect(raw: dict, cfg: Config, train: Train, note: Optional[str], env) -> dict[str, Any]:
    """Train one job and gather its run's id and final metrics (a pack trial: in its own thread, whose MLflow run
    is its own); raises JobFailed or optuna.TrialPruned with the run's id."""
    import mlflow
    import optuna

    before = _last_run_id()
    try:
        value = train(raw, cfg)
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


def fit_micro_batch(
    micro_batch: int, grad_accum: int, available_gb: float, estimate_gb: Callable[[int], float], shrink: bool
) -> tuple[int, int]:
    """The largest micro-batch (halving from ``micro_batch``) whose estimate fits ``available_gb``.

    Gradient accumulation grows so the effective batch stays at least ``micro_batch * grad_accum``.
    Raises JobSkipped when it does not fit, or would only fit smaller and ``shrink`` is false.
    """
    need = estimate_gb(micro_batch)
    if need <= available_gb:
        return micro_batch, grad_accum
    if not shrink:
        raise JobSkipped(f"needs ~{need:.2f} GiB of GPU memory, {available_gb:.2f} GiB free")
    effective = micro_batch * grad_accum
    while micro_batch > 1:
        micro_batch //= 2
        if estimate_gb(micro_batch) <= available_gb:
            return micro_batch, -(-effective // micro_batch)
    raise JobSkipped(
        f"needs ~{need:.2f} GiB of GPU memory ({estimate_gb(1):.2f} GiB at micro-batch 1), {available_gb:.2f} GiB free"
    )


def free_gpu_mem_gb() -> Optional[float]:
    """Free memory of this process's GPU in GiB, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return free / 2**30


def check_feasibility(raw: dict, cfg: Config, feasibility: FeasibilityConf) -> tuple[dict, Config, Optional[str]]:
    """Return the config to run, as a dict and validated (with a smaller micro-batch if needed), and a note
    saying what changed.

    Skipped on CPU unless ``available_gpu_mem_gb`` is given; a model whose config.json src.plan cannot read
    is run as is (run reports its own errors).
    """
    if feasibility.mode == "off":
        return raw, cfg, None
    available = feasibility.available_gpu_mem_gb
    if available is None:
        available = free_gpu_mem_gb()
    if available is None:
        return raw, cfg, None

    if plans_own_micro_batches(cfg):
        # The packed fast path (SFT, decoder classifiers, BERT) sizes its own micro-batches and checkpointing to
        # train.memory_budget_gb (src/engine/budget.py); its default is 90% of the card, whatever other processes
        # hold: give it what is free.
        budget = cfg.train.memory_budget_gb
        if budget is not None and budget <= available:
            return raw, cfg, None
        smallest = replace(cfg, train=replace(cfg.train, per_device_train_batch_size=1, activation_checkpointing=True))
        try:
            least = plan(smallest)["est_peak_gpu_mem_gb"]
        except PlanError as exc:
            print(f"warning: feasibility check skipped: {exc}", file=sys.stderr)
            least = 0.0
        if least > available:  # not even one example with every layer checkpointed: the run could only fail
            raise JobSkipped(
                f"needs ~{least:.2f} GiB of GPU memory at micro-batch 1 with every layer checkpointed, "
                f"{available:.2f} GiB free"
            )
        note = f"train.memory_budget_gb {budget} -> {available:.2f} (GiB free): the fast path plans within it"
        print(f"feasibility: {note}", file=sys.stderr)
        changed = {"memory_budget_gb": round(available, 2)}
        return {**raw, "train": {**raw["train"], **changed}}, replace(cfg, train=replace(cfg.train, **changed)), note

    def estimate(micro_batch: int) -> float:
        sized = replace(cfg, train=replace(cfg.train, per_device_train_batch_size=micro_batch))
        return plan(sized)["est_peak_gpu_mem_gb"]

    train = cfg.train
    try:
        micro_batch, grad_accum = fit_micro_batch(
            train.per_device_train_batch_size,
            train.gradient_accumulation_steps,
            available,
            estimate,
            shrink=feasibility.mode == "shrink",
        )
    except PlanError as exc:
        print(f"warning: feasibility check skipped: {exc}", file=sys.stderr)
        return raw, cfg, None
    if (micro_batch, grad_accum) == (train.per_device_train_batch_size, train.gradient_accumulation_steps):
        return raw, cfg, None
    note = (
        f"micro-batch {train.per_device_train_batch_size} -> {micro_batch}, gradient accumulation "
        f"{train.gradient_accumulation_steps} -> {grad_accum} to fit {available:.2f} GiB free"
    )
    print(f"feasibility: {note}", file=sys.stderr)
    changed = {"per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": grad_accum}
    return {**raw, "train": {**raw["train"], **changed}}, replace(cfg, train=replace(cfg.train, **changed)), note
