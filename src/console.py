"""What a run prints: a progress bar on a terminal, compact metric lines, a summary at the end, and no noise.

Every line goes through the ``src`` logger (:mod:`src.logger`: ``log``, and ``say`` for a line the user must see;
``print`` only for a command's stdout payload; src/training.py holds the Trainer callbacks that write them), so
Hydra's job logging also writes it to ``<output_dir>/train.log``; a sweep's trial process writes that file
itself (:func:`log_to_file`). Numbers are numbers: ``step 20/40  loss 0.4123  lr 1.9e-04``, not HF's dict of
quoted strings. ``LORA_SWEEPS_VERBOSE=1`` shows what :func:`quiet_libraries` hides.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from src.logger import log, say  # noqa: F401  (the project logger; here for its callers)

VERBOSE_ENV = "LORA_SWEEPS_VERBOSE"

# HF log keys that are bookkeeping, not something to read while training (all still go to MLflow).
_HIDDEN = {
    "epoch",
    "total_flos",
    "num_input_tokens_seen",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "eval_runtime",
}
_SHORT = {"learning_rate": "lr", "train_tokens_per_second": "tokens/s", "train_loss": "mean loss"}


def number(value: Any) -> str:
    """A metric as a short number: 0.9579, 1.90e-04, 1178, 12."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if isinstance(value, int) or (value == int(value) and abs(value) < 1e6):
        return str(int(value))
    magnitude = abs(value)
    return f"{value:.2e}" if magnitude < 1e-3 or magnitude >= 1e5 else f"{value:.4g}"


def metric_line(logs: dict[str, Any], step: int, max_steps: int, label: Optional[str] = None) -> Optional[str]:
    """One line for one HF log call, or None when it holds nothing to read. Per-class and per-label scores
    stay in MLflow: a line holds the headline numbers. ``label`` (whose run it is) leads the line."""
    shown = {
        k: v
        for k, v in logs.items()
        if k not in _HIDDEN and isinstance(v, (int, float)) and "_class_" not in k and "_label_" not in k
    }
    if not shown:
        return None
    evaluation = any(k.startswith("eval_") for k in shown)
    if evaluation:
        shown = {k.removeprefix("eval_"): v for k, v in shown.items()}
    where = f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"
    if "epoch" in logs:
        where += f"  epoch {logs['epoch']:.2f}"
    body = "  ".join(f"{_SHORT.get(k, k)} {number(v)}" for k, v in shown.items())
    line = f"{'eval  ' if evaluation else ''}{where}  {body}"
    return f"[{label}] {line}" if label else line


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def quiet_libraries() -> None:
    """Hide what every run prints and nobody can act on (unless ``LORA_SWEEPS_VERBOSE=1``).

    - transformers' load report, which calls a new classification head "missing" (it is new by design;
      src.modeling warns about any other missing weight itself) and download bars;
    - peft's use of transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning from library code);
    - PyTorch's ``pin_memory`` warning with no accelerator (pinning is then a no-op);
    - bitsandbytes' note that 8-bit layers cast float32 inputs to float16, once per layer and step, and its
      hint on CPU that the ``kernels`` package would be faster;
    - datasets' progress bars over a few hundred rows;
    - MLflow's lines as each run's system metrics monitor starts and stops (``tracking.system_metrics``).
    Warnings that a user can act on are kept.
    """
    import warnings

    if verbose():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()  # "Map: 100%" bars of a few hundred rows
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU only: "pip install kernels" for speed
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*'pin_memory' argument is set as true but no accelerator")
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast from")


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


# The loggers that narrate a new SQLite store's creation: "Creating initial MLflow database tables...",
# "Updating database tables", alembic's "Context impl SQLiteImpl." and "Will assume non-transactional DDL.".
_STORE_SETUP_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")


def quiet_mlflow() -> None:
    """Keep MLflow's routine narration off every command's screen: a new store's table creation (its warnings and
    errors stay) and the ``Downloading artifacts`` bars of the project's own downloads (compare's samples, a
    run's adapter). ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` set by the user wins; ``LORA_SWEEPS_VERBOSE=1`` keeps
    both. A filter, not a level: MLflow's logging setup (``dictConfig`` in older MLflow) resets the level of
    every logger below the ones it configures, and it runs when mlflow is first imported, after this."""
    if verbose():
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in _STORE_SETUP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BelowWarning) for f in logger.filters):
            logger.addFilter(_BelowWarning())


@contextlib.contextmanager
def _hub_kernels_offline() -> Iterator[None]:
    """While bitsandbytes imports: the hub offline (unless $HF_HUB_OFFLINE says otherwise) and its and ``kernels``'
    warnings hidden (unless ``LORA_SWEEPS_VERBOSE=1``).

    On a CPU with AVX512-BF16, importing bitsandbytes asks ``kernels.get_kernel`` for a CPU kernel from
    kernels-community on the hub, on every import; neither has a switch for it, and it fails (no network, no
    trusted publisher, a CUDA torch build), printing "Failed to load CPU gemm_4bit_forward". ``kernels`` reads
    huggingface_hub's offline flag when called: offline, it takes a cached kernel or none, and makes no request.
    The flag is restored after the import, so models still download."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    if "HF_HUB_OFFLINE" not in os.environ:
        constants.HF_HUB_OFFLINE = True
    loggers = [] if verbose() else [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _OfflineLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # resources and reloads see the real loader
        with _hub_kernels_offline():
            self.loader.exec_module(module)


class _OfflineBitsandbytes(importlib.abc.MetaPathFinder):
    """Imports bitsandbytes, however it is reached (peft, transformers' Trainer), through _hub_kernels_offline."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "bitsandbytes":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _OfflineLoader(spec.loader)
        return spec


def offline_bitsandbytes() -> None:
    """Make bitsandbytes' import offline and quiet (:func:`_hub_kernels_offline`); ``src/__init__.py`` calls it, so
    it holds before any entry point imports torch, peft or transformers."""
    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _OfflineBitsandbytes) for f in sys.meta_path):
        sys.meta_path.insert(0, _OfflineBitsandbytes())


def log_to_file(path: Path) -> None:
    """Write the run's lines to ``path`` and to stderr: for a trial process, which has no Hydra logging."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(path), logging.StreamHandler(sys.stderr)]
    handlers[0].setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    handlers[1].setFormatter(logging.Formatter("%(message)s"))
    for handler in log.handlers[:]:
        log.removeHandler(handler)
    for handler in handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def summary(
    run_id: str,
    run_name: str,
    objective_metric: str,
    final: dict[str, float],
    adapter_dir: Optional[Path],
    tracking_uri: str,
    experiment_id: str,
) -> str:
    """The lines that end a run: its headline metric, id, adapter and how to look at it."""
    others = [
        f"{k} {number(v)}"
        for k, v in final.items()
        if k.startswith("eval_")
        and k != objective_metric
        and k not in _HIDDEN
        and "_class_" not in k
        and "_label_" not in k
    ][:4]
    lines = [
        f"run {run_id[:8]} ({run_name}) finished: {objective_metric} {number(final.get(objective_metric))}",
        f"  also      {'  '.join(others)}" if others else None,
        f"  adapter   {adapter_dir}" if adapter_dir else None,
        f"  run id    {run_id}",
        f"  view      {view_hint(tracking_uri, experiment_id, run_id)}",
    ]
    return "\n".join(line for line in lines if line)


def sweep_view_hint(tracking_uri: str, experiment_id: str, sweep_id: str) -> str:
    """The URL of a sweep's saved runs-table view (:func:`src.ui_links.sweep_view_state`)."""
    from src.ui_links import sweep_view_url

    if tracking_uri.startswith(("http://", "https://")):
        return sweep_view_url(tracking_uri, experiment_id, sweep_id)
    return sweep_view_url("http://127.0.0.1:5000", experiment_id, sweep_id) + " (with mlflow ui as above)"


def view_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The URL of the run, or the ``mlflow ui`` command that serves a local store."""
    from src.ui_links import ui_url

    page = f"experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return ui_url(tracking_uri, page)
    return f"mlflow ui --backend-store-uri {tracking_uri}, then {ui_url('http://127.0.0.1:5000', page)}"
