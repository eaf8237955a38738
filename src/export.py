"""Merge a trained adapter into its base model: a standalone model directory for deployment.

    python -m src.export --run RUN_ID --out exported/topics-r8
    python -m src.export --adapter outputs/.../adapter --out exported/topics-r8
    python -m src.export --run RUN_ID --out exported/topics-r8 --log-to-mlflow

The implementation: :mod:`src.runs.export`.
"""

from __future__ import annotations

import sys

from src.runs.export import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
