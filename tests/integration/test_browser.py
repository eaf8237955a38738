"""The MLflow UI in headless Chromium (Debian's ``chromium``) lists the runs of an experiment.

Slow tier: ``pytest -m slow tests/integration/test_browser.py``. Skips when ``chromium`` is not installed
(``apt-get install -y chromium``). The screenshot is kept in ``tests/artifacts/``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_mlflow_server import serve_mlflow

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
]
# name -> objective; the UI is asked to sort by it, best first.
RUNS = {"ui-child-r16": 0.9, "ui-standalone": 0.7, "ui-child-r4": 0.5}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    return path


def render(chromium: str, url: str, profile: Path, screenshot: Path, budget_ms: int, size: str = "") -> str:
    """The page's DOM once its scripts have run ``budget_ms`` of virtual time; also writes a screenshot.
    ``size`` ("W,H") widens the window: the runs table renders only the columns that fit."""
    flags = [f for f in CHROMIUM_FLAGS if not (size and f.startswith("--window-size="))]
    flags += [f"--window-size={size}"] if size else []
    done = subprocess.run(
        [
            chromium,
            *flags,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_experiment_page_lists_the_runs(chromium, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("ui-test", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="ui-sweep-parent", tags={"sweep_id": "ui"}).info.run_id
    for name, objective in RUNS.items():
        tags = {"sweep_id": "ui", "mlflow.parentRunId": parent} if "child" in name else {}
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        client.log_param(run_id, "lora.r", name.rsplit("r", 1)[-1] if "child" in name else "8")
        client.log_metric(run_id, "objective", objective)
        client.set_terminated(run_id)
    client.set_terminated(parent)

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "mlflow_experiment_page.png"
    screenshot.unlink(missing_ok=True)
    # The experiment's landing tab is the GenAI overview, and its runs tab nests children under a
    # collapsed parent when sorted by date; sorted by a metric, every run is a row of its own.
    with serve_mlflow(uri, tmp_path / "server-artifacts", tmp_path / "server.log") as base:
        url = f"{base}/#/experiments/{experiment_id}/runs?orderByKey=metrics.%60objective%60&orderByAsc=false"
        names = [*RUNS, "ui-sweep-parent"]
        for attempt, budget_ms in enumerate((15_000, 30_000, 60_000)):  # a loaded machine renders slower
            started = time.monotonic()
            dom = render(chromium, url, tmp_path / f"profile{attempt}", screenshot, budget_ms)
            if all(name in dom for name in names):
                break
        print(f"\nMLflow UI screenshot: {screenshot} (rendered in {time.monotonic() - started:.1f}s)")

    missing = [name for name in names if name not in dom]
    assert not missing, f"runs not listed in the UI: {missing}; see {screenshot}"
    # Listed best first, as asked, with the parent (no objective) last.
    order = sorted(names, key=lambda name: re.search(re.escape(name) + r"\b", dom).start())
    assert order == ["ui-child-r16", "ui-standalone", "ui-child-r4", "ui-sweep-parent"]
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_a_sweeps_one_click_view_shows_its_runs_with_the_sweep_columns(chromium, tmp_path):
    """A real 2-job grid sweep; the URL its summary prints (``compare in the UI: ...``) opens the runs table on
    the sweep's runs, best first, with lora.r, quant.bits, the targets, the objective and trainable_params as
    columns, none picked by hand. The screenshot is kept in tests/artifacts/mlflow_sweep_view.png."""
    import os
    import sys

    from tests.conftest import ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = subprocess.run(
        [sys.executable, "-m", "src.train", "--multirun", "model=tiny", "lora.r=4,8", "train.max_steps=2",
         "train.logging_steps=1", "data.subsample=32", "data.eval_subsample=16", f"hydra.sweep.dir={tmp_path / 'm'}"],
        cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-3000:]
    (link,) = re.findall(r"compare in the UI: (http://127\.0\.0\.1:5000/\S+)", sweep.stdout)
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "mlflow_sweep_view.png"
    screenshot.unlink(missing_ok=True)
    columns = ["lora.r", "quant.bits", "lora.resolved_targets", "objective", "trainable_params", "eval_f1_macro"]
    names = ["tiny-topics-16bit-attn_qv-r4-a16", "tiny-topics-16bit-attn_qv-r8-a16"]
    with serve_mlflow(uri, tmp_path / "server-artifacts", tmp_path / "server.log") as base:
        url = link.replace("http://127.0.0.1:5000", base)
        for attempt, budget_ms in enumerate((15_000, 30_000, 60_000)):  # a loaded machine renders slower
            dom = render(chromium, url, tmp_path / f"profile{attempt}", screenshot, budget_ms, size="3000,900")
            if all(c in dom for c in columns) and all(n in dom for n in names):
                break
    print(f"\nMLflow sweep view screenshot: {screenshot}")
    missing = [c for c in columns if c not in dom] + [n for n in names if n not in dom]
    assert not missing, f"not shown in the sweep's view: {missing}; see {screenshot}"
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_the_projects_links_open_the_runs_table_not_the_genai_overview(chromium, tmp_path):
    """MLflow 3.17 opens an experiment in GenAI mode, on an empty traces overview, whatever its type; the links the
    project prints (an experiment's, a run's) open in model-training mode. Screenshot: tests/artifacts/."""
    import mlflow

    from src import console, tracking, ui_links

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment("ui-kind", uri)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(experiment_id, run_name="ui-kind-run").info.run_id
    client.log_metric(run_id, "objective", 0.9)
    client.set_terminated(run_id)

    ARTIFACTS.mkdir(exist_ok=True)
    with serve_mlflow(uri, tmp_path / "server-artifacts", tmp_path / "server.log") as base:
        pages = {
            "mlflow_experiment_runs_table.png": (ui_links.experiment_url(base, experiment_id), "Run Name"),
            "mlflow_run_page.png": (console.view_hint(base, experiment_id, run_id), "Model metrics"),
        }
        for name, (url, shown) in pages.items():
            screenshot = ARTIFACTS / name
            for attempt, budget_ms in enumerate((15_000, 30_000, 60_000)):  # a loaded machine renders slower
                dom = render(chromium, url, tmp_path / f"profile-{name}{attempt}", screenshot, budget_ms)
                if shown in dom and "ui-kind-run" in dom:
                    break
            assert shown in dom and "ui-kind-run" in dom, f"{url} does not show {shown!r}; see {screenshot}"
            # The GenAI overview's own words, and its sidebar's.
            genai = [text for text in ("Detect Issues", "No data available", ">Sessions<", ">Judges<") if text in dom]
            assert not genai, f"{url} opened in GenAI mode ({genai}); see {screenshot}"
