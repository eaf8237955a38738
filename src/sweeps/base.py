"""What both sweepers share: their settings, their setup, and one launch path for jobs and packs.

A sweeper (:mod:`src.sweeps.grid`, :mod:`src.sweeps.study`) decides which jobs to run and what their outcomes
mean; :class:`SweeperBase` launches them through Hydra's launcher, each pinned to its GPU(s) and nested under the
sweep's MLflow parent run (:class:`~src.sweeps.record.SweepRecord`), alone (:meth:`SweeperBase.launch`) or as
packs of one base (``hydra.sweeper.pack``: :meth:`SweeperBase.pack_units`, :meth:`SweeperBase.launch_pack`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from src.config_rules import domain_problems
from src.sweeps import grouping
from src.sweeps.configs import JobConf, vet
from src.sweeps.outcomes import Outcome, env_overrides, job_outcome, pack_outcomes, pack_stats
from src.sweeps.record import SweepFailed, SweepRecord, install_sigterm_handler, restore_sigterm_handler, show


@dataclass
class Job:
    """One job to launch: a grid's job, or an Optuna trial."""

    number: int  # the job's number (grid) or its trial's (Optuna), as the sweep's lines show it
    index: int  # Hydra's job index: it numbers the job's output folder and its pack's file
    overrides: list[str]  # as the launcher gets them, less the sweep's own environment
    shown: list[str]  # as the sweep's lines show them: what sets this job apart
    env: dict[str, str] = field(default_factory=dict)  # its own environment (Optuna: its study and trial)
    trial: Any = None  # Optuna: the trial it reports to
    raw: Optional[dict] = None  # in a pack: its resolved config (None: it cannot be packed)


class SweeperBase(Sweeper):
    """Settings, setup and the launch path of the project's sweepers; subclasses set :attr:`CONF` and ``sweep``."""

    CONF: ClassVar[type[JobConf]]  # the sweeper's Hydra config: its fields, their domains and defaults

    def __init__(self, **settings: Any):
        """``settings``: ``hydra.sweeper`` as Hydra passes it. Values outside their domain are refused all at once;
        a setting not given takes :attr:`CONF`'s default."""
        given = {**settings, "feasibility": settings.get("feasibility") or {}}
        problems = domain_problems(self.CONF, given, "hydra.sweeper.")
        if problems:
            raise SweepFailed("; ".join(problems))
        self.conf = self.CONF(**settings)
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context = None
        self.record: Optional[SweepRecord] = None
        self.returns: list = []  # every launch's JobReturns

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        vet(config)  # before the launcher (or a sampler, a pruner) is built, also for a config without the callback
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    @property
    def loader(self):
        return self.hydra_context.config_loader

    def save_sweep_config(self) -> Path:
        """The sweep's folder, holding its composed config as ``multirun.yaml``."""
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        return sweep_dir

    @contextmanager
    def guarded(self) -> Iterator[None]:
        """While the sweep launches: SIGTERM raises (as Ctrl-C does), and an exception ends the parent run
        (:meth:`~src.sweeps.record.SweepRecord.end_early`) after :meth:`interrupted`."""
        previous = install_sigterm_handler()
        try:
            yield
        except BaseException as exc:
            self.interrupted(exc)
            self.record.end_early(exc)
            raise
        finally:
            restore_sigterm_handler(previous)

    def interrupted(self, exc: BaseException) -> None:
        """What a sweeper settles when it stops on ``exc``, before its parent run ends."""

    def running(self, jobs: list[Job]) -> AbstractContextManager:
        """Held while ``jobs`` run (Optuna: their trials' heartbeats)."""
        return nullcontext()

    def launch(self, jobs: list[Job], gpus: list[Optional[str]]) -> list[Outcome]:
        """``jobs`` at once, each its own launcher job on its GPU(s) (in parallel with a parallel launcher)."""
        overrides = [
            job.overrides + env_overrides({**self.record.job_env(), **job.env, "CUDA_VISIBLE_DEVICES": gpu})
            for job, gpu in zip(jobs, gpus)
        ]
        for job, gpu in zip(jobs, gpus):
            self.record.starting(job.number, job.shown, gpu)
        with self.running(jobs):
            results = self.launcher.launch(overrides, initial_job_idx=jobs[0].index)
        self.returns.append(results)
        return [job_outcome(job.number, job.shown, ret) for job, ret in zip(jobs, results)]

    def pack_units(self, jobs: list[Job]) -> list[list[Job]]:
        """``jobs`` in launch units: packs of the jobs of one base (up to :meth:`pack_jobs` of them, trained
        ``hydra.sweeper.pack`` at a time), and jobs alone (one that cannot be packed says why)."""
        for job in jobs:
            try:
                job.raw = grouping.member_config(self.loader, self.config, job.overrides, job.index)
            except Exception:  # noqa: BLE001  the job then runs alone and fails with Hydra's own error
                job.raw = None

        def alone(i: int, why: str) -> None:
            show(f"[sweep {self.record.sweep_id}] {self.record.label} #{jobs[i].number} trains alone: {why}")

        units = grouping.group([job.raw for job in jobs], self.conf.pack, say=alone, jobs=self.pack_jobs())
        return [[jobs[i] for i in unit] for unit in units]

    def pack_jobs(self) -> Optional[int]:
        """The jobs one pack process trains (``hydra.sweeper.pack_jobs``; None: every job of its base)."""
        return self.conf.pack_jobs

    def launch_pack(self, unit: list[Job], gpu: Optional[str]) -> list[Outcome]:
        """One unit of :meth:`pack_units` as one launcher job on ``gpu``: a pack trains its jobs on one base
        (``src.sweeps.job.run_pack_job``) and tells each job's outcome."""
        first = unit[0]
        env = {**self.record.job_env(), **first.env, "CUDA_VISIBLE_DEVICES": gpu, grouping.PACK_ENV: ""}
        if len(unit) > 1:
            path = Path(self.config.hydra.sweep.dir) / "packs" / f"pack-{first.index}.json"
            grouping.write_pack(path, [(job.index, job.raw, job.env) for job in unit], self.conf.pack)
            env[grouping.PACK_ENV] = str(path.absolute())
        for job in unit:
            self.record.starting(job.number, job.shown, gpu)
        with self.running(unit):
            results = self.launcher.launch([first.overrides + env_overrides(env)], initial_job_idx=first.index)
        self.returns.append(results)
        if len(unit) > 1:
            for stats in pack_stats(results[0]):
                self.record.pack_ended(stats)
            return pack_outcomes([job.number for job in unit], [job.shown for job in unit], results[0])
        return [job_outcome(first.number, first.shown, results[0])]
