"""What a user can fix is one line: each case through the command's ``__main__`` in process (``src.train``,
``src.predict``, ``src.export``: :func:`tests.conftest.run_module`) exits 2 with exactly one ``error:`` line and no
traceback, and a run that started ends FAILED with the cause. Where the store itself is broken, the line says the run
is not recorded. tests/integration/test_errors.py runs the sweeps' cases as real processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest

from tests.conftest import read_only, run_module
from tests.unit.runs.test_predict import TrainedRun, trained_run

SMALL = ["train.max_steps=1", "data.subsample=16", "data.eval_subsample=8", "train.eval_strategy=no"]


def _one_error_line(proc, *fragments: str) -> str:
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in err, (fragment, err[-2000:])
    return lines[0]


def _corrupt(path: Path) -> contextlib.AbstractContextManager:
    path.write_bytes(b"not an SQLite database\n" * 200)
    return contextlib.nullcontext()


def _failed_run(uri: str, error_type: str, fragment: str) -> None:
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert run.data.tags["error_type"] == error_type and fragment in run.data.tags["error"], run.data.tags


def _train(tmp_path: Path, uri: str, *overrides: str, env: dict[str, str] | None = None):
    out = [f"tracking.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'out'}"]
    return run_module(["src.train", *SMALL, *out, *overrides], env)


@pytest.mark.parametrize(
    ("name", "value"),
    [("data.path", "${oc.env:LORA_TEST_UNSET_PATH}"), ("data.eval_path", "${oc.env:LORA_TEST_UNSET_EVAL}")],
)
def test_an_unset_environment_variable_is_one_line_and_a_failed_run(tmp_path, empty_mlflow_db, name, value):
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    variable = value.split(":")[1].rstrip("}")
    env = {k: v for k, v in os.environ.items() if k != variable}
    proc = _train(tmp_path, uri, f"{name}={value}", env=env)
    _one_error_line(proc, f"{name}: {value}: environment variable {variable} is not set")
    _failed_run(uri, "ConfigError", f"environment variable {variable} is not set")


def test_an_unset_variable_in_the_tracking_section_records_nothing_and_says_so(tmp_path):
    proc = run_module(
        ["src.train", *SMALL, "tracking.tracking_uri=${oc.env:LORA_TEST_UNSET_URI}", f"hydra.run.dir={tmp_path}"]
    )
    _one_error_line(
        proc, "tracking.tracking_uri: ", "the run is not recorded: tracking.tracking_uri cannot be resolved"
    )


def _read_only_store(path: Path, empty_db: Path) -> contextlib.AbstractContextManager:
    shutil.copyfile(empty_db, path)
    return read_only(path)


def test_a_resume_from_a_path_that_is_no_checkpoint_is_one_line_and_a_failed_run(tmp_path, empty_mlflow_db):
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "not-a-checkpoint").mkdir()
    proc = _train(tmp_path, uri, f"train.resume_from_checkpoint={tmp_path / 'not-a-checkpoint'}")
    _one_error_line(proc, "not a Trainer checkpoint (no trainer_state.json there)")
    _failed_run(uri, "CheckpointNotFound", "not a Trainer checkpoint")


def test_the_guards_refusals_are_user_errors():
    """What the guards refuse (pickled weights, remote code, a NaN loss, a plan that cannot fit) is the user's to
    fix: one ``error:`` line through ``exit_on_user_error``, not a traceback."""
    from src import guards
    from src.engine.budget import MemoryBudgetError
    from src.errors import UserError

    for error in (
        guards.UnsafeFileError,
        guards.RemoteCodeError,
        guards.PickleWeightsError,
        guards.NonFiniteLossError,
        guards.CheckpointNotFound,
        MemoryBudgetError,
    ):
        assert issubclass(error, UserError), error


@pytest.mark.parametrize(
    ("broken", "cause"),
    [("corrupt", "file is not a database"), ("read-only", "attempt to write a readonly database")],
)
def test_a_broken_mlflow_store_is_one_line_saying_the_run_is_not_recorded(tmp_path, empty_mlflow_db, broken, cause):
    path = tmp_path / "mlflow.db"
    with _corrupt(path) if broken == "corrupt" else _read_only_store(path, empty_mlflow_db):
        line = _one_error_line(_train(tmp_path, f"sqlite:///{path}"), cause)
    assert f"MLflow store sqlite:///{path} cannot be used" in line and "the run is not recorded" in line


def test_a_deleted_experiment_is_one_line_with_the_way_to_restore_it(tmp_path, empty_mlflow_db):
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    gone = client.create_experiment("gone", artifact_location=(tmp_path / "artifacts").as_uri())
    client.delete_experiment(gone)
    line = _one_error_line(_train(tmp_path, uri, "tracking.experiment=gone"))
    assert "experiment 'gone'" in line and "is deleted" in line and f"restore --experiment-id {gone}" in line
    assert client.search_runs([gone]) == []  # nothing was written into the deleted experiment


def test_a_missing_model_directory_is_one_line_and_a_failed_run(tmp_path, empty_mlflow_db):
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    missing = tmp_path / "no-such-model"
    proc = _train(tmp_path, uri, f"model.name_or_path={missing}")
    _one_error_line(proc, f"model.name_or_path='{missing}': no such directory")
    _failed_run(uri, "ModelUnavailable", "no such directory")


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> TrainedRun:
    return trained_run("classification", tmp_path_factory)


def _edit_json(name: str, **changes) -> Callable[[Path], None]:
    def edit(adapter: Path) -> None:
        path = adapter / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda adapter: (adapter / name).write_text(text)


TAMPERED = {
    "target_modules matches nothing": (
        _edit_json("adapter_config.json", target_modules=["no_such_proj"]),
        "adapter_config.json: target_modules does not name the saved modules",
    ),
    "target_modules names other layers": (
        _edit_json("adapter_config.json", target_modules=["k_proj", "o_proj"]),
        "adapter_config.json: target_modules does not name the saved modules",
    ),
    "r unlike the weights": (_edit_json("adapter_config.json", r=64), "r=64, but the saved LoRA weights have rank [8]"),
    "r not a positive integer": (_edit_json("adapter_config.json", r=0), "adapter_config.json: r is 0"),
    "r text": (_edit_json("adapter_config.json", r="eight"), "adapter_config.json: r is 'eight'"),
    "peft_type": (_edit_json("adapter_config.json", peft_type="NOPE"), "peft_type is 'NOPE', not 'LORA'"),
    "adapter_config not JSON": (_write("adapter_config.json", "{oops"), "adapter_config.json: not readable JSON"),
    "label_map not JSON": (_write("label_map.json", "{oops"), "label_map.json: not readable JSON"),
    "label_map a list": (_write("label_map.json", "[1, 2]"), "label_map.json: not a JSON object but a list"),
    "label_map without task": (_edit_json("label_map.json", task=None), "label_map.json: task is None"),
    "labels a string": (_edit_json("label_map.json", labels="abc"), "label_map.json: labels is 'abc', not a list"),
    "labels repeated": (_edit_json("label_map.json", labels=["a", "a", "b"]), "labels repeats a name: ['a']"),
    "labels unlike the head": (
        _edit_json("label_map.json", labels=["a", "b"]),
        "label_map.json: 2 labels, but the saved classifier head has 3 outputs",
    ),
}

# One case per file and key in the default tier, through src.predict, and src.export for the checks against the
# saved weights (both read an adapter through src.runs.inference.read_source); the variations are slow.
DEFAULT_TIER = {"target_modules matches nothing", "r unlike the weights", "peft_type", "label_map not JSON"}

EDITED = [
    pytest.param(case, "src.predict", marks=() if case in DEFAULT_TIER else pytest.mark.slow) for case in TAMPERED
] + [
    pytest.param(case, "src.export", marks=() if case == "labels unlike the head" else pytest.mark.slow)
    for case in ("target_modules names other layers", "r unlike the weights", "labels unlike the head")
]


@pytest.mark.parametrize(("case", "command"), EDITED)
def test_edited_adapter_files_are_one_line_naming_the_file_and_key(cls_run, tmp_path, case, command):
    edit, expected = TAMPERED[case]
    adapter = tmp_path / "run" / "adapter"
    shutil.copytree(cls_run.adapter_dir, adapter)
    shutil.copyfile(cls_run.output_dir / "config.yaml", adapter.parent / "config.yaml")
    edit(adapter)
    (tmp_path / "in.jsonl").write_text('{"text": "the striker scored"}\n')
    given = ["--input", str(tmp_path / "in.jsonl")] if command == "src.predict" else ["--out", str(tmp_path / "m")]
    _one_error_line(run_module([command, "--adapter", str(adapter), *given]), expected, "restore the file")


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_export_to_a_file_is_one_line(cls_run, tmp_path, where):
    target = tmp_path / "a-file"
    target.write_text("not a directory\n")
    out = target if where == "a file" else target / "model"
    line = _one_error_line(run_module(["src.export", "--adapter", str(cls_run.adapter_dir), "--out", str(out)]))
    assert f"--out {out}" in line and target.read_text() == "not a directory\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lora.target_modules=[no_such_proj]"], "lora.target_modules: 'no_such_proj' matches no linear layer"),
        (["lora.target_modules=[q_proj,nope_a,nope_b]"], "'nope_b' matches no linear layer"),
    ],
)
def test_lora_targets_that_match_nothing_are_one_line_and_a_failed_run(tmp_path, empty_mlflow_db, overrides, expected):
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _one_error_line(_train(tmp_path, uri, *overrides), expected)
    _failed_run(uri, "ConfigError", expected)


@pytest.mark.slow
def test_a_hub_model_that_cannot_be_fetched_is_one_line_and_a_failed_run(tmp_path, empty_mlflow_db):
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = _train(tmp_path, uri, "model.name_or_path=no-such-org/no-such-model", env=env)
    _one_error_line(proc, "model.name_or_path='no-such-org/no-such-model': cannot be loaded")
    _failed_run(uri, "ModelUnavailable", "no-such-org/no-such-model")


def test_an_invalid_config_on_a_broken_store_is_one_error_line_saying_it_is_not_recorded(tmp_path):
    path = tmp_path / "mlflow.db"
    with _corrupt(path):
        proc = _train(tmp_path, f"sqlite:///{path}", "lora.r=0")
    line = _one_error_line(proc, "lora.r: must be >= 1, got 0", "file is not a database; the run is not recorded")
    assert line == "error: invalid config:"
