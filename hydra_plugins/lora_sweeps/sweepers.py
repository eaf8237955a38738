"""Sweeper classes for Hydra's plugin scan; the code is in :mod:`src.sweeps.grid` and :mod:`src.sweeps.study`.

Selected in ``conf/config.yaml`` (``override hydra/sweeper: lora_grid``) or on the command line
(``hydra/sweeper=lora_optuna``); :mod:`src.sweeps.configs` registers their configs.
"""

from typing import Any

from src.errors import exit_on_user_error
from src.sweeps import configs, grid, study  # noqa: F401  configs registers the sweepers' Hydra configs


class GridSweeper(grid.GridSweeper):
    """Hydra's grid (cartesian product, plus explicit rows) with an MLflow parent run."""

    def sweep(self, arguments: list[str]) -> Any:
        return exit_on_user_error(lambda: super(GridSweeper, self).sweep(arguments))  # a broken store: one line


class OptunaSweeper(study.OptunaSweeper):
    """An Optuna (>= 4) study driven by ``--multirun``, with an MLflow parent run."""

    def sweep(self, arguments: list[str]) -> Any:
        return exit_on_user_error(lambda: super(OptunaSweeper, self).sweep(arguments))  # a broken store: one line
