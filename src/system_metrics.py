"""MLflow's system metrics for a run (``tracking.system_metrics``): GPU utilisation and memory, CPU, memory, disk
and network, sampled by a thread of MLflow's every 10 s ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) and logged as
``system/...`` metrics, e.g. ``system/gpu_0_utilization_percentage``.

NVML numbers the machine's GPUs whatever ``CUDA_VISIBLE_DEVICES`` hides, so a run logs every GPU of its host; the
run's ``cuda_visible_devices`` tag says which are its own (:func:`src.runs.system_metrics.gpu_utilization`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Optional

log = logging.getLogger("src")


def wanted(setting: Optional[bool]) -> bool:
    """Whether a run logs system metrics: ``setting`` if given, else whether a CUDA GPU is here (and psutil, which
    MLflow's monitor refuses to start without, a declared dependency that an older environment may lack)."""
    if setting is not None:
        return setting
    import torch

    # NVML's count: CUDA is not started (a sweeper's process forks trials).
    return torch.cuda.device_count() > 0 and importlib.util.find_spec("psutil") is not None


@functools.cache
def warn_if_gpu_unseen() -> None:
    """Once a process: on a GPU machine without NVML's Python bindings, MLflow logs no GPU metric and says so at
    debug level only."""
    import torch

    if torch.cuda.device_count() > 0 and importlib.util.find_spec("pynvml") is None:
        log.warning(
            "note: tracking.system_metrics logs no GPU metric: nvidia-ml-py is not installed "
            "(pip install nvidia-ml-py, or the project's [gpu] extra); CPU, memory, disk and network are logged"
        )
