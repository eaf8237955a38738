"""Predict with a trained adapter: labels and probabilities, or generations.

    python -m src.predict --run RUN_ID --input data.csv --output predictions.csv
    python -m src.predict --sweep-best SWEEP_ID --input data.jsonl
    echo "the striker scored a goal" | python -m src.predict --adapter outputs/.../adapter

The implementation: :mod:`src.runs.predict`.
"""

from __future__ import annotations

import sys

from src.runs.predict import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
