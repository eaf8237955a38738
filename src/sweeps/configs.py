"""The sweepers' Hydra configs (``hydra/sweeper=lora_grid | lora_optuna``, their samplers and pruners, the
``hydra/launcher`` presets), registered in Hydra's ConfigStore at import; every default lives here.

:func:`build_sampler` builds a study's sampler from its config, and :func:`sampler_text` states it (the sweep's
first line).

:func:`job_conf` reads what one job needs of them (``isolate``, ``feasibility``) from the sweeper's config.
:func:`vet` refuses a sweep's config before anything is built from it (a ``_target_`` outside the sampler and
pruner) or recorded (a path as the experiment's name).
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf

from src.config import Config, ConfigError
from src.config_rules import bounded
from src.config_schema import setting as schema_setting
from src.names import name_problem
from src.overrides import groups_on
from src.overrides import problems as override_problems
from src.sweeps.record import SweepFailed

PLUGIN_MODULE = "hydra_plugins.lora_sweeps.sweepers"


def sweeper_setting(help: str, default: Any = None, factory: Any = None) -> Any:
    """A sweeper setting with its help (:func:`src.config_schema.setting`): None unless a default or a ``factory``
    (a mutable default's maker) is given."""
    return schema_setting(help, default=default) if factory is None else schema_setting(help, factory=factory)


@dataclass
class FeasibilityConf:
    """Before a job trains, src.plan's peak-memory estimate is compared with its GPU's free memory."""

    mode: str = sweeper_setting(
        "off | skip (record the reason, run nothing) | shrink (halve the micro-batch, double accumulation).", "shrink"
    )
    available_gpu_mem_gb: Optional[float] = bounded(
        "Free GPU memory to plan against; null: measure the job's GPU (CPU: no check).", default=None, gt=0
    )


@dataclass
class JobConf:
    """What each job of a sweep reads of ``hydra.sweeper``; both sweepers' configs extend it."""

    isolate: bool = sweeper_setting("Each job in a fresh process.", True)
    feasibility: FeasibilityConf = sweeper_setting("The memory check before each job trains.", factory=FeasibilityConf)


@dataclass
class GridSweeperConf(JobConf):
    _target_: str = f"{PLUGIN_MODULE}.GridSweeper"
    params: Optional[dict[str, str]] = sweeper_setting(
        'Sweeps, as Hydra\'s basic sweeper takes them: {lora.r: "8,16"}.'
    )
    rows: Optional[list[str]] = sweeper_setting("Explicit jobs, each the overrides of one job as on the command line.")
    max_batch_size: Optional[int] = bounded(
        "Jobs handed to the launcher at once; null: one per GPU (1 on CPU).", default=None, ge=1
    )
    max_failure_rate: float = bounded(
        "Stop once more than this fraction of all jobs has failed (1.0: never).", default=1.0, ge=0, le=1
    )
    pack: int = bounded(
        "Up to this many jobs of one base (model, quant, data) train at once on one GPU (src/packs/model.py).",
        default=1,
        ge=1,
    )
    pack_jobs: Optional[int] = bounded(
        "With pack > 1: the jobs of one base that one pack process trains, pack at a time; as one ends the next takes "
        "its slot on the base already loaded. null: every job of that base.",
        default=None,
        ge=1,
    )


@dataclass
class OptunaSweeperConf(JobConf):
    _target_: str = f"{PLUGIN_MODULE}.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds the sampler and pruner itself; jobs rebuild the pruner
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "nop"}])
    sampler: Any = sweeper_setting(
        "hydra/sweeper/sampler: tpe | random | nsgaii, or another optuna.samplers class.", MISSING
    )
    pruner: Any = sweeper_setting(
        "hydra/sweeper/pruner: nop | median | hyperband, or another optuna.pruners class.", MISSING
    )
    n_trials: int = bounded("Trials in the study in total, counting earlier runs of the same study.", default=20, ge=1)
    n_jobs: int = bounded("Trials handed to the launcher at once (parallel with a parallel launcher).", default=1, ge=1)
    direction: Any = sweeper_setting("minimize | maximize; null: the config's objective direction.")
    directions: Optional[list[Optional[str]]] = sweeper_setting(
        "Several objectives: one per metric; null items: as above."
    )
    metrics: list[str] = sweeper_setting(
        '"objective" or final MLflow metrics, one per direction.', factory=lambda: ["objective"]
    )
    storage: Optional[str] = sweeper_setting(
        "SQLAlchemy URL or journal file path; null: optuna.db beside the MLflow store."
    )
    study_name: Optional[str] = sweeper_setting(
        "null: <config name>-<hash of the command's overrides and search space>."
    )
    params: Optional[dict[str, str]] = sweeper_setting(
        "The search space in Hydra's override grammar: choice(...), interval(...)."
    )
    derived: Optional[dict[str, str]] = sweeper_setting(
        "Keys computed from params: {lora.alpha: lora.alpha_ratio * lora.r}."
    )
    max_failure_rate: float = bounded(
        "Stop once more than this fraction of n_trials has failed.", default=0.5, ge=0, le=1
    )
    pack: int = bounded(
        "Up to this many trials of one base train at once on one GPU (src/packs/model.py).",
        default=1,
        ge=1,
    )
    pack_jobs: Optional[int] = bounded(
        "With pack > 1: the trials one pack process trains, pack at a time (a pruned or finished trial's slot goes to "
        "the next, on the base already loaded); n_jobs x pack_jobs are asked at a time. null: 4 x pack.",
        default=None,
        ge=1,
    )
    # Several workers on one study (RDB storage only): one silent for grace_period is retried by another worker.
    heartbeat_interval: Optional[int] = bounded(
        "Seconds between a RUNNING trial's heartbeats; null: no heartbeat.", default=None, ge=1
    )
    grace_period: Optional[int] = bounded(
        "Seconds without a heartbeat before a trial is failed and retried; null: 2 x heartbeat_interval.",
        default=None,
        ge=1,
    )


# The presets of hydra/sweeper/sampler and hydra/sweeper/pruner (a sampler or pruner class and its arguments).
SAMPLER_PRESETS = {
    # Optuna 5's TPE, its choices spelled out so the command line can turn them: multivariate (one joint density
    # over the params, not one per param), and the constant liar, which counts each trial in flight as a bad value
    # so that trials asked together (n_jobs, pack, several workers) spread apart instead of landing on one point.
    # With one trial asked at a time and one worker, none is in flight: the liar changes nothing.
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None, "multivariate": True, "constant_liar": True},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler", "seed": None},
}


# The optuna.samplers classes hydra.sweeper.sampler may name (its presets: SAMPLER_PRESETS).
SAMPLER_CLASSES = (
    "TPESampler",
    "RandomSampler",
    "NSGAIISampler",
    "NSGAIIISampler",
    "CmaEsSampler",
    "GPSampler",
    "QMCSampler",
    "GridSampler",
    "BruteForceSampler",
)


def build_sampler(conf: dict):
    """The Optuna sampler of ``hydra.sweeper.sampler``: a class of :data:`SAMPLER_CLASSES`, called with the other
    keys as plain values. Nothing in them is built: a ``_target_`` at any depth, or another ``_``-key, is refused."""
    import optuna

    target = str(conf.get("_target_", ""))
    name = target.removeprefix("optuna.samplers.")
    if target != f"optuna.samplers.{name}" or name not in SAMPLER_CLASSES:
        raise SweepFailed(
            f"hydra.sweeper.sampler: {target!r} is not one of optuna.samplers' {', '.join(SAMPLER_CLASSES)}"
        )
    kwargs = {k: v for k, v in conf.items() if k != "_target_"}
    odd = [f"hydra.sweeper.sampler.{k}" for k in kwargs if str(k).startswith("_")]
    odd += unvetted_targets(kwargs, "hydra.sweeper.sampler")
    if odd:
        raise SweepFailed(f"hydra.sweeper.sampler: {', '.join(odd)}: arguments are plain values, never code to build")
    return getattr(optuna.samplers, name)(**kwargs)


def sampler_settings(conf: dict) -> dict[str, Any]:
    """The arguments of the sampler that ``conf`` (``hydra.sweeper.sampler``) builds, each one not given at its
    default, read from the class's signature: what the installed Optuna uses."""
    import inspect

    import optuna

    cls = getattr(optuna.samplers, str(conf["_target_"]).removeprefix("optuna.samplers."))
    defaults = {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **{k: v for k, v in conf.items() if k != "_target_"}}


def sampler_text(conf: dict, objectives: int, asked: int) -> str:
    """The sampler and its settings, as the sweep's first line states them: ``TPE (multivariate, constant liar,
    10 random startup trials, seed 0)``. ``asked``: the trials asked at once; TPE without the constant liar then
    says that they may repeat one point."""
    name = str(conf["_target_"]).removeprefix("optuna.samplers.")
    settings = sampler_settings(conf)
    seed = "no seed" if settings.get("seed") is None else f"seed {settings['seed']}"
    if name != "TPESampler":
        given = [f"{k}={v}" for k, v in conf.items() if k not in ("_target_", "seed")]
        return f"{name.removesuffix('Sampler')} ({', '.join([*given, seed])})"
    multivariate = settings["multivariate"]
    if multivariate is None:  # Optuna decides: multivariate for one objective, independent for several
        multivariate = objectives == 1
    shape = ("multivariate, grouped" if settings["group"] else "multivariate") if multivariate else "independent"
    liar = settings["constant_liar"]
    startup = f"{settings['n_startup_trials']} random startup trials"
    text = f"TPE ({', '.join([shape, 'constant liar' if liar else 'no constant liar', startup, seed])})"
    if asked > 1 and not liar:
        text += (
            f"; without the constant liar the {asked} trials asked at once may repeat one point "
            "(hydra.sweeper.sampler.constant_liar=true)"
        )
    return text


PRUNER_PRESETS = {
    "nop": {"_target_": "optuna.pruners.NopPruner"},
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 0},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1, "reduction_factor": 3},
    # Successive halving: at steps min_resource x reduction_factor^k (its rungs; evaluate at those steps), a trial
    # goes on only if it is in the best 1/reduction_factor of the trials that reached that rung. In a pack, a trial
    # it stops frees its slot for the next (hydra.sweeper.pack).
    "successive_halving": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner",
        "min_resource": 1,
        "reduction_factor": 2,
        "min_early_stopping_rate": 0,
    },
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


def register_sweeper_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in LAUNCHERS.items():
        cs.store(group="hydra/launcher", name=name, node=node, provider="lora-sweeps")
    cs.store(group="hydra/sweeper", name="lora_grid", node=GridSweeperConf, provider="lora-sweeps")
    cs.store(group="hydra/sweeper", name="lora_optuna", node=OptunaSweeperConf, provider="lora-sweeps")
    for name, node in SAMPLER_PRESETS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="lora-sweeps")
    for name, node in PRUNER_PRESETS.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="lora-sweeps")


# The only keys of a composed config that may name code to build. Hydra builds a sweeper or launcher only from its
# plugin packages, and the sweeper builds its sampler and pruner only from Optuna's own classes, by name
# (build_sampler, src.trial.pruner_spec). Any other _target_, at any depth, is refused.
CALLBACK = "refuse_targets"  # conf/config.yaml: hydra.callbacks.refuse_targets
VETTED_TARGETS = frozenset(
    f"hydra.{key}._target_"
    for key in ("sweeper", "launcher", "sweeper.sampler", "sweeper.pruner", f"callbacks.{CALLBACK}")
)


class SweepRefused(CompactHydraException):
    """A sweep's config must not start: see :func:`vet`."""


class TargetsRefused(SweepRefused):
    """A config names code to build (``_target_``) outside :data:`VETTED_TARGETS`."""


def unvetted_targets(node: Any, path: str = "") -> list[str]:
    """The dotted path of every ``_target_`` key in a plain container (in dicts and lists, at any depth) that is
    not in :data:`VETTED_TARGETS`."""
    if isinstance(node, dict):
        items = [(f"{path}.{key}" if path else str(key), key, value) for key, value in node.items()]
    elif isinstance(node, list):
        items = [(f"{path}[{i}]", i, value) for i, value in enumerate(node)]
    else:
        return []
    found = [here for here, key, _ in items if key == "_target_" and here not in VETTED_TARGETS]
    return found + [hit for here, _, value in items for hit in unvetted_targets(value, here)]


def refuse_targets(config: DictConfig) -> None:
    """Raise :class:`TargetsRefused` naming every ``_target_`` of the composed config (its ``hydra`` node too)
    outside :data:`VETTED_TARGETS`. Read without resolving: nothing in the config runs to be checked."""
    found = unvetted_targets(OmegaConf.to_container(config, resolve=False))
    if found:
        raise TargetsRefused(
            f"refused: the config names code to build (_target_) at {', '.join(found)}. Only "
            "hydra.sweeper.sampler and hydra.sweeper.pruner name a class, an optuna sampler or pruner; their "
            "arguments are plain values"
        )


def vet(config: DictConfig) -> None:
    """Raise :class:`SweepRefused` before a sweep builds or records anything: for a ``_target_`` outside
    :data:`VETTED_TARGETS` (:func:`refuse_targets`), a ``tracking.experiment`` that is no name (a path), or a
    key or group option of the sweep's rows, params or derived keys that does not exist (:func:`sweep_key_problems`)."""
    refuse_targets(config)
    experiment = OmegaConf.select(config, "tracking.experiment")
    if isinstance(experiment, str) and name_problem(experiment):
        raise SweepRefused(f"tracking.experiment: {experiment!r} {name_problem(experiment)}")
    problems = sweep_key_problems(config)
    if problems:
        raise SweepRefused(str(ConfigError(problems)))


def sweep_key_problems(config: DictConfig) -> list[str]:
    """The overrides a sweep's config holds (``hydra.sweeper.rows``, ``params``, ``derived``) checked as the
    command line's are (:func:`src.overrides.problems`): a mistyped key fails the sweep at once, naming the
    closest, not every job with Hydra's advice to add it with +. A param that feeds ``derived`` is no key."""
    sweeper = OmegaConf.select(config, "hydra.sweeper") or {}
    rows, params, derived = (sweeper.get(key) or {} for key in ("rows", "params", "derived"))
    if not (rows or params or derived):
        return []
    sources = OmegaConf.select(config, "hydra.runtime.config_sources", default=None) or []
    search = [(s.provider, f"{s.schema}://{s.path}") for s in sources] + [("schema", "structured://")]
    groups = groups_on(search, OmegaConf.select(config, "hydra.job.config_name") or "config") if sources else None
    variables = {factor.strip() for expression in derived.values() for factor in str(expression).split("*")}
    found = [
        f"hydra.sweeper.rows[{i}]: {problem}"
        for i, row in enumerate(rows)
        for problem in override_problems(shlex.split(row), Config, groups)
    ]
    swept = [f"{key}={value}" for key, value in params.items() if key not in variables]
    found += [f"hydra.sweeper.params: {p}" for p in override_problems(swept, Config, groups)]
    found += [f"hydra.sweeper.derived: {p}" for p in override_problems([f"{k}=0" for k in derived], Config, groups)]
    return found


class RefuseTargets(Callback):
    """Hydra calls it with the composed config before it builds the sweeper, whose arguments (a sampler's) it may
    build too: the earliest point a sweep's config can be checked (``hydra.callbacks.refuse_targets`` in
    conf/config.yaml). A single run builds nothing from its config; its validation refuses unknown keys."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            vet(config)
        except SweepRefused as exc:  # Hydra turns a callback's exception into a warning and goes on: exit instead
            from src.sweeps.record import show

            show(f"error: {exc}", logging.ERROR)
            raise SystemExit(2) from exc


def job_conf(sweeper: DictConfig) -> JobConf:
    """``isolate`` and ``feasibility`` of the sweeper's config; a sweeper without them (Hydra's basic one) gets
    :class:`JobConf`'s defaults."""
    given = {key: sweeper[key] for key in ("isolate", "feasibility") if key in sweeper}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConf), given))


register_sweeper_configs()
