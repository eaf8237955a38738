"""How busy a run kept its GPUs: the mean of the utilisation MLflow's system metrics sampled
(``tracking.system_metrics``, :mod:`src.system_metrics`), for ``src.compare``'s ``GPU util %`` column.

NVML numbers every GPU of the host, whatever ``CUDA_VISIBLE_DEVICES`` hides, so a run logs them all; its own are
those its ``cuda_visible_devices`` tag lists (as the sweeper pinned it). Without the tag, or where it names GPUs by
UUID, every GPU the run logged counts.
"""

from __future__ import annotations

import re
import statistics
from typing import Optional

GPU_UTILIZATION = re.compile(r"system/gpu_(\d+)_utilization_percentage")


def own_gpus(tags: dict[str, str]) -> Optional[set[int]]:
    """The NVML indices of the run's GPUs from its ``cuda_visible_devices`` tag; None: unknown (count them all)."""
    visible = tags.get("cuda_visible_devices")
    if visible is None:
        return None
    items = [item.strip() for item in visible.split(",") if item.strip()]
    return {int(item) for item in items} if all(item.isdigit() for item in items) else None


def gpu_utilization(client, run) -> Optional[float]:
    """The mean of every utilisation sample (%) of the run's own GPUs; None where it logged none (a CPU run, system
    metrics off, or nvidia-ml-py missing)."""
    logged = {int(match[1]): key for key in run.data.metrics if (match := GPU_UTILIZATION.fullmatch(key))}
    own = own_gpus(run.data.tags)
    keys = [key for index, key in sorted(logged.items()) if own is None or index in own]
    samples = [m.value for key in keys for m in client.get_metric_history(run.info.run_id, key)]
    return statistics.fmean(samples) if samples else None
