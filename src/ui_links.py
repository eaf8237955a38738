"""Links into the MLflow UI: an experiment's runs table, a run, and a sweep's saved view of its runs."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from collections.abc import Sequence

from src.names import filter_value

# MLflow 3.17's UI opens an experiment in one of two modes, set by a global toggle in its sidebar (GenAI until the user
# switches) or by a link's ``workflowType``; it ignores EXPERIMENT_KIND there. In GenAI mode an experiment opens on an
# empty traces overview, so every UI link the project prints asks for the model-training mode: the runs table.
UI_MODE = {"workflowType": "machine_learning"}


def ui_url(base: str, page: str, **query: str) -> str:
    """A link into the MLflow UI at ``base``, in its model-training mode; ``page`` is a route: ``experiments/1``."""
    return f"{base.rstrip('/')}/#/{page}?{urllib.parse.urlencode({**query, **UI_MODE})}"


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's page: its runs table."""
    return ui_url(base, f"experiments/{experiment_id}")


# The MLflow UI loads a saved runs-table view from the experiment tag SHARED_VIEW_PREFIX + key when its URL has
# ?viewStateShareKey=key: filter, sort and columns (a JSON object; MLflow 3's "share view" writes the same tag).
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
SWEEP_VIEW_PARAMS = ("data.name", "quant.bits", "lora.preset", "lora.resolved_targets", "lora.r", "lora.alpha")
SWEEP_VIEW_METRICS = ("objective", "trainable_params", "peak_gpu_mem_gb", "train_tokens_per_s", "train_runtime_s")


def sweep_view_state(sweep_id: str, objective: str, direction: str, swept: Sequence[str] = ()) -> str:
    """The runs-table view of one sweep: its runs, best first, with the columns a comparison needs."""
    params = list(dict.fromkeys([*SWEEP_VIEW_PARAMS, *swept]))
    metrics = list(dict.fromkeys([SWEEP_VIEW_METRICS[0], objective, *SWEEP_VIEW_METRICS[1:]]))
    return json.dumps(
        {
            "searchFilter": f"tags.sweep_id = {filter_value(sweep_id)}",
            "orderByKey": "metrics.`objective`",
            "orderByAsc": direction == "minimize",
            "selectedColumns": [f"params.`{k}`" for k in params] + [f"metrics.`{k}`" for k in metrics],
        }
    )


def sweep_view_key(sweep_id: str) -> str:
    """The key of a sweep's saved view: the sweep id where MLflow takes it as a tag name and a URL as it is, else
    the id made so with a hash of it (a study may be named ``Bob's study``)."""
    key = re.sub(r"[^0-9A-Za-z_.-]", "_", sweep_id)
    return key if key == sweep_id else f"{key}-{hashlib.sha1(sweep_id.encode()).hexdigest()[:8]}"


def sweep_view_url(base: str, experiment_id: str, sweep_id: str) -> str:
    return ui_url(base, f"experiments/{experiment_id}/runs", viewStateShareKey=sweep_view_key(sweep_id))
