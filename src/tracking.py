"""The MLflow contract: store, experiment, run names, params, and a true final status.

Sweeps and ``src.compare`` read runs by the names used here, so keep them stable:
params are the resolved config flattened with dotted keys; metrics include
``trainable_params``, ``total_params``, ``trainable_pct``, ``train_runtime_s``,
``train_tokens_per_s``, ``peak_gpu_mem_gb`` and ``eval_<name>``; artifacts are ``adapter/``,
``config.yaml`` and, for SFT, ``samples.json``.

:func:`tracked_run` is the one place where failure is handled: an exception ends the run
FAILED with the error as tags, Ctrl-C or SIGTERM ends it KILLED, and nothing is left RUNNING.
Under DDP, rank 0 owns the run and the other ranks write nothing (:mod:`src.distributed`).
A process killed outright (SIGKILL, power loss) cannot close its run, so each run carries
``host``, ``pid`` and ``process_start`` tags and a ``heartbeat`` tag refreshed every minute;
``python -m src.doctor`` marks the runs whose process is gone KILLED.

A full disk must not lose the cause either: each run sets disk space aside as it starts, and frees it to
write how it ended (:mod:`src.reserve`). ``src.doctor`` ends a run it finds RUNNING with such a record
(``run_failed.json`` beside the output) as the record says, not as a lost process.

SQLite allows one writer at a time. MLflow waits 20 s for the lock and then raises
``database is locked``; every write made here goes through :func:`retry_locked`, which
retries that error with backoff, so parallel jobs on one store wait instead of failing.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf
from sqlalchemy.exc import SQLAlchemyError

from src import distributed, system_metrics
from src import reserve as reserve_mod
from src.config import CONF_DIR, Config, ConfigError, refuse_unresolved, validate
from src.config_schema import variant_name
from src.errors import StoreError, cause_line
from src.names import filter_value, name_problem
from src.tiny import PROJECT_ROOT

DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
# Set by the sweep driver for each job, so the job's run is nested under the sweep's parent.
PARENT_RUN_ENV = "LORA_SWEEP_PARENT_RUN_ID"
SWEEP_ID_ENV = "LORA_SWEEP_ID"
# Set by the sweep driver: the config keys that tell its runs apart, comma-separated, for their names (run_name).
SWEEP_KEYS_ENV = "LORA_SWEEP_KEYS"
# Keys the base run name already shows; a sweep over them needs no label.
NAMED_KEYS = frozenset(
    {
        *("model.name", "data.name", "quant.bits", "quant.fp8", "tracking.run_name"),
        *("lora.preset", "lora.target_modules", "lora.r", "lora.alpha"),
        *("lora.use_rslora", "lora.use_dora", "lora.loraplus_lr_ratio", "lora.init"),  # shown by variant_name
    }
)
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000
# A writer that cannot get SQLite's lock keeps retrying for this long (each try waits 20 s in MLflow).
LOCK_RETRY_BUDGET_S = 600.0
HEARTBEAT_INTERVAL_S = 60.0
T = TypeVar("T")
log = logging.getLogger("src")  # the project logger (src.console.log, which imports this module)


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text or "sqlite_busy" in text


class _LockTracebackFilter(logging.Filter):
    """MLflow's SQL store logs every failed transaction with its whole traceback (``mlflow.store.db.utils``) before it
    raises. A lock is waited out here (:func:`retry_locked`), which says so in one line of its own, so the
    traceback of a lock is noise on the user's screen (a Ctrl-C that lands in a write showed one above its one-line
    message). Other database errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not _is_lock_error(exc)


logging.getLogger("mlflow.store.db.utils").addFilter(_LockTracebackFilter())


def retry_locked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``, retrying with jittered exponential backoff while the store reports a lock.

    Only lock errors are retried: a failed SQLite write is rolled back, so trying again
    neither loses nor duplicates data. Other errors (disk full, bad values) raise at once.
    """
    deadline = time.monotonic() + LOCK_RETRY_BUDGET_S
    delay = 0.2
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not _is_lock_error(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning(f"note: MLflow store is locked, retrying in {delay:.1f} s")
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 15.0)


def tracking_uri(configured: Optional[str]) -> str:
    """The store to use: the config's, else $MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _store_lock(uri: str):
    """A cross-process lock for a SQLite store: its first use creates tables, which must not race."""
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        return FileLock(uri[len("sqlite:///") :] + ".lock", timeout=300)
    return contextlib.nullcontext()


def artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Artifacts of a SQLite store live in ``mlruns/`` beside the database file, whatever the
    working directory (for the default store: ``<project>/mlruns``); other stores decide."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = Path(uri[len("sqlite:///") :]).resolve()
    return (db_path.parent / "mlruns" / experiment).as_uri()


# The experiment's type for MLflow 3 (a model-training experiment, not a GenAI app).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextlib.contextmanager
def opening_store(uri: str) -> Iterator[None]:
    """Turn the errors of a store that cannot be opened or written (corrupt, read-only, unreachable) into a
    :class:`StoreError` naming it: nothing can be recorded there, which the message says. MLflow's SQL store logs
    each database error with its traceback before raising it; that error is the one line raised here."""
    sql_log = logging.getLogger("mlflow.store.db.utils")
    sql_log.addFilter(_below_error)
    try:
        yield
    except (MlflowException, SQLAlchemyError, OSError) as exc:  # OSError: its lock file (a read-only directory)
        raise StoreError(
            f"MLflow store {uri} cannot be used: {cause_line(exc)}; the run is not recorded: repair or move it "
            "aside, or choose another store (tracking.tracking_uri or $MLFLOW_TRACKING_URI)"
        ) from exc
    finally:
        sql_log.removeFilter(_below_error)


def _deleted(experiment, uri: str) -> StoreError:
    return StoreError(
        f"MLflow experiment {experiment.name!r} (id {experiment.experiment_id}) is deleted in {uri}; the run is not "
        f"recorded: restore it (MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id "
        f"{experiment.experiment_id}) or choose another tracking.experiment"
    )


def ensure_experiment(name: str, uri: str) -> str:
    """Set the store and return the experiment id, creating the store and experiment if needed.

    With the default store, artifacts go under ``<project>/mlruns`` whatever the working
    directory. Parallel jobs starting on a fresh SQLite store take turns through a file lock,
    so exactly one creates the tables and the experiment. A store that cannot be used, or an experiment
    of that name in the deleted state, raises :class:`StoreError`.
    """
    if name_problem(name):  # validation refuses it first; this keeps artifacts inside the store whoever calls
        raise ConfigError([f"tracking.experiment: {name!r} {name_problem(name)}"])
    mlflow.set_tracking_uri(uri)
    with opening_store(uri), _store_lock(uri):
        client = retry_locked(mlflow.MlflowClient, uri)  # opening a store reads its schema
        experiment = retry_locked(client.get_experiment_by_name, name)
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise _deleted(experiment, uri)
        if experiment is not None:
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                retry_locked(client.set_experiment_tag, experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return experiment.experiment_id
        location = artifact_location(uri, name)
        try:
            return retry_locked(
                client.create_experiment, name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:  # created meanwhile by a writer that does not take the lock (another host)?
            experiment = retry_locked(client.get_experiment_by_name, name)
            if experiment is None:  # no: the store refused the write (read-only)
                raise
            return experiment.experiment_id


def run_name(raw: dict, swept: Optional[str] = None) -> str:
    """e.g. ``openllama3b-red_dot-4bit-all_linear-r8-a16``: model, dataset, base, targets (explicit ones join
    with '+'), rank and alpha, and a variant other than plain LoRA (``-dora``); ``phi3mini-mbti-16bit-full`` for
    full fine-tuning (lora=none). ``tracking.run_name`` replaces this base.

    A run of a sweep adds what tells it apart from the sweep's other runs, the swept keys the base does not show
    (``swept``, else $LORA_SWEEP_KEYS set by the sweep): ``tiny-topics-16bit-attn_qv-r8-a16-class_weights=balanced``.

    From the raw composed dict, not a validated Config: a run whose config fails validation is still opened, named
    and ended FAILED with the error, so nothing here may assume a field is present or well-typed."""
    tracking = raw.get("tracking") or {}
    base = tracking.get("run_name") or _base_run_name(raw)
    keys = swept if swept is not None else os.environ.get(SWEEP_KEYS_ENV, "")
    label = sweep_label(raw, [k for k in keys.split(",") if k])
    return f"{base}-{label}" if label else base


def _base_run_name(raw: dict) -> str:
    model, quant, lora = raw.get("model") or {}, raw.get("quant") or {}, raw.get("lora") or {}
    data = raw.get("data") or {}
    targets = lora.get("target_modules")
    target_name = "+".join(targets) if isinstance(targets, list) and targets else lora.get("preset", "lora")
    r, alpha = lora.get("r", "?"), lora.get("alpha", "?")
    base = "fp8" if quant.get("fp8") is True else f"{quant.get('bits', '?')}bit"
    trained = "full" if lora.get("preset") == "none" else f"{target_name}-r{r}-a{alpha}"  # lora=none: full fine-tuning
    return f"{model.get('name', 'model')}-{data.get('name', 'data')}-{base}-{trained}{variant_name(lora)}"


_MISSING = object()


def sweep_label(raw: dict, keys: Sequence[str]) -> str:
    """``name=value`` of each key the base run name does not show, joined by ','; a key goes by its last
    component (``class_weights``) unless two shown keys share it. Keys missing from ``raw`` are left out."""
    shown: dict[str, Any] = {}
    for key in keys:
        node: Any = raw
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if key not in NAMED_KEYS and node is not _MISSING:
            shown[key] = node
    last = [key.rsplit(".", 1)[-1] for key in shown]
    return ",".join(
        f"{short if last.count(short) == 1 else key}={_label_value(value)}"
        for (key, value), short in zip(shown.items(), last)
    )


def _label_value(value: Any) -> str:
    """Short text of a config value: 4 significant digits, a path's last component, a list joined by '+'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_label_value(v) for v in value)
    text = str(value)
    return text.rstrip("/").rsplit("/", 1)[-1] if "/" in text else text


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mapping to dotted keys: {'lora': {'r': 8}} -> {'lora.r': 8}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def log_params(params: dict[str, Any]) -> None:
    """Log params in batches; values are stringified and clipped to MLflow's length limit."""
    if not distributed.is_main_process():  # under DDP, rank 0 alone writes the run
        return
    items = [(k, "null" if v is None else str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        retry_locked(mlflow.log_params, dict(items[i : i + 100]))


def log_metrics(metrics: dict[str, float], step: Optional[int] = None) -> None:
    """Log metrics to the active run, waiting out a locked store."""
    if not distributed.is_main_process():
        return
    retry_locked(mlflow.log_metrics, metrics, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    """Set tags on the active run, waiting out a locked store."""
    if not distributed.is_main_process():
        return
    retry_locked(mlflow.set_tags, tags)


def process_start(pid: int) -> Optional[str]:
    """An id of the process ``pid`` that a later process with the same pid will not share.

    Linux: the pid namespace and the start time in clock ticks from ``/proc``; None elsewhere
    or when no such process exists (a zombie counts as gone).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return f"{namespace}@{fields[19]}"


def same_process(pid: int, recorded_start: Optional[str]) -> Optional[bool]:
    """Whether the process ``pid`` of this host is still the one whose :func:`process_start` was
    ``recorded_start``: a pid reused by a later process is not. None when this process cannot tell:
    no start was recorded, or it was recorded in another pid namespace (another container)."""
    own = process_start(os.getpid())
    if not recorded_start or own is None or recorded_start.split("@")[0] != own.split("@")[0]:
        return None
    return process_start(pid) == recorded_start


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def process_tags() -> dict[str, str]:
    """The tags that let ``src.doctor`` tell whether the process that owns a run is alive."""
    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "process_start": process_start(os.getpid()) or "",
        "heartbeat": utc_now(),
        **device_tags(),
    }


def device_tags() -> dict[str, str]:
    """Where the run trains: ``cuda_visible_devices`` (as the sweeper pinned it) and, once CUDA is in use in
    this process, the names and UUIDs of the GPUs it sees. CUDA is never started here: a sweeper's parent
    process would otherwise hold a context on the first GPU for the whole sweep."""
    tags = {}
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        tags["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    import torch

    if torch.cuda.is_initialized():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        tags["gpus"] = ", ".join(f"{p.name} ({p.uuid})" for p in props)
    return tags


@contextlib.contextmanager
def heartbeat(uri: str, run_id: str, interval_s: float = HEARTBEAT_INTERVAL_S) -> Iterator[None]:
    """Refresh the run's ``heartbeat`` tag from a daemon thread while the block runs."""
    stop = threading.Event()
    client = mlflow.MlflowClient(uri)

    def beat() -> None:
        while not stop.wait(interval_s):
            try:
                retry_locked(client.set_tag, run_id, "heartbeat", utc_now())
            except Exception as exc:  # a missed beat must not kill training; the doctor allows for gaps
                log.warning(f"note: heartbeat for run {run_id} not written: {exc}")

    thread = threading.Thread(target=beat, name=f"mlflow-heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def end_run(run_id: str, status: str) -> None:
    """End the active run with ``status``; the status write is retried while the store is locked."""
    try:
        mlflow.end_run(status)  # pops the active run first, so a retry must go through the client
    except Exception as exc:
        if not _is_lock_error(exc):
            raise
        retry_locked(mlflow.MlflowClient().set_terminated, run_id, status)


def runs_of_output_dir(cfg: Config, running_only: bool = False) -> list:
    """The runs of a job's output directory (their ``output_dir`` tag), newest first: how a sweep finds the run of
    a trial process that died or of a DDP job's rank 0."""
    client = mlflow.MlflowClient(tracking_uri(cfg.tracking.tracking_uri))
    experiment = retry_locked(client.get_experiment_by_name, cfg.tracking.experiment)
    if experiment is None:
        return []
    where = f"tags.output_dir = {filter_value(cfg.output_dir)}"
    where += " and attributes.status = 'RUNNING'" if running_only else ""
    return retry_locked(
        client.search_runs, [experiment.experiment_id], filter_string=where, order_by=["attributes.start_time DESC"]
    )


def terminate(client, run_id: str, status: str, tags: dict[str, str]) -> None:
    """Set ``tags`` on a run by id and end it with ``status``, each write retried while the store is locked."""
    for key, value in tags.items():
        retry_locked(client.set_tag, run_id, key, value)
    retry_locked(client.set_terminated, run_id, status)


def _close_run(run_id: str, status: str, tags: dict[str, str]) -> None:
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        if tags:
            set_tags(tags)
        end_run(run_id, status)  # pops the fluent run: nothing ends it FINISHED at exit
    else:  # a failed mlflow.end_run popped it already: write to the run by id
        terminate(mlflow.MlflowClient(), run_id, status, tags)


def close_run(
    run_id: str, status: str, tags: dict[str, str], output_dir: Optional[str], reserve: list[Path], disk_full: bool
):
    """End the run with ``status`` and ``tags``. A run that ends on a full disk (``disk_full``) frees its reserve
    and leaves its record beside the output first. If the store cannot be written, the reserve is freed, the
    record (re)written with the store's error, and the store tried once more. Raises only for a run that had no
    error of its own (its error, if any, is the one the caller goes on raising)."""
    record = {"run_id": run_id, "status": status, "tags": tags or {}, "written_at": utc_now()}
    try:
        if disk_full:
            reserve_mod.release(reserve)
            reserve_mod.write_record(output_dir, record)
        _close_run(run_id, status, tags)
    except Exception as store_error:
        reserve_mod.release(reserve)
        record["store_error"] = f"{type(store_error).__name__}: {store_error}"[:MAX_TAG_LEN]
        if status == "FINISHED":  # the run's own end was fine; the store write is what failed
            record.update(
                status="FAILED", tags={"error_type": type(store_error).__name__, "error": record["store_error"]}
            )
        path = reserve_mod.write_record(output_dir, record)
        try:
            _close_run(run_id, record["status"], record["tags"])
            stored = "the store was written on a second try"
        except Exception:
            stored = "the store could not be written; python -m src.doctor applies the record later"
        where = f"the record is in {path}" if path else "no record could be written beside the output"
        log.error(f"error: could not record run {run_id} as {status}: {record['store_error']}; {stored}; {where}")
        if status == "FINISHED":
            raise
    finally:
        reserve_mod.release(reserve)


class RankFailed(RuntimeError):
    """Another DDP rank failed (its recorded error); this rank was stopped because of it."""

    def __init__(self, failure: dict[str, Any]):
        self.error_type = failure["error_type"]
        super().__init__(f"rank {failure['rank']}: {failure['error']}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run ends KILLED through the same path as Ctrl-C."""

    signum = signal.SIGTERM


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"received signal {signal.Signals(signum).name}")


def base_experiment() -> str:
    """``tracking.experiment`` of ``conf/config.yaml``: where a config too broken to name its own experiment
    records its failure (read from the file, which holds the default)."""
    return str(OmegaConf.load(CONF_DIR / "config.yaml").tracking.experiment)


@dataclass(frozen=True)
class RunPlace:
    """Where a run is recorded, what it is called, the output directory that finds it again (its tag), and whether
    it logs MLflow's system metrics (:mod:`src.system_metrics`)."""

    uri: str
    experiment: str
    name: str
    output_dir: Optional[str]
    system_metrics: bool = False

    @classmethod
    def of(cls, cfg: Config) -> RunPlace:
        uri, metrics = tracking_uri(cfg.tracking.tracking_uri), system_metrics.wanted(cfg.tracking.system_metrics)
        return cls(uri, cfg.tracking.experiment, run_name(cfg.resolved()), cfg.output_dir, metrics)

    @classmethod
    def of_invalid(cls, raw: dict) -> RunPlace:
        """From the raw text of a config that failed validation: nothing may be assumed present or well-typed."""
        tracking = raw.get("tracking") or {}
        experiment = tracking.get("experiment")
        if not isinstance(experiment, str) or name_problem(experiment):  # refused by validation: record it elsewhere
            experiment = base_experiment()
        uri, output_dir = tracking_uri(tracking.get("tracking_uri")), raw.get("output_dir")
        return cls(uri, experiment, run_name(raw), str(output_dir) if output_dir else None)


def tracked_run(cfg: Config, tags: Optional[dict[str, str]] = None) -> contextlib.AbstractContextManager:
    """The run of a validated config (:func:`recorded_run`), named after it (:func:`run_name`)."""
    return recorded_run(RunPlace.of(cfg), tags)


@contextlib.contextmanager
def recorded_run(place: RunPlace, tags: Optional[dict[str, str]] = None) -> Iterator[Optional[mlflow.ActiveRun]]:
    """Start a run and end it with its true status, whatever happens.

    Under DDP only rank 0 has a run; the other ranks get ``None`` and record their own failure
    for rank 0, which ends the run FAILED with it when torchrun stops rank 0 (src/distributed.py).
    """
    if not distributed.is_main_process():  # its failure is recorded for rank 0 to end the run with
        try:
            yield None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            distributed.record_failure(place.output_dir, exc)
            raise
        return
    run = _start_run(place, tags)
    previous, in_main_thread = signal.getsignal(signal.SIGTERM), True
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (e.g. a joblib worker thread): leave signals alone
        in_main_thread = False
    reserve: list[Path] = []
    status, error = "FINISHED", None
    try:
        # Before anything else is written: a disk with no room for it fails the run while its cause can be kept.
        reserve = reserve_mod.reserve_space(reserve_mod.reserve_paths(place.output_dir, place.uri, run.info.run_id))
        with heartbeat(place.uri, run.info.run_id):
            yield run
    except KeyboardInterrupt as exc:
        status, error = "KILLED", exc
        raise
    except BaseException as exc:
        status, error = "FAILED", exc
        raise
    finally:
        if in_main_thread:  # a second SIGTERM must not cut the status write short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            _end_run(run.info.run_id, status, error, place.output_dir, reserve)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)


def _start_run(place: RunPlace, tags: Optional[dict[str, str]]) -> mlflow.ActiveRun:
    experiment_id = ensure_experiment(place.experiment, place.uri)
    all_tags = {**process_tags(), **(tags or {})}
    if place.output_dir:  # how a sweep and src.doctor find the run of an output directory
        all_tags["output_dir"] = place.output_dir
    parent = os.environ.get(PARENT_RUN_ENV)
    if os.environ.get(SWEEP_ID_ENV):
        all_tags["sweep_id"] = os.environ[SWEEP_ID_ENV]
    if place.system_metrics:
        system_metrics.warn_if_gpu_unseen()
    with opening_store(place.uri):
        return retry_locked(
            mlflow.start_run,
            experiment_id=experiment_id,
            run_name=place.name,
            tags=all_tags,
            parent_run_id=parent or None,
            log_system_metrics=place.system_metrics,  # False also where $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is set
        )


def _end_run(run_id: str, status: str, error: Optional[BaseException], output_dir: Optional[str], reserve) -> None:
    peers = distributed.peer_failures(output_dir) if error is not None else []
    if peers:  # another DDP rank failed first: torchrun stopped this one, or a collective broke
        status, error = "FAILED", RankFailed(peers[0])
    tags = {}
    if error is not None:
        message = str(error)[:MAX_TAG_LEN] or ("interrupted" if status == "KILLED" else "")
        error_type = error.error_type if isinstance(error, RankFailed) else type(error).__name__
        tags = {"error_type": error_type, "error": message}
    disk_full = error is not None and reserve_mod.is_disk_full(error)
    close_run(run_id, status, tags, output_dir, reserve, disk_full)
    if isinstance(error, KeyboardInterrupt):  # for the command's one line (errors.report_interrupt)
        error.ended = (run_id, status)


def validated(raw: dict, unresolved: Optional[dict[str, str]] = None) -> Config:
    """The config validated for training (``src.config.validate``); an invalid one raises the ConfigError and
    still ends as a FAILED run that lists every problem (:func:`record_invalid`). ``unresolved``: the values
    that could not be resolved (``src.config.resolve``), each a problem; the run is recorded only if the
    ``tracking`` section, which names its store, resolved."""
    try:
        refuse_unresolved(unresolved or {})
        return validate(raw, for_training=True)
    except ConfigError as exc:
        if not any(key.startswith("tracking.") for key in unresolved or {}):
            record_invalid(raw, exc)
        raise


def record_invalid(raw: dict, error: ConfigError) -> None:
    """A FAILED run for a config that did not validate, with every problem: a sweep's table shows why it did not
    train, and so does the store after a command line's typo."""
    with contextlib.suppress(ConfigError), recorded_run(RunPlace.of_invalid(raw)):
        raise error
