"""A real ``mlflow server`` on loopback, over a store made by real training runs, read back through the REST API.

This is what the MLflow UI and any other client see: params, metrics and their history, the
sweep's parent/child link, and the adapter artifacts, listed and downloaded over plain HTTP.
``serve_mlflow`` is shared with the slow-tier browser test (tests/integration/test_browser.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import compose_config

SERVER_START_TIMEOUT_S = 90

# Two real training runs plus a server start take about a minute on 2 CPU cores.
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlflow_executable() -> str:
    """The ``mlflow`` script of the interpreter running the tests, so the server is the installed MLflow."""
    script = Path(sys.executable).with_name("mlflow")
    return str(script) if script.exists() else "mlflow"


@contextlib.contextmanager
def serve_mlflow(backend_uri: str, artifact_root: Path, log_path: Path) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 until the block ends; yield its base URL.

    Waits (bounded) for ``/health``; the server and its workers are always terminated, as one
    process group, and its output is kept in ``log_path`` for a failing test to show.
    """
    port = free_port()
    cmd = [
        mlflow_executable(),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_uri,
        "--default-artifact-root",
        artifact_root.as_uri(),
    ]
    base = f"http://127.0.0.1:{port}"
    # The GenAI job runner starts a dozen worker processes that reading runs does not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with {server.returncode}:\n{log_path.read_text()}")
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server not ready in {SERVER_START_TIMEOUT_S}s:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield base
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=15)


def get_json(base: str, route: str, **query) -> dict:
    url = f"{base}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def post_json(base: str, route: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}{route}", data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def get_bytes(base: str, route: str, **query) -> bytes:
    with urllib.request.urlopen(f"{base}{route}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return response.read()


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory):
    """Two real training runs of the tiny model: one standalone, one the child of a sweep parent."""
    import mlflow

    from src import tracking
    from tests.conftest import train_run

    root = tmp_path_factory.mktemp("trained_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("server-test", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="sweep-parent", tags={"sweep_id": "sweep-1"}).info.run_id
    objectives = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for name, env in (
            ("standalone", {}),
            ("child", {tracking.PARENT_RUN_ENV: parent, tracking.SWEEP_ID_ENV: "sweep-1"}),
        ):
            for key, value in env.items():
                mp.setenv(key, value)
            raw = compose_config(
                [
                    "train.max_steps=2",
                    "train.logging_steps=1",
                    "train.eval_strategy=no",
                    "data.subsample=32",
                    "data.eval_fraction=0.02",
                    "tracking.experiment=server-test",
                    f"tracking.run_name={name}",
                ]
            )
            raw["output_dir"] = str(root / name)
            objectives[name] = train_run(raw)
    client.set_terminated(parent, "FINISHED")
    while mlflow.active_run():
        mlflow.end_run()
    return {"uri": uri, "root": root, "experiment_id": experiment_id, "parent": parent, "objectives": objectives}


@pytest.fixture(scope="module")
def server(trained_store):
    root = trained_store["root"]
    with serve_mlflow(trained_store["uri"], root / "server-artifacts", root / "server.log") as base:
        yield base


def test_rest_api_reads_back_params_metrics_links_and_artifacts(trained_store, server):
    found = post_json(
        server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [trained_store["experiment_id"]], "max_results": 10}
    )
    runs = {r["info"]["run_name"]: r for r in found["runs"]}
    assert set(runs) == {"sweep-parent", "standalone", "child"}
    assert {name: r["info"]["status"] for name, r in runs.items()} == {
        "sweep-parent": "FINISHED",
        "standalone": "FINISHED",
        "child": "FINISHED",
    }

    def as_dict(run: dict, field: str) -> dict:
        return {item["key"]: item["value"] for item in run["data"].get(field, [])}

    # The parent/child link and the sweep tag, as the UI nests them.
    parent_id = trained_store["parent"]
    assert runs["sweep-parent"]["info"]["run_id"] == parent_id
    child_tags, standalone_tags = as_dict(runs["child"], "tags"), as_dict(runs["standalone"], "tags")
    assert child_tags["mlflow.parentRunId"] == parent_id and child_tags["sweep_id"] == "sweep-1"
    assert "mlflow.parentRunId" not in standalone_tags and "sweep_id" not in standalone_tags
    found = post_json(
        server,
        "/api/2.0/mlflow/runs/search",
        {"experiment_ids": [trained_store["experiment_id"]], "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'"},
    )
    assert [r["info"]["run_name"] for r in found["runs"]] == ["child"]

    for name in ("standalone", "child"):
        run_id = runs[name]["info"]["run_id"]
        params = as_dict(runs[name], "params")
        assert {
            k: params[k]
            for k in (
                "model.name",
                "data.task",
                "quant.bits",
                "lora.preset",
                "lora.r",
                "lora.alpha",
                "lora.resolved_targets",
                "train.max_steps",
                "data.subsample",
            )
        } == {
            "model.name": "tiny",
            "data.task": "classification",
            "quant.bits": "16",
            "lora.preset": "attn_qv",
            "lora.r": "8",
            "lora.alpha": "16",
            "lora.resolved_targets": "q_proj,v_proj",
            "train.max_steps": "2",
            "data.subsample": "32",
        }
        metrics = as_dict(runs[name], "metrics")
        assert metrics["objective"] == pytest.approx(trained_store["objectives"][name])
        assert metrics["objective"] == metrics["eval_f1_macro"]
        assert metrics["trainable_pct"] == pytest.approx(100 * metrics["trainable_params"] / metrics["total_params"])
        assert 0 < metrics["trainable_params"] < metrics["total_params"]
        history = get_json(server, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train_loss")
        assert [m["step"] for m in history["metrics"]] == [1, 2]

        # The adapter, listed and downloaded through the server.
        listing = get_json(server, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="adapter")
        files = {Path(f["path"]).name: f for f in listing["files"]}
        assert {"adapter_config.json", "adapter_model.safetensors", "label_map.json"} <= set(files)
        assert not any(f["is_dir"] for f in files.values())
        config = json.loads(get_bytes(server, "/get-artifact", run_uuid=run_id, path="adapter/adapter_config.json"))
        assert config["peft_type"] == "LORA" and config["r"] == 8
        targets = re.compile(config["target_modules"])  # the attn_qv preset, as a regex over module paths
        assert targets.fullmatch("model.layers.1.self_attn.q_proj")
        assert targets.fullmatch("model.layers.0.self_attn.v_proj")
        assert not targets.fullmatch("model.layers.0.self_attn.k_proj")
        label_map = json.loads(get_bytes(server, "/get-artifact", run_uuid=run_id, path="adapter/label_map.json"))
        assert label_map["task"] == "classification" and label_map["labels"]
        weights = get_bytes(server, "/get-artifact", run_uuid=run_id, path="adapter/adapter_model.safetensors")
        assert len(weights) == int(files["adapter_model.safetensors"]["file_size"])
        (header_len,) = struct.unpack("<Q", weights[:8])
        tensors = json.loads(weights[8 : 8 + header_len])
        assert any("lora_A" in key for key in tensors) and any("lora_B" in key for key in tensors)


def test_compare_reads_the_real_runs(trained_store, tmp_path, capsys, monkeypatch):
    """src.compare on runs written by real training: the names it reads are the ones training logs."""
    import mlflow

    from src.runs import compare

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_store["uri"])
    assert compare.main(["--format", "json", "--plot", str(tmp_path / "sweep.png")]) == 0  # the newest sweep
    out, err = capsys.readouterr()
    (row,) = json.loads(out)["rows"]
    client = mlflow.MlflowClient(trained_store["uri"])
    (child,) = client.search_runs([trained_store["experiment_id"]], "attributes.run_name = 'child'")
    metrics = child.data.metrics
    assert row["run_ids"] == [child.info.run_id] and row["best"] is True
    assert {k: row[k] for k in ("run", "model", "task", "bits", "targets", "r", "alpha", "seeds", "status")} == {
        "run": "child",
        "model": "tiny",
        "task": "classification",
        "bits": 16,
        "targets": "q_proj,v_proj",
        "r": 8,
        "alpha": 16,
        "seeds": [42],
        "status": "FINISHED",
    }
    assert row["eval_f1_macro"] == pytest.approx(trained_store["objectives"]["child"])
    assert row["trainable_params_m"] == pytest.approx(metrics["trainable_params"] / 1e6)
    assert row["train_runtime_s"] == pytest.approx(metrics["train_runtime_s"])
    assert row["peak_gpu_mem_gb"] is None  # CPU
    logged = {f.path for f in client.list_artifacts(trained_store["parent"], "compare")}
    assert logged == {"compare/sweep.png", "compare/sweep_curves.png"}
    assert "skipped sweep_memory.png" in err
