"""Training throughput and memory: the seeds' QLoRA recipe against the fast path (:mod:`src.fast.bench`).

python -m src.bench                                        # W3B 4-bit; fast path at the default and 8 GiB budgets
python -m src.bench --device cpu --workload tiny --examples 16   # smoke test: the code paths, not the numbers
torchrun --standalone --nproc_per_node 2 -m src.bench --sides fast --budgets default   # DDP on 2 GPUs
"""

from __future__ import annotations

import sys

from src.fast.bench import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
