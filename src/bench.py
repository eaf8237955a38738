"""``python -m src.bench``: the benchmarks of the top-level ``benchmarks`` package, under the name users type.

    python -m src.bench --device cpu --workload tiny --examples 16   # smoke test: the code paths, not the numbers

Same as ``python -m benchmarks``; see ``docs/benchmarks.md`` for the workloads and ``benchmarks/results/`` for what
they measured.
"""

import sys

from benchmarks.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
