"""Where the project's own files live: the repository root, which holds conf/, .cache/ and the default MLflow
store (``mlflow.db``)."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
