"""Sweeper classes for Hydra's plugin scan; the code is in :mod:`src.sweeping` and :mod:`src.sweeping_optuna`.

Selected in ``conf/config.yaml`` (``override hydra/sweeper: lora_grid``) or on the command line
(``hydra/sweeper=lora_optuna``); :mod:`src.sweeping` registers their configs.
"""

from src import sweeping, sweeping_optuna


class GridSweeper(sweeping.GridSweeper):
    """Hydra's grid (cartesian product, plus explicit rows) with an MLflow parent run."""


class OptunaSweeper(sweeping_optuna.OptunaSweeper):
    """An Optuna (>= 4) study driven by ``--multirun``, with an MLflow parent run."""
