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


# What tests may leave in the project tree: caches and build state, and the screenshots tests/test_browser.py keeps.
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

    return run(raw, tracking.validated(raw))


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


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The built tiny Llama (built once per machine under .cache/)."""
    from src.tiny import resolve

    return Path(resolve("builtin:tiny-llama"))


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
