"""The sweepers' Hydra configs (``hydra/sweeper=lora_grid | lora_optuna``, their samplers and pruners, the
``hydra/launcher`` presets), registered in Hydra's ConfigStore at import; every default lives here.

:func:`job_conf` reads what one job needs of them (``isolate``, ``feasibility``) from the sweeper's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

PLUGIN_MODULE = "hydra_plugins.lora_sweeps.sweepers"


@dataclass
class FeasibilityConf:
    """Before a job trains, src.plan's peak-memory estimate is compared with its GPU's free memory."""

    mode: str = "shrink"  # off | skip (record the reason, run nothing) | shrink (halve micro-batch, double accum)
    available_gpu_mem_gb: Optional[float] = None  # null: measure the job's GPU (CPU: no check); a number to force one


@dataclass
class JobConf:
    """What each job of a sweep reads of ``hydra.sweeper``; both sweepers' configs extend it."""

    isolate: bool = True  # each job in a fresh process
    feasibility: FeasibilityConf = field(default_factory=FeasibilityConf)


@dataclass
class GridSweeperConf(JobConf):
    _target_: str = f"{PLUGIN_MODULE}.GridSweeper"
    params: Optional[dict[str, str]] = None  # like Hydra's basic sweeper: {lora.r: "8,16"}
    rows: Optional[list[str]] = None  # explicit jobs, each the overrides of one job as on the command line
    max_batch_size: Optional[int] = None  # jobs handed to the launcher at once; null: one per GPU (1 on CPU)
    max_failure_rate: float = 1.0  # stop once more than this fraction of all jobs has failed (1.0: never)
    pack: int = 1  # up to this many jobs of one base (model, quant, data) train at once on one GPU (src/fast/pack.py)


@dataclass
class OptunaSweeperConf(JobConf):
    _target_: str = f"{PLUGIN_MODULE}.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds the sampler and pruner itself; jobs rebuild the pruner
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "nop"}])
    sampler: Any = MISSING  # hydra/sweeper/sampler: tpe | random | nsgaii, or another optuna.samplers class
    pruner: Any = MISSING  # hydra/sweeper/pruner: nop | median | hyperband, or another optuna.pruners class
    n_trials: int = 20  # trials in the study in total, counting earlier runs of the same study
    n_jobs: int = 1  # trials handed to the launcher at once (parallel with a parallel launcher)
    direction: Any = None  # minimize | maximize; null: the config's objective direction
    directions: Optional[list[Optional[str]]] = None  # multi-objective, one per metric; null items: as above
    metrics: list[str] = field(default_factory=lambda: ["objective"])  # "objective" or final MLflow metrics
    storage: Optional[str] = None  # SQLAlchemy URL or journal file path; null: optuna.db beside the MLflow store
    study_name: Optional[str] = None  # null: <config name>-<hash of the command's overrides and search space>
    params: Optional[dict[str, str]] = None  # search space, in Hydra's override grammar: choice(...), interval(...)
    derived: Optional[dict[str, str]] = None  # keys computed from params: {lora.alpha: lora.alpha_ratio * lora.r}
    max_failure_rate: float = 0.5  # stop once more than this fraction of n_trials has failed
    # Up to this many trials of one base train at once on one GPU (src/fast/pack.py); asks n_jobs x pack trials at a
    # time: with TPE, hydra/sweeper/sampler=tpe hydra.sweeper.sampler.constant_liar=true spreads them.
    pack: int = 1
    # Several workers on one study (RDB storage only): each RUNNING trial beats every heartbeat_interval
    # seconds; one silent for grace_period (null: 2 x interval) is failed and retried by another worker.
    heartbeat_interval: Optional[int] = None
    grace_period: Optional[int] = None


SAMPLERS = {
    # constant_liar: trials asked together (n_jobs, pack) are spread apart, each in flight counted as a bad value
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None, "constant_liar": False},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler", "seed": None},
}


PRUNERS = {
    "nop": {"_target_": "optuna.pruners.NopPruner"},
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 0},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1, "reduction_factor": 3},
}


# hydra/launcher=slurm: each trial one SLURM job with one GPU (hydra-submitit-launcher); set
# hydra.launcher.partition=... Start the same command on several nodes with a shared study
# (hydra.sweeper.storage=postgresql+psycopg://..., study_name, heartbeat_interval) to split n_trials.
# hydra/launcher=local: submitit's local executor, a job (process) per trial as on SLURM, no cluster.
LAUNCHERS = {
    "slurm": {
        "defaults": ["submitit_slurm", "_self_"],
        "timeout_min": 720,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": 1,
        "cpus_per_task": 8,
        "mem_gb": 64,
        "array_parallelism": 64,
        "setup": ["export TOKENIZERS_PARALLELISM=false"],
    },
    "local": {"defaults": ["submitit_local", "_self_"], "timeout_min": 120, "gpus_per_node": 0, "cpus_per_task": 1},
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in LAUNCHERS.items():
        cs.store(group="hydra/launcher", name=name, node=node, provider="lora-sweeps")
    cs.store(group="hydra/sweeper", name="lora_grid", node=GridSweeperConf, provider="lora-sweeps")
    cs.store(group="hydra/sweeper", name="lora_optuna", node=OptunaSweeperConf, provider="lora-sweeps")
    for name, node in SAMPLERS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="lora-sweeps")
    for name, node in PRUNERS.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="lora-sweeps")


def job_conf(sweeper: DictConfig) -> JobConf:
    """``isolate`` and ``feasibility`` of the sweeper's config; a sweeper without them (Hydra's basic one) gets
    :class:`JobConf`'s defaults."""
    given = {key: sweeper[key] for key in ("isolate", "feasibility") if key in sweeper}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConf), given))


register_configs()
