"""Shared fixtures: composing the real config, a throwaway MLflow store, the tiny model, and a check that no test
writes into the project tree."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"
# openlm-research/open_llama_3b_v2: the architecture of the seed table (3,426,473,600 parameters).
OPENLLAMA_3B = dict(
    hidden_size=3200,
    intermediate_size=8640,
    num_hidden_layers=26,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    tie_word_embeddings=False,
)

# Shrinks any job to seconds on CPU; eval only at the end, on 16 rows.
TINY = [
    "model=tiny",
    "data=topics",
    "train=default",
    "train.max_steps=2",
    "data.subsample=32",
    "data.eval_subsample=16",
    "train.eval_strategy=no",
    "tracking.log_adapter=false",
]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown where it is not installed (the GPU machine)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one worker a core, at most 4, since each holds torch and starts training
    processes of its own; none for a tier that selects the GPU tests, which share the GPUs and time them."""
    marks = (config.getoption("markexpr") or "").replace("not gpu", "")
    if "gpu" in marks:
        return 0
    return max(1, min(len(os.sched_getaffinity(0)), 4))


# The default tier's longest files (their tests' seconds, summed, from --durations), started first: under
# --dist loadfile a long file dealt out last keeps one worker busy while the others idle.
LONGEST_FIRST = (
    "tests/regression/test_readme.py",
    "tests/unit/test_seeds.py",
    "tests/unit/test_fit.py",
    "tests/integration/test_train_cli.py",
    "tests/integration/test_disk_full.py",
    "tests/integration/test_console_cli.py",
    "tests/integration/test_sweeps.py",
    "tests/integration/test_packs_cli.py",
    "tests/unit/test_config.py",
    "tests/unit/engine/test_classification.py",
)


def pytest_collection_modifyitems(items) -> None:
    """The files of LONGEST_FIRST first, in its order; the others after, in collection order (a stable sort)."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


# What tests may leave in the project tree: caches and build state, and the screenshots that
# tests/integration/test_browser.py keeps.
LOCAL_STATE = frozenset({".venv", ".venv-floor", ".cache", "__pycache__", ".pytest_cache", ".ruff_cache", ".whl"})
KEPT_OUTPUTS = frozenset({"tests/artifacts"})


def untracked_state(root: Path = ROOT) -> dict[str, tuple[int, int]]:
    """Every ignored file of the tree at ``root``, and every untracked one at its top (caches and build state left
    out), with its size and modification time: a test that adds, or writes into, ``optuna.db``, ``mlflow.db``,
    ``mlruns/``, ``outputs/`` or ``multirun/`` changes it."""
    entries = _untracked_entries(root)
    state: dict[str, tuple[int, int]] = {}
    for entry in entries:
        if _local_state(entry):
            continue
        path = root / entry
        files = [path] if not path.is_dir() else [f for f in path.rglob("*") if not f.is_dir()]
        for file in files:
            relative = file.relative_to(root).as_posix()
            if _local_state(relative):
                continue
            try:
                stat = file.lstat()
            except FileNotFoundError:  # removed while listed
                continue
            state[relative] = (stat.st_size, stat.st_mtime_ns)
    return state


def _untracked_entries(root: Path) -> list[str]:
    try:
        listed = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "-z"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist): every file counts
        return [path.name for path in root.iterdir()]
    # Ignored paths anywhere, untracked ones at the top: a source file being written beside the tests is not theirs.
    return [
        item[3:].rstrip("/")
        for item in listed.split("\0")
        if item[:2] == "!!" or (item[:2] == "??" and "/" not in item[3:].rstrip("/"))
    ]


def _local_state(relative: str) -> bool:
    parts = relative.split("/")
    return any(part in LOCAL_STATE or part.endswith(".egg-info") for part in parts) or any(
        relative == kept or relative.startswith(kept + "/") for kept in KEPT_OUTPUTS
    )


def written_into(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """The files that appeared or changed between two :func:`untracked_state` snapshots."""
    return sorted(path for path, stat in after.items() if before.get(path) != stat)


@pytest.fixture(scope="session", autouse=True)
def project_tree_untouched():
    """Fail the session when a test wrote into the project tree (a sweep's ``optuna.db``, a run's ``mlruns/``):
    the user's own stores and outputs live there. Tests write under their ``tmp_path``."""
    before = untracked_state()
    yield
    written = written_into(before, untracked_state())
    if written:
        shown = ", ".join(written[:10]) + (f" and {len(written) - 10} more" if len(written) > 10 else "")
        pytest.fail(f"tests wrote into the project tree {ROOT}: {shown}", pytrace=False)


def compose_config(overrides: list[str] | None = None, config_dir: Path = CONF_DIR, config_name: str = "config"):
    """Compose the real Hydra config (no output_dir interpolation) and return a plain resolved dict."""
    from src.config import compose

    return compose(list(overrides or []), config_dir, config_name)


def compose_hydra(config_dir: Path = CONF_DIR, config_name: str = "config", overrides: tuple[str, ...] = ()):
    """The composed DictConfig with its ``hydra`` node (the sweeper, the launcher), which ``compose_config`` drops."""
    from hydra import compose, initialize_config_dir

    import src.config  # noqa: F401  the resolvers the YAML files use

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)


def train_run(raw: dict):
    """``src.fit.run`` on a composed config, validated first as ``src.train.main`` validates it at its edge
    (``src.tracking.validated``: an invalid config raises ConfigError and still leaves a FAILED run)."""
    from src import tracking
    from src.fit import run

    return run(tracking.validated(raw))


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables and nothing else, made once: a new store runs MLflow's migrations,
    about a second, which a test that copies this file skips (what MLflow leaves is the same either way)."""
    import mlflow

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    # MLflow puts the Default experiment's artifacts in mlruns/ under the working directory of the store's creation:
    # here, not the project, where a test that logs to the Default experiment would write them.
    with contextlib.chdir(path.parent):
        mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, empty_mlflow_db):
    """A fresh SQLite MLflow store in tmp_path (a copy of the empty one), selected through MLFLOW_TRACKING_URI."""
    import mlflow

    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session", autouse=True)
def tiny_model_dir() -> Path:
    """The built tiny Llama, built once per machine under .cache/, before a session's first test and under a lock:
    parallel workers (pytest-xdist) never build it side by side (the second would remove the first's copy while
    its tests read it), and the commands their tests start find it built."""
    from filelock import FileLock

    from src.tiny import BUILTINS, resolve_builtin

    cache = BUILTINS["tiny-llama"].parent
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(cache / ".tiny-llama.lock"):
        return Path(resolve_builtin("builtin:tiny-llama"))


# A small encoder's shape: random checkpoints of BERT and RoBERTa that plan, pack and train in seconds on CPU.
SMALL_ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory, tiny_model_dir):
    """``random_checkpoint(model_type, weights=False, **architecture)``: a model directory, made once a session for
    each architecture. Its config.json; with ``weights``, random weights (seed 0) and the tiny model's tokenizer
    too. Config-only directories are for the planner (built on the meta device, never loaded). Shared: copy one
    before changing it."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    made: dict[tuple, Path] = {}

    def make(model_type: str, weights: bool = False, **architecture) -> Path:
        key = (model_type, weights, *sorted(architecture.items()))
        if key not in made:
            path = tmp_path_factory.mktemp(f"{model_type}-{'random' if weights else 'config'}")
            config = AutoConfig.for_model(model_type, **architecture)
            if weights:
                import torch

                torch.manual_seed(0)
                AutoModel.from_config(config).save_pretrained(path)
                AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
            else:
                config.save_pretrained(path)
            made[key] = path
        return made[key]

    return make


def tiny_model_config(tiny_model_dir: Path):
    """A ``ModelConfig`` for the built tiny Llama, in float32 with 64-token rows."""
    from src.config import ModelConfig

    return ModelConfig(
        name="tiny",
        name_or_path=str(tiny_model_dir),
        architecture="decoder",
        revision=None,
        dtype="float32",
        max_length=64,
        trust_remote_code=False,
    )


def python_cmd() -> list[str]:
    return [sys.executable]


def start_training_until_it_logs(tmp_path: Path, uri: str, timeout_s: float = 300) -> subprocess.Popen:
    """Start a long ``python -m src.train`` on the tiny model and return once its run has logged a training loss.

    The store is created first, so that polling it never races the subprocess's own table creation.
    """
    import mlflow

    from src import tracking

    tracking.ensure_experiment("lora-sweeps", uri)
    client = mlflow.MlflowClient(uri)
    cmd = [
        sys.executable,
        "-m",
        "src.train",
        "train.max_steps=100000",
        "train.logging_steps=1",
        "train.eval_strategy=no",
        f"tracking.tracking_uri={uri}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    # Output to a file, not a pipe nobody reads: a run that logs every step fills a pipe's 64 KiB and then
    # blocks in write, where no signal handler can end it.
    log = open(tmp_path / "train-output.log", "w")  # the child writes it for its whole life
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout_s
    while not any(
        "train_loss" in r.data.metrics
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
    ):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"training did not start logging: {(tmp_path / 'train-output.log').read_text()[-3000:]}"
            )
        time.sleep(1)
    return proc


def run_module(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m <argv>`` in this process, as the interpreter would run it (``runpy``, ``__main__``), with its
    exit code and what it wrote to stdout and stderr. Saves a new interpreter (seconds of imports) where the test is
    about what the command says and records; what the command changes in the process is put back
    (:func:`_process_state`)."""
    import io
    import runpy
    import warnings

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _process_state(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        sys.argv = list(argv)
        try:
            with warnings.catch_warnings():  # the module runs as __main__ beside its imported self, as with -m
                warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
    return subprocess.CompletedProcess(["python", "-m", *argv], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _process_state():
    """Put back what a command changes in its process: the logging Hydra set up, signal handlers, sys.argv, the
    environment, the MLflow store it selected and its active run, Hydra's global state."""
    import logging
    import signal

    import mlflow
    from hydra.core.global_hydra import GlobalHydra
    from mlflow.tracking._tracking_service import utils as mlflow_uri

    named = list(logging.Logger.manager.loggerDict.values())
    loggers = [logging.getLogger(), *(log for log in named if isinstance(log, logging.Logger))]
    saved_logging = [(log, log.handlers[:], log.level, log.propagate, log.disabled) for log in loggers]
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    saved_argv, saved_env, saved_uri = sys.argv[:], dict(os.environ), mlflow_uri._tracking_uri
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        GlobalHydra.instance().clear()
        for log, handlers, level, propagate, disabled in saved_logging:
            for handler in set(log.handlers) - set(handlers):
                handler.close()
            log.handlers[:] = handlers
            log.setLevel(level)
            log.propagate, log.disabled = propagate, disabled
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        sys.argv, mlflow_uri._tracking_uri = saved_argv, saved_uri
        os.environ.clear()
        os.environ.update(saved_env)


# FS_IOC_GETFLAGS / FS_IOC_SETFLAGS and FS_IMMUTABLE_FL (linux/fs.h): what ``chattr +i`` sets.
_GET_FLAGS, _SET_FLAGS, _IMMUTABLE = 0x80086601, 0x40086602, 0x10


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` read-only even for root (who ignores file modes): the immutable attribute where the filesystem
    has it, else the test skips."""
    path.chmod(0o444)
    immutable = os.geteuid() == 0
    if immutable:
        try:
            _set_immutable(path, True)
        except OSError:
            path.chmod(0o644)
            pytest.skip("running as root on a filesystem without the immutable attribute: no file is read-only here")
    try:
        yield
    finally:
        if immutable:
            _set_immutable(path, False)
        path.chmod(0o644)


def _set_immutable(path: Path, on: bool) -> None:
    import fcntl
    import struct

    fd = os.open(path, os.O_RDONLY)
    try:
        (flags,) = struct.unpack("i", fcntl.ioctl(fd, _GET_FLAGS, struct.pack("i", 0)))
        flags = flags | _IMMUTABLE if on else flags & ~_IMMUTABLE
        fcntl.ioctl(fd, _SET_FLAGS, struct.pack("i", flags))
    finally:
        os.close(fd)
