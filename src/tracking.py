"""The MLflow contract: store, experiment, run names, params, and a true final status.

Sweeps and ``src.compare`` read runs by the names used here, so keep them stable:
params are the resolved config flattened with dotted keys; metrics include
``trainable_params``, ``total_params``, ``trainable_pct``, ``train_runtime_s``,
``train_tokens_per_s``, ``peak_gpu_mem_gb`` and ``eval_<name>``; artifacts are ``adapter/``,
``config.yaml`` and, for SFT, ``samples.json``.

:func:`tracked_run` is the one place where failure is handled: an exception ends the run
FAILED with the error as tags, Ctrl-C or SIGTERM ends it KILLED, and nothing is left RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import mlflow
from mlflow.exceptions import MlflowException

from src.tiny import PROJECT_ROOT

DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
DEFAULT_ARTIFACT_ROOT = PROJECT_ROOT / "mlruns"
# Set by the sweep driver for each job, so the job's run is nested under the sweep's parent.
PARENT_RUN_ENV = "LORA_SWEEP_PARENT_RUN_ID"
SWEEP_ID_ENV = "LORA_SWEEP_ID"
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000


def tracking_uri(configured: Optional[str]) -> str:
    """The store to use: the config's, else $MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _store_lock(uri: str):
    """A cross-process lock for a SQLite store: its first use creates tables, which must not race."""
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        return FileLock(uri[len("sqlite:///") :] + ".lock", timeout=300)
    return contextlib.nullcontext()


def ensure_experiment(name: str, uri: str) -> str:
    """Set the store and return the experiment id, creating the store and experiment if needed.

    With the default store, artifacts go under ``<project>/mlruns`` whatever the working
    directory. Parallel jobs starting on a fresh SQLite store take turns through a file lock,
    so exactly one creates the tables and the experiment.
    """
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = DEFAULT_ARTIFACT_ROOT.as_uri() + f"/{name}" if uri == DEFAULT_TRACKING_URI else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by a writer that does not take the lock (another host)
            return client.get_experiment_by_name(name).experiment_id


def run_name(raw: dict) -> str:
    """e.g. ``openllama3b-4bit-all_linear-r8-a16``; explicit targets join with '+'."""
    tracking = raw.get("tracking") or {}
    if tracking.get("run_name"):
        return tracking["run_name"]
    model, quant, lora = raw.get("model") or {}, raw.get("quant") or {}, raw.get("lora") or {}
    targets = lora.get("target_modules")
    target_name = "+".join(targets) if isinstance(targets, list) and targets else lora.get("preset", "lora")
    bits, r, alpha = quant.get("bits", "?"), lora.get("r", "?"), lora.get("alpha", "?")
    return f"{model.get('name', 'model')}-{bits}bit-{target_name}-r{r}-a{alpha}"


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
    items = [(k, "null" if v is None else str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run ends KILLED through the same path as Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"received signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def tracked_run(raw: dict, tags: Optional[dict[str, str]] = None) -> Iterator[mlflow.ActiveRun]:
    """Start the run for a composed config and end it with its true status, whatever happens.

    ``raw`` is the composed config as a plain dict; only its ``tracking`` section and run-name
    fields are read here, so even an invalid config gets a FAILED run that says why.
    """
    tracking = raw.get("tracking") or {}
    uri = tracking_uri(tracking.get("tracking_uri"))
    experiment_id = ensure_experiment(tracking.get("experiment") or "lora-sweeps", uri)
    all_tags = dict(tags or {})
    parent = os.environ.get(PARENT_RUN_ENV)
    if os.environ.get(SWEEP_ID_ENV):
        all_tags["sweep_id"] = os.environ[SWEEP_ID_ENV]
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = True
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (e.g. a joblib worker thread): leave signals alone
        in_main_thread = False
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name(raw), tags=all_tags, parent_run_id=parent or None
    )
    try:
        yield run
    except KeyboardInterrupt as exc:
        mlflow.set_tags({"error_type": type(exc).__name__, "error": str(exc)[:MAX_TAG_LEN] or "interrupted"})
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        mlflow.set_tags({"error_type": type(exc).__name__, "error": str(exc)[:MAX_TAG_LEN]})
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def log_dir_artifacts(local_dir: Path, artifact_path: str) -> None:
    mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)
