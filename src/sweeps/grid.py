"""The grid sweeper (``hydra/sweeper=lora_grid``, the default): Hydra's cartesian product plus explicit rows.

python -m src.train --multirun lora.r=8,16 lora=attn_qv,all_linear quant=4bit,8bit   # a grid
python -m src.train -cd sweeps -cn seed_table                                         # explicit rows
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from src.config_rules import domain_problems
from src.sweeps import grouping
from src.sweeps.configs import GridSweeperConf, vet
from src.sweeps.outcomes import env_overrides, finite, job_outcome, pack_outcomes
from src.sweeps.placement import assign_gpus, batch_size, gpu_batches, job_processes, visible_gpus
from src.sweeps.record import (
    BestSoFar,
    SweepFailed,
    SweepRecord,
    failure_budget_exceeded,
    final_status,
    install_sigterm_handler,
    objective_direction,
    restore_sigterm_handler,
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


class GridSweeper(Sweeper):
    """Hydra's basic sweeper (cartesian product) plus explicit rows, tolerant of failing jobs."""

    def __init__(
        self,
        params: Optional[dict[str, str]] = None,
        rows: Optional[list[str]] = None,
        max_batch_size: Optional[int] = None,
        max_failure_rate: float = 1.0,
        isolate: bool = True,
        feasibility: Any = None,
        pack: int = 1,
    ):
        settings = {"max_batch_size": max_batch_size, "max_failure_rate": max_failure_rate, "pack": pack}
        problems = domain_problems(GridSweeperConf, {**settings, "feasibility": feasibility or {}}, "hydra.sweeper.")
        if problems:
            raise SweepFailed("; ".join(problems))
        self.pack = pack
        self.params = dict(params or {})
        self.rows = list(rows or [])
        self.max_batch_size = max_batch_size
        self.max_failure_rate = max_failure_rate
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        vet(config)  # before the launcher is built or the store written (also for a config without the callback)
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        params = [f"{key}={value}" for key, value in self.params.items()]
        jobs = grid_jobs(parser, params + list(arguments), self.rows)
        common = set(jobs[0]).intersection(*jobs[1:]) if len(jobs) > 1 else set()  # shown once, not per job
        self.validate_batch_is_legal(jobs)  # every job composes (a typo in a group option) before any runs
        gpus = visible_gpus()  # each job's GPUs (train.nproc_per_node) must fit before anything starts
        size = batch_size(self.max_batch_size, gpus)
        processes = [job_processes(self.hydra_context.config_loader, self.config, job) for job in jobs]
        try:
            batches = gpu_batches(processes, size, gpus)
        except ValueError as exc:
            raise SweepFailed(str(exc)) from exc
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        name = self.config.hydra.job.config_name or "sweep"
        sweep_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        record = SweepRecord(
            kind="grid",
            sweep_id=sweep_id,
            run_name=f"sweep-{sweep_id}",
            config=self.config,
            planned=len(jobs),
            params={"jobs": [" ".join(j) for j in jobs]},
        )
        direction = objective_direction(self.config)
        previous = install_sigterm_handler()
        stopped = False
        returns = []
        try:
            if self.pack > 1:
                stopped = self._sweep_packs(jobs, common, record, direction, gpus, sweep_dir, returns)
                batches = []
            for indices in batches:
                start, batch = indices.start, jobs[indices.start : indices.stop]
                placed = assign_gpus(len(batch), gpus, processes[indices.start : indices.stop])
                overrides = [
                    job + env_overrides({**record.job_env(), "CUDA_VISIBLE_DEVICES": gpu})
                    for job, gpu in zip(batch, placed)
                ]
                for i, gpu in enumerate(placed):
                    record.starting(start + i, [o for o in batch[i] if o not in common], gpu)
                results = self.launcher.launch(overrides, initial_job_idx=start)
                returns.append(results)
                for i, ret in enumerate(results):
                    shown = [o for o in batch[i] if o not in common]
                    record.add(job_outcome(start + i, shown, ret), start + i + 1, lambda: best_line(record, direction))
                if failure_budget_exceeded(len(record.failed()), len(jobs), self.max_failure_rate):
                    stopped = True
                    print(f"[sweep {sweep_id}] stopping: more than {self.max_failure_rate:.0%} of the jobs failed")
                    break
        except BaseException as exc:
            record.end_early(exc)
            raise
        finally:
            restore_sigterm_handler(previous)
        record.finish(final_status(record, stopped), best_line(record, direction)[0])
        if record.failed() or stopped:
            raise SweepFailed(record.failure_message(stopped))
        return returns

    def _sweep_packs(self, jobs, common, record, direction, gpus, sweep_dir: Path, returns: list) -> bool:
        """Launch the grid as packs (``hydra.sweeper.pack``): each a launcher job that trains its members on one
        base; jobs that cannot be packed run alone. One unit at a time, on the first GPU. True if stopped early."""
        raws = []
        for number, job in enumerate(jobs):
            try:
                raws.append(grouping.member_config(self.hydra_context.config_loader, self.config, job, number))
            except Exception:  # noqa: BLE001  the job then runs alone and fails with Hydra's own error
                raws.append(None)
        units = grouping.group(
            raws, self.pack, say=lambda n, why: print(f"[sweep {record.sweep_id}] job #{n} trains alone: {why}")
        )
        print(
            f"[sweep {record.sweep_id}] {len(jobs)} jobs as {len(units)} launches "
            f"(hydra.sweeper.pack={self.pack}: {sum(len(u) > 1 for u in units)} packs)",
            flush=True,
        )
        done = 0
        (gpu,) = assign_gpus(1, gpus)
        for unit in units:
            first = unit[0]
            env = {**record.job_env(), "CUDA_VISIBLE_DEVICES": gpu, grouping.PACK_ENV: ""}
            if len(unit) > 1:
                path = sweep_dir / "packs" / f"pack-{first}.json"
                grouping.write_pack(path, [(n, raws[n], {}) for n in unit])
                env[grouping.PACK_ENV] = str(path.absolute())
            for n in unit:
                record.starting(n, [o for o in jobs[n] if o not in common], gpu)
            results = self.launcher.launch([jobs[first] + env_overrides(env)], initial_job_idx=first)
            returns.append(results)
            shown = [[o for o in jobs[n] if o not in common] for n in unit]
            outcomes = (
                pack_outcomes(unit, shown, results[0]) if len(unit) > 1 else [job_outcome(first, shown[0], results[0])]
            )
            for outcome in outcomes:
                done += 1
                record.add(outcome, done, lambda: best_line(record, direction))
            if failure_budget_exceeded(len(record.failed()), len(jobs), self.max_failure_rate):
                print(f"[sweep {record.sweep_id}] stopping: more than {self.max_failure_rate:.0%} of the jobs failed")
                return True
        return False


def best_line(record: SweepRecord, direction: str) -> BestSoFar:
    """The best finished job by objective: as text, and its value."""
    scored = [o for o in record.outcomes if o.status == "FINISHED" and finite(o.metrics.get("objective"))]
    if not scored:
        return None, None
    pick = max if direction == "maximize" else min
    best = pick(scored, key=lambda o: o.metrics["objective"])
    value = best.metrics["objective"]
    return f"{record.objective}={value:.4g} (#{best.number} {' '.join(best.overrides)}, run {best.run_id})", value
