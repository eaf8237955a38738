"""Output directories (src.outputs): a taken one is never handed out again, one under a file fails the run."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.conftest import compose_config
from tests.unit.test_tracking import FAST, _failed_run


def test_output_dir_under_a_regular_file_fails_the_run_with_the_path(tmp_path, mlflow_store):
    (tmp_path / "a-file").write_text("not a directory")
    raw = compose_config(FAST)
    raw["output_dir"] = str(tmp_path / "a-file" / "out")
    run_ = _failed_run(raw, mlflow_store)
    assert run_.data.tags["error_type"] in ("FileExistsError", "NotADirectoryError")
    assert "a-file" in run_.data.tags["error"]


def test_a_taken_output_directory_is_never_handed_out_again(tmp_path):
    from src.outputs import allocate_dir, unique_dir

    base = str(tmp_path / "2026-12-07" / "12-00-00-tiny-topics")
    assert allocate_dir(base) == base
    assert allocate_dir(base) == f"{base}-2"
    (tmp_path / "2026-12-07" / "12-00-00-tiny-topics-3").mkdir()  # taken by a run of another machine
    assert allocate_dir(base) == f"{base}-4"

    racing = str(tmp_path / "race" / "12-00-00")
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(allocate_dir(racing))) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(got)) == 16 and all(Path(p).is_dir() for p in got)

    once = str(tmp_path / "resolved-twice")
    assert unique_dir(once) == unique_dir(once) == once  # one process resolving its config again: the same dir


def test_the_default_run_and_sweep_directories_are_allocated_uniquely():
    from omegaconf import OmegaConf

    from tests.conftest import compose_hydra

    hydra = OmegaConf.to_container(compose_hydra().hydra, resolve=False)
    assert hydra["run"]["dir"].startswith("${unique_dir:outputs/${now:"), hydra["run"]
    assert hydra["sweep"]["dir"].startswith("${unique_dir:multirun/${now:"), hydra["sweep"]
