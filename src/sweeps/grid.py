"""The grid sweeper (``hydra/sweeper=lora_grid``, the default): Hydra's cartesian product plus explicit rows.

python -m src.train --multirun lora.r=8,16 lora=attn_qv,all_linear quant=4bit,8bit   # a grid
python -m src.train -cd sweeps -cn seed_table                                         # explicit rows
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Sequence
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser

from src.sweeps.base import Job, SweeperBase
from src.sweeps.configs import GridSweeperConf
from src.sweeps.outcomes import Status, finite
from src.sweeps.placement import assign_gpus, batch_size, gpu_batches, job_processes, visible_gpus
from src.sweeps.record import (
    BestSoFar,
    SweepFailed,
    SweepRecord,
    failure_budget_exceeded,
    final_status,
    objective_direction,
    show,
)


def grid_jobs(parser: OverridesParser, arguments: Sequence[str], rows: Optional[Sequence[str]]) -> list[list[str]]:
    """Every job of a grid: the cartesian product of the sweeps in ``arguments``, times the rows."""
    # Imported here: Hydra's plugin scan re-executes its core plugin modules, which would make a class
    # imported at module level (or a subclass of it) stale.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = parser.parse_overrides(list(arguments))
    product = BasicSweeper.split_arguments(overrides, None)[0]
    if not rows:
        return product
    swept = {o.get_key_element().lstrip("+~") for o in overrides}
    parsed_rows = []
    for i, row in enumerate(rows):
        items = shlex.split(row)
        for override in parser.parse_overrides(items):
            key = override.get_key_element().lstrip("+~")
            if override.is_sweep_override():
                raise SweepFailed(f"hydra.sweeper.rows[{i}]: {key} is a sweep; a row holds one value per key")
            if key in swept:
                raise SweepFailed(f"hydra.sweeper.rows[{i}] sets {key}, which the command line sets too")
        parsed_rows.append(items)
    return [job + row for job in product for row in parsed_rows]


class GridSweeper(SweeperBase):
    """Hydra's basic sweeper (cartesian product) plus explicit rows, tolerant of failing jobs."""

    CONF = GridSweeperConf

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        jobs = self.jobs(arguments)
        gpus = visible_gpus()  # each job's GPUs (train.nproc_per_node) must fit before anything starts
        processes = [job_processes(self.loader, self.config, job.overrides) for job in jobs]
        try:
            batches = gpu_batches(processes, batch_size(self.conf.max_batch_size, gpus), gpus)
        except ValueError as exc:
            raise SweepFailed(str(exc)) from exc
        self.save_sweep_config()
        name = self.config.hydra.job.config_name or "sweep"
        sweep_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.record = SweepRecord(
            kind="grid",
            sweep_id=sweep_id,
            run_name=f"sweep-{sweep_id}",
            config=self.config,
            planned=len(jobs),
            params={"jobs": [" ".join(job.overrides) for job in jobs]},
        )
        self.direction = objective_direction(self.config)
        with self.guarded():
            if self.conf.pack > 1:
                stopped = self.launch_packs(jobs, gpus)
            else:
                stopped = self.launch_batches(jobs, batches, processes, gpus)
        self.record.finish(final_status(self.record, stopped), self.best_line()[0])
        if self.record.failed() or stopped:
            raise SweepFailed(self.record.failure_message(stopped))
        return self.returns

    def jobs(self, arguments: list[str]) -> list[Job]:
        """Every job of the grid, each checked to compose (a typo in a group option) before any runs."""
        parser = OverridesParser.create(config_loader=self.loader)
        params = [f"{key}={value}" for key, value in (self.conf.params or {}).items()]
        jobs = grid_jobs(parser, params + list(arguments), self.conf.rows)
        common = set(jobs[0]).intersection(*jobs[1:]) if len(jobs) > 1 else set()  # shown once, not per job
        self.validate_batch_is_legal(jobs)
        return [Job(n, n, job, [o for o in job if o not in common]) for n, job in enumerate(jobs)]

    def launch_batches(self, jobs: list[Job], batches: list, processes: list[int], gpus) -> bool:
        """The jobs in batches that the GPUs can take at once; True if the failure budget stopped the sweep."""
        for indices in batches:
            placed = assign_gpus(len(indices), gpus, processes[indices.start : indices.stop])
            batch = jobs[indices.start : indices.stop]
            for job, outcome in zip(batch, self.launch(batch, placed)):
                self.record.add(outcome, job.number + 1, self.best_line)
            if self.over_failure_budget(len(jobs)):
                return True
        return False

    def launch_packs(self, jobs: list[Job], gpus) -> bool:
        """The jobs as packs (``hydra.sweeper.pack``), one unit at a time on the first GPU; True if stopped early."""
        units = self.pack_units(jobs)
        show(
            f"[sweep {self.record.sweep_id}] {len(jobs)} jobs as {len(units)} launches "
            f"(hydra.sweeper.pack={self.conf.pack}: {sum(len(u) > 1 for u in units)} pack processes, each training "
            f"{self.conf.pack} at a time)"
        )
        (gpu,) = assign_gpus(1, gpus)
        done = 0
        for unit in units:
            for outcome in self.launch_pack(unit, gpu):
                done += 1
                self.record.add(outcome, done, self.best_line)
            if self.over_failure_budget(len(jobs)):
                return True
        return False

    def over_failure_budget(self, planned: int) -> bool:
        if not failure_budget_exceeded(len(self.record.failed()), planned, self.conf.max_failure_rate):
            return False
        show(f"[sweep {self.record.sweep_id}] stopping: more than {self.conf.max_failure_rate:.0%} of the jobs failed")
        return True

    def best_line(self) -> BestSoFar:
        return best_line(self.record, self.direction)


def best_line(record: SweepRecord, direction: str) -> BestSoFar:
    """The best finished job by objective: as text, and its value."""
    scored = [o for o in record.outcomes if o.status is Status.OK and finite(o.metrics.get("objective"))]
    if not scored:
        return None, None
    pick = max if direction == "maximize" else min
    best = pick(scored, key=lambda o: o.metrics["objective"])
    value = best.metrics["objective"]
    return f"{record.objective}={value:.4g} (#{best.number} {' '.join(best.overrides)}, run {best.run_id})", value
