"""One run on several devices: data-parallel (DDP) training, one process per rank.

    python -m src.train data=instructions train.nproc_per_node=2          # relaunches itself on 2 local ranks
    torchrun --standalone --nproc_per_node 2 -m src.train data=instructions   # the same under torchrun, by hand

:func:`relaunch` starts the ranks as ``torchrun --standalone`` would, with every socket on loopback (torchrun's
own stores listen on all interfaces). Every rank trains; rank 0 alone owns the MLflow run (params, metrics,
artifacts, status) and saves the adapter. The other ranks log nothing. A rank that fails writes its error to a
marker file in the run's output directory before it exits, because the launcher then stops rank 0 with SIGTERM,
which alone would read as KILLED: rank 0 finds the marker and ends the run FAILED with the failing rank's error
(``src/tracking.py``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from src.logger import say

MARKER_DIR = "ddp_errors"


def under_torchrun() -> bool:
    """True in a process that torchrun (or another DDP launcher) started."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or a process that is not part of a DDP job: the one that writes to MLflow."""
    return rank() == 0


def finish() -> None:
    """Under DDP, wait for every rank: rank 0 still generates samples, saves and logs when the others are done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def exit_worker() -> None:
    """End a DDP worker whose run is complete (:func:`finish` passed, its MLflow run closed) without the
    interpreter's teardown of the process group.

    Both ways of closing it hang or crash at times, seen in this project's CI with gloo:
    ``destroy_process_group()`` hung for 10 minutes, and a process leaving with the group open aborted
    ("terminate called without an active exception"; pytorch/pytorch#75097 and #179291). Nothing is left
    to do here, so the worker flushes its output and leaves at once with exit code 0.
    """
    if not under_torchrun():
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


LOOPBACK = "127.0.0.1"
# After the first rank fails, the others get SIGTERM (rank 0 then ends the run FAILED); any left after this long are
# killed, as torchrun does.
STOP_GRACE_S = 30.0


def _loopback_interface() -> Optional[str]:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS), for gloo and NCCL to bind to."""
    import socket

    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def worker_env(rank_: int, nproc: int, port: int, run_id: str) -> dict[str, str]:
    """The environment of one local rank: what torchrun gives its workers, with every socket on loopback."""
    env = {
        **os.environ,
        "RANK": str(rank_),
        "LOCAL_RANK": str(rank_),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank_),
        "ROLE_NAME": "default",
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "ROLE_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": LOOPBACK,
        "MASTER_PORT": str(port),
        # The ranks join the launcher's store as clients; none opens a server of its own.
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
    }
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: n ranks with all cores each would oversubscribe them
    interface = _loopback_interface()
    if interface:
        env.setdefault("GLOO_SOCKET_IFNAME", interface)
        env.setdefault("NCCL_SOCKET_IFNAME", interface)
    return env


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m src.train argv`` on ``nproc`` local ranks and return the exit code (128 + n for signal n).

    What ``torchrun --standalone`` does, on loopback only: torchrun's stores listen on every interface, so the
    launcher holds the rendezvous store itself on a socket bound to 127.0.0.1, and gloo and NCCL are pointed at
    the loopback interface. When a rank fails, the others get SIGTERM (rank 0 ends the run FAILED with that
    rank's error, :func:`record_failure`), and are killed after :data:`STOP_GRACE_S`. Ctrl-C reaches every rank
    directly (one process group); SIGTERM is passed on. Runs on several hosts need torchrun itself (README).
    """
    import socket
    import time
    import uuid

    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    store = dist.TCPStore(  # the store owns the socket from here and closes it
        LOOPBACK, port, is_master=True, wait_for_workers=False, multi_tenant=True, master_listen_fd=listener.detach()
    )
    run_id = uuid.uuid4().hex[:12]
    procs = [
        subprocess.Popen([sys.executable, "-u", "-m", "src.train", *argv], env=worker_env(r, nproc, port, run_id))
        for r in range(nproc)
    ]

    def stop(signum: int = signal.SIGTERM) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop())
    except ValueError:  # not the main thread (a joblib worker): signals stay as they are
        previous = None
    failed: Optional[tuple[int, int]] = None  # (rank, exit code) of the first rank to fail
    stopping_since: Optional[float] = None
    try:
        while True:
            try:
                codes = [proc.poll() for proc in procs]
                if failed is None:
                    failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
                    if failed is not None:
                        say(f"error: rank {failed[0]} exited with code {failed[1]}; stopping the others", logging.ERROR)
                        stop()
                        stopping_since = time.monotonic()
                if all(c is not None for c in codes):
                    break
                if stopping_since is not None and time.monotonic() - stopping_since > STOP_GRACE_S:
                    stop(signal.SIGKILL)
                time.sleep(0.1)
            except KeyboardInterrupt:  # the ranks got it too; wait for them to stop
                continue
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        stop(signal.SIGKILL)  # only ranks still running: none, unless this launcher itself is failing
        del store
    code = failed[1] if failed is not None else 0
    return 128 - code if code < 0 else code


def _marker_dir(output_dir: str) -> Path:
    # One directory per launch, so a resumed run in the same output directory sees no old markers.
    return Path(output_dir) / MARKER_DIR / os.environ.get("TORCHELASTIC_RUN_ID", "local")


def record_failure(output_dir: Optional[str], exc: BaseException) -> None:
    """On a rank other than 0: leave the error where rank 0 will look for it."""
    if not output_dir:
        return
    marker = _marker_dir(output_dir) / f"rank{rank()}.json"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"rank": rank(), "error_type": type(exc).__name__, "error": str(exc)}))
    except OSError as write_error:
        say(f"note: rank {rank()} could not record its failure: {write_error}", logging.WARNING)


def peer_failures(output_dir: Optional[str]) -> list[dict[str, Any]]:
    """The errors other ranks of this launch recorded, by rank."""
    if not output_dir or not under_torchrun():
        return []
    directory = _marker_dir(output_dir)
    failures = []
    for marker in sorted(directory.glob("rank*.json")) if directory.is_dir() else []:
        try:
            failures.append(json.loads(marker.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(failures, key=lambda failure: failure["rank"])


def one_gpu_per_process(args):
    """Keep HF's Trainer off ``nn.DataParallel``: one process trains on one GPU; more GPUs are DDP's.

    A process that sees k > 1 GPUs outside torchrun makes the Trainer wrap the model in
    ``nn.DataParallel`` and multiply the batch by k: a silent change of the optimizer step (and, for a
    flat row that cannot be split, k times the examples on one GPU). The model sits on one GPU
    (``src.modeling.load_model``), so the run trains there with the configured batch;
    ``train.nproc_per_node`` uses several. Returns ``args``.
    """
    if args.n_gpu > 1:  # n_gpu sets the devices up first; the Trainer itself does this for model-parallel models
        args._n_gpu = 1
    return args


def ddp_training_kwargs() -> dict[str, Any]:
    """The ``TrainingArguments`` a run under torchrun needs (none otherwise); src.training and src.bench share them."""
    if world_size() <= 1:
        return {}
    import torch

    kwargs: dict[str, Any] = {"ddp_find_unused_parameters": False}  # frozen base weights get no gradient by design
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # DDP on CPU: accelerate sets up gloo only when told the run is on CPU
    return kwargs


def average_gradients(grads: list) -> None:
    """Average gradient tensors over the ranks in place, as DDP does: one all-reduce per dtype.

    For steps whose backward DDP's hooks do not see (a CUDA graph replay, :class:`src.engine.graphs.GraphedSteps`).
    The gradients are flattened into one buffer per dtype, reduced in that dtype (as DDP reduces in the
    parameters' dtype), divided by the world size and copied back.
    """
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    by_dtype: dict[Any, list] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for group in by_dtype.values():
        flat = torch.cat([grad.reshape(-1) for grad in group])
        dist.all_reduce(flat)
        flat.div_(world)
        for grad, part in zip(group, flat.split([grad.numel() for grad in group])):
            grad.copy_(part.view_as(grad))
