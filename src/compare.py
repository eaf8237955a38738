"""Compare runs: one table with the best run and the Pareto front marked, and plots.

    python -m src.compare                                    # the newest sweep, else the newest runs
    python -m src.compare --sweep SWEEP_ID --format csv > sweep.csv
    python -m src.compare --experiment lora-sweeps --metric eval_accuracy --sort eval_accuracy
    python -m src.compare --pareto quality:max,params:min --plot sweep.png
    python -m src.compare --sweep SWEEP_ID --importance      # an Optuna study: which params mattered

The implementation: :mod:`src.runs.compare`; ``--importance``: :mod:`src.sweeps.importance`.
"""

from __future__ import annotations

import sys
from typing import Optional

from src.errors import run_cli
from src.logger import say
from src.runs.compare import build_parser, compare
from src.sweeps.importance import TABLE, sweep_importance
from src.tracking import tracking_uri

__all__ = ["main"]


def importance(sweep_id: str, uri: Optional[str]) -> str:
    """The importance table of the Optuna study ``sweep_id``, logged again to its parent run."""
    found, run_id = sweep_importance(sweep_id, tracking_uri(uri))
    say(f"logged {TABLE}, the importance metrics and plots to parent run {run_id}")
    return found.table().rstrip()


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    parser.add_argument(
        "--importance",
        action="store_true",
        help="With --sweep (an Optuna study): print its param importances (Optuna's default evaluator) and log "
        "them, with the slice and contour plots, to its parent run.",
    )
    args = parser.parse_args(argv)
    if args.importance and not args.sweep:
        parser.error("--importance needs --sweep SWEEP_ID (an Optuna study's)")
    return run_cli(lambda: print(importance(args.sweep, args.tracking_uri) if args.importance else compare(args)))


if __name__ == "__main__":
    sys.exit(main())
