"""One run on two processes under DDP (torchrun; gloo on CPU), and GPU placement of DDP jobs in sweeps.

Each end-to-end test relaunches ``python -m src.train ... train.nproc_per_node=2`` under torchrun on
the tiny model: about 40 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import torch

from src import modeling
from src.config import validate
from src.data import load_data
from tests.conftest import ROOT, compose_config
from tests.integration.ddp_workers import average_gradients_rank
from tests.unit.test_distributed import DDP


def _train(tmp_path: Path, overrides: list[str], env: dict[str, str] | None = None):
    """``python -m src.train`` as a subprocess; returns it and every MLflow run of the store."""
    cmd = [sys.executable, "-m", "src.train", *DDP, *overrides, f"hydra.run.dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return proc, runs


def _steps(run_id: str, metric: str = "train_loss") -> list[int]:
    return [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, metric)]


def _artifacts(run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)}


def test_sft_run_under_ddp_is_one_finished_run_with_the_adapter(tmp_path, mlflow_store):
    proc, runs = _train(tmp_path, ["data=instructions", "data.num_sample_prompts=1"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 1 created no run
    run_ = runs[0]
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.world_size"] == "2" and run_.data.params["train.nproc_per_node"] == "2"
    assert _steps(run_.info.run_id) == [1, 2]  # the ranks split the data: 16 rows / (2 ranks x 4)
    assert {"adapter", "config.yaml", "samples.json"} <= _artifacts(run_.info.run_id)
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= _artifacts(
        run_.info.run_id, "adapter"
    )
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()  # one output dir for both ranks
    assert not (tmp_path / "out" / "ddp_errors").exists()


@pytest.mark.slow  # DDP end to end: test_sft_run_under_ddp_is_one_finished_run_with_the_adapter
def test_classification_run_under_ddp_counts_the_tokens_of_both_ranks(tmp_path, mlflow_store):
    proc, runs = _train(tmp_path, [])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_ = runs[0]
    assert run_.data.params["train.world_size"] == "2"
    assert _steps(run_.info.run_id) == [1, 2]
    assert "eval_f1_macro" in run_.data.metrics and "objective" in run_.data.metrics
    assert "classification_report.json" in _artifacts(run_.info.run_id)
    # Every training row is seen once, half on each rank; train_tokens counts both halves.
    cfg = validate(compose_config(DDP))
    tokenizer = modeling.load_tokenizer(cfg.model)
    data = load_data(cfg.data, tokenizer, cfg.model.max_length)
    lengths = [min(len(ids), cfg.model.max_length) for ids in tokenizer(list(data.train["text"]))["input_ids"]]
    assert data.train.num_rows == 16
    assert run_.data.metrics["train_tokens"] == sum(lengths)


@pytest.mark.slow  # DDP end to end: test_sft_run_under_ddp_is_one_finished_run_with_the_adapter
def test_a_failure_on_rank_1_ends_the_run_failed_and_the_launcher_nonzero(tmp_path, mlflow_store):
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os

            if os.environ.get("RANK") == "1":  # only the second DDP worker
                from transformers import Trainer

                def training_step(self, *args, **kwargs):
                    raise RuntimeError("injected failure on rank 1")

                Trainer.training_step = training_step
            """
        )
    )
    proc, runs = _train(tmp_path, [], env={"PYTHONPATH": str(fault)})
    assert proc.returncode != 0
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run_ = runs[0]
    assert run_.info.status == "FAILED"
    assert run_.data.tags["error_type"] == "RuntimeError"
    assert run_.data.tags["error"] == "rank 1: injected failure on rank 1"
    assert "adapter" not in _artifacts(run_.info.run_id)


@pytest.mark.slow  # DDP end to end: test_sft_run_under_ddp_is_one_finished_run_with_the_adapter
def test_ddp_sft_loss_is_the_token_mean_over_both_ranks(tmp_path, mlflow_store):
    """HF divides each rank's loss by the token count of all ranks; the packed trainer must scale it back up by
    the rank count, as ``Trainer.compute_loss`` does, or the loss and gradients under DDP shrink by half.

    With a learning rate of 1e-12 the model does not change, so the mean training loss over the same 16 rows
    differs between one process and two only by how the rows are grouped into steps (a few %), not 2x.
    """
    common = ["data=instructions", "data.num_sample_prompts=1", "train.learning_rate=1e-12"]
    proc, _ = _train(tmp_path / "ddp", common)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = [
        sys.executable, "-m", "src.train", *[o for o in DDP if "nproc" not in o and "per_device" not in o], *common,
        "train.per_device_train_batch_size=8", f"hydra.run.dir={tmp_path / 'single'}",
    ]  # fmt: skip
    done = subprocess.run(single, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    loss = {r.data.params["train.world_size"]: r.data.metrics["train_loss_mean"] for r in runs}
    assert set(loss) == {"1", "2"}
    assert abs(loss["2"] - loss["1"]) / loss["1"] < 0.15, loss
    # The packed trainer counts tokens on the host and sums the ranks' counts when it logs: the same rows, the same sum.
    tokens = {r.data.params["train.world_size"]: r.data.metrics["train_tokens"] for r in runs}
    assert tokens["2"] == tokens["1"] > 0, tokens


def test_average_gradients_gives_ddps_gradients(tmp_path):
    """What the packed trainer's CUDA-graph steps use under DDP instead of DDP's hooks (``src.engine.graphs``)."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workers = mp.spawn(average_gradients_rank, args=(port, str(tmp_path)), nprocs=2, join=False)
    written = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    deadline = time.time() + 300
    while not workers.join(timeout=1) and time.time() < deadline:  # a worker that raised fails the test here
        if all(path.exists() for path in written):  # a gloo worker can hang in its teardown after its result
            break
    for process in workers.processes:
        if process.is_alive():
            process.kill()
    results = [torch.load(path) for path in written]
    for rank in (0, 1):
        got = results[rank]
        for ref, avg in zip(got["reference"], got["averaged"]):
            torch.testing.assert_close(avg, ref)
        assert any(not torch.allclose(a, b) for a, b in zip(got["local"], got["reference"]))  # averaging did something
        assert got["mixed"][0].dtype == torch.bfloat16 and got["mixed"][0].tolist() == [0.5] * 3
        assert got["mixed"][1].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def _listening(pids: set[int]) -> set[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket of these processes."""
    import psutil

    found = set()
    for pid in pids:
        try:
            process = psutil.Process(pid)
            connections = getattr(process, "net_connections", process.connections)(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(c.laddr.ip, c.laddr.port, pid) for c in connections if c.status == psutil.CONN_LISTEN}
    return found


@pytest.mark.slow  # DDP end to end: test_sft_run_under_ddp_is_one_finished_run_with_the_adapter
def test_a_local_ddp_run_listens_on_loopback_only(tmp_path, mlflow_store):
    """``train.nproc_per_node=2`` opens its rendezvous store and the ranks' gloo sockets on loopback. Under
    ``torchrun --standalone`` the store listened on every interface (``*:PORT``): anyone on the network could
    join or disturb the run's rendezvous."""
    import psutil

    log = tmp_path / "ddp.log"
    args = [o for o in DDP if not o.startswith(("train.max_steps", "train.num_train_epochs"))]
    cmd = [sys.executable, "-m", "src.train", *args, "train.max_steps=400", f"hydra.run.dir={tmp_path / 'out'}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seen: set[tuple[str, int, int]] = set()
    try:
        deadline = time.monotonic() + 300
        ranks_seen = False
        while time.monotonic() < deadline and proc.poll() is None:
            tree = {proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))}
            seen |= _listening(tree)
            ranks_seen = ranks_seen or len(tree) >= 3
            if ranks_seen and "step 3/" in log.read_text():  # both ranks are past their rendezvous, training
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the DDP run did not reach step 3 (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
    finally:
        proc.terminate()  # SIGTERM: passed on to the ranks, the run ends KILLED
        proc.wait(timeout=120)
    assert seen, "no listening socket seen: the rendezvous store must have one"
    assert {ip for ip, _, _ in seen} <= {"127.0.0.1", "::1"}, sorted(seen)


@pytest.mark.slow  # DDP end to end: test_sft_run_under_ddp_is_one_finished_run_with_the_adapter
def test_a_sweep_job_with_two_ranks_is_one_finished_child_run(tmp_path, mlflow_store):
    """A grid job with ``train.nproc_per_node=2``: the sweep launches its ranks, finds rank 0's run by its
    output_dir tag and records it as the job's (src.sweeps.job's DDP path)."""
    args = [o for o in DDP if not o.startswith(("train.max_steps", "train.num_train_epochs"))]
    cmd = [sys.executable, "-m", "src.train", "--multirun", *args, "train.max_steps=2", "lora.r=4",
           f"hydra.sweep.dir={tmp_path / 'm'}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED" and child.data.params["train.world_size"] == "2"
    assert "job 1/1 (#0) FINISHED eval_f1_macro=" in done.stdout, done.stdout[-3000:]


@pytest.mark.slow  # two DDP runs end to end and two single-process ones: about 2-3 minutes on 2 cores
@pytest.mark.parametrize(
    "overrides",
    [["data.class_weights=[0.2,1.0,8.0]"], ["data=topics_multilabel", "train.fast_path=false"]],
    ids=["class-weights-fast", "pos-weight-padded"],
)
def test_a_classifiers_step_over_two_ranks_and_accumulation_is_one_batchs_step(tmp_path, mlflow_store, overrides):
    """All 16 rows in one optimizer step: 2 ranks x 2 micro-batches of 4, or one process with one batch of 16. The
    loss is normalised by both ranks' weight total, so the logged loss and gradient norm and the saved adapter (plain
    SGD: the update is the gradient) are the one batch's."""
    from safetensors.torch import load_file

    step = ["train.optim=sgd", "train.lr_scheduler_type=constant", "train.warmup_steps=0", "train.max_grad_norm=1e6"]
    proc, _ = _train(tmp_path / "ddp", [*step, *overrides, "train.gradient_accumulation_steps=2", "lora.dropout=0.0"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = [o for o in DDP if "nproc" not in o and "per_device" not in o]
    cmd = [sys.executable, "-m", "src.train", *single, *step, *overrides, "lora.dropout=0.0",
           "train.per_device_train_batch_size=16", f"hydra.run.dir={tmp_path / 'single' / 'out'}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    client = mlflow.MlflowClient()
    runs = {
        r.data.params["train.world_size"]: r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
    }
    assert set(runs) == {"1", "2"}
    for metric in ("train_loss", "grad_norm"):
        (ddp,), (one,) = (client.get_metric_history(runs[w].info.run_id, metric) for w in ("2", "1"))
        assert ddp.step == one.step == 1 and ddp.value == pytest.approx(one.value, rel=1e-5), metric
    adapters = [
        load_file(tmp_path / name / "out" / "adapter" / "adapter_model.safetensors") for name in ("ddp", "single")
    ]
    assert adapters[0].keys() == adapters[1].keys()
    for name, weight in adapters[1].items():
        torch.testing.assert_close(adapters[0][name], weight, atol=1e-5, rtol=1e-5, msg=name)
