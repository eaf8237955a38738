"""Compare runs: one table with the best run and the Pareto front marked, and plots.

    python -m src.compare                                    # the newest sweep, else the newest runs
    python -m src.compare --sweep SWEEP_ID --format csv > sweep.csv
    python -m src.compare --experiment lora-sweeps --metric eval_accuracy --sort eval_accuracy
    python -m src.compare --pareto quality:max,params:min --plot sweep.png

The implementation: :mod:`src.runs.compare`.
"""

from __future__ import annotations

import sys

from src.runs.compare import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
