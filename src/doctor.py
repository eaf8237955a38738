"""Find MLflow runs left RUNNING by a process that died without closing them, and mark them KILLED.

    python -m src.doctor                                   # the project's store
    python -m src.doctor --tracking-uri sqlite:///mlflow.db --experiment lora-sweeps --dry-run

How a run is found stale: :mod:`src.sweeps.stale`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from src import tracking
from src.logger import say
from src.sweeps.stale import STALE_AFTER_S, mark_stale_runs


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None, help="Else $MLFLOW_TRACKING_URI, else the project's store.")
    parser.add_argument("--experiment", default=None, help="Only this experiment (default: all).")
    parser.add_argument("--stale-after-s", type=float, default=STALE_AFTER_S, help="Heartbeat age limit.")
    parser.add_argument("--dry-run", action="store_true", help="List the stale runs without marking them.")
    args = parser.parse_args(argv)
    uri = tracking.tracking_uri(args.tracking_uri)
    stale = mark_stale_runs(uri, args.experiment, args.stale_after_s, args.dry_run)
    for run in stale:
        verb = "stale (not marked, --dry-run)" if args.dry_run else f"marked {run.status}"
        print(f"{run.run_id}  {run.run_name}: {verb}: {run.reason}")
    statuses = sorted({run.status for run in stale}) or ["KILLED"]
    verb = "stale (not marked, --dry-run)" if args.dry_run else f"marked {' or '.join(statuses)}"
    say(f"{len(stale)} run(s) {verb} in {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
