"""``python -m benchmarks`` (or ``python -m src.bench``): one workload family per module, chosen by ``--workload``."""

from __future__ import annotations

import sys
from typing import Optional

from benchmarks.makespan import MAKESPAN_WORKLOADS, makespan_main
from benchmarks.packs import PACK_WORKLOADS, pack_main
from benchmarks.sft import main as sft_main


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    workloads = [a.split("=", 1)[1] for a in argv if a.startswith("--workload=")]
    workloads += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--workload"]
    if any(w in PACK_WORKLOADS for w in workloads):
        return pack_main(argv)
    if any(w in MAKESPAN_WORKLOADS for w in workloads):
        return makespan_main(argv)
    return sft_main(argv)


if __name__ == "__main__":
    sys.exit(main())
