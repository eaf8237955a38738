"""The composed Hydra config: composing it outside a run, resolving it, and the one validation pass over it.

The YAML files under ``conf/`` are plain; the dataclasses of :mod:`src.config_schema` are the schema (not
registered as Hydra config groups, which would list them in ``--help`` as options to compose). :func:`validate`
runs every check of :mod:`src.config_checks` and raises a single :class:`ConfigError` listing *every* problem,
instead of stopping at the first as OmegaConf's structured merge would. The schema's names are importable from here.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from src import outputs
from src.config_checks import (
    check_structure,
    logs_metric,
    metric_problems,
    per_label_metrics,
    rule_problems,
    template_problems,
)
from src.config_schema import (
    DERIVED_METRICS,
    FULL_FINE_TUNING,
    LORA_PRESETS,
    LR_SCHEDULERS,
    MAX_LORA_RANK,
    OBJECTIVE_DEFAULTS,
    OPTIMIZERS,
    PER_LABEL_METRIC,
    SAFETY_SETTINGS,
    TASK_METRICS,
    Config,
    DataConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    QuantConfig,
    TrackingConfig,
    TrainConfig,
    changes_base,
)
from src.errors import ProblemsError
from src.overrides import group_options
from src.overrides import problems as override_problems
from src.tiny import PROJECT_ROOT

__all__ = [
    "CONF_DIR",
    "DERIVED_METRICS",
    "FULL_FINE_TUNING",
    "LORA_PRESETS",
    "LR_SCHEDULERS",
    "MAX_LORA_RANK",
    "OBJECTIVE_DEFAULTS",
    "OPTIMIZERS",
    "PER_LABEL_METRIC",
    "SAFETY_SETTINGS",
    "TASK_METRICS",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "QuantConfig",
    "TrackingConfig",
    "TrainConfig",
    "changes_base",
    "check_overrides",
    "compose",
    "config_changes",
    "literal",
    "logs_metric",
    "metric_problems",
    "objective",
    "per_label_metrics",
    "refuse_unresolved",
    "register_resolvers",
    "resolve",
    "template_problems",
    "validate",
]


class ConfigError(ProblemsError):
    """The composed config is invalid; the message lists every problem found."""

    title = "invalid config"


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose value differs between two flat configs (a checkpoint's fingerprint, a study's definition)
    and this run's, as ``key: old vs new``."""
    unset = "(unset)"
    keys = sorted(k for k in stored.keys() | current.keys() if stored.get(k, unset) != current.get(k, unset))
    return [f"{k}: {json.dumps(stored.get(k, unset))} vs {json.dumps(current.get(k, unset))}" for k in keys]


CONF_DIR = PROJECT_ROOT / "conf"


def check_overrides(overrides: Sequence[str], config_dir: Path = CONF_DIR, config_name: str = "config") -> None:
    """Raise :class:`ConfigError` naming every unknown key and group option with the closest names: before Hydra,
    whose answer to a mistyped key is to add it with +."""
    problems = override_problems(list(overrides), Config, group_options(config_dir, config_name))
    if problems:
        raise ConfigError(problems)


def compose(
    overrides: list[str], config_dir: Path = CONF_DIR, config_name: str = "config", output_dir: str = "unused"
) -> dict:
    """Compose the Hydra config as ``src.train`` would, outside a Hydra run, as a plain resolved dict.

    A sweep config (``hydra.mode: MULTIRUN``) composes to its base config: the sweeper's search space lives
    under ``hydra``, which is dropped here. ``output_dir`` stands in for ``${hydra:runtime.output_dir}``,
    which has no value outside a run. An unknown key or group option raises :class:`ConfigError`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    check_overrides(overrides, config_dir, config_name)
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        composed = hydra_compose(config_name=config_name, overrides=list(overrides))
    raw = OmegaConf.to_container(composed, resolve=False)
    raw.pop("hydra", None)
    raw["output_dir"] = output_dir
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


def literal(tree: Any) -> Any:
    """A resolved config (plain dicts and lists) with every string escaped for OmegaConf, so that a config made
    from it and resolved again reads each string as it is: ``${oc.env:HOME}`` in a resolved value is text."""
    if isinstance(tree, dict):
        return {key: literal(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [literal(value) for value in tree]
    if isinstance(tree, str):  # OmegaConf reads \${ as a literal ${, and \\${ as a backslash before one
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", tree)
    return tree


def resolve(cfg: Any) -> tuple[dict, dict[str, str]]:
    """The composed config as a plain dict with every interpolation resolved, and the problems of those that
    cannot be (``{key: problem}``: an unset ``${oc.env:...}``, a reference to a missing key), each value kept as
    written. OmegaConf would stop at the first, with a traceback."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True), {}
    except OmegaConfBaseException:
        pass
    problems: dict[str, str] = {}

    def walk(written: Any, prefix: str) -> Any:
        if isinstance(written, dict):
            return {k: walk(v, f"{prefix}{k}.") for k, v in written.items()}
        key = prefix[:-1]
        try:
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except OmegaConfBaseException as exc:
            problems[key] = _unresolved(written, str(exc).strip().splitlines()[0])
            return written

    return walk(OmegaConf.to_container(cfg, resolve=False), ""), problems


def refuse_unresolved(unresolved: dict[str, str]) -> None:
    """Raise the ConfigError of :func:`resolve`'s problems, if it found any."""
    if unresolved:
        raise ConfigError(f"{key}: {problem}" for key, problem in unresolved.items())


def _unresolved(written: Any, reason: str) -> str:
    env = re.search(r"\$\{oc\.env:([^,}]+)", str(written)) or re.search(r"Environment variable '([^']+)'", reason)
    if env:
        name = env.group(1).strip()
        return f"{written}: environment variable {name} is not set; set it, or give a default: ${{oc.env:{name},...}}"
    return f"{written} cannot be resolved: {reason}"


def register_resolvers() -> None:
    """Register the resolvers the YAML files use (``project_root``, ``file_stem``, ``unique_dir``)."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("unique_dir"):  # cached: a sweep's jobs share the sweep's directory
        OmegaConf.register_new_resolver("unique_dir", outputs.unique_dir, use_cache=True)
    if not OmegaConf.has_resolver("file_stem"):  # data=file names its runs after the file: reviews.csv -> reviews
        OmegaConf.register_new_resolver("file_stem", lambda path, default: Path(path).stem if path else default)


def validate(raw: Any, *, for_training: bool = False) -> Config:
    """Validate a composed config (DictConfig or dict); raise one ConfigError listing every problem.

    ``for_training``: also check that this machine can train it (a CUDA GPU for bf16, fp16 or tf32).
    """
    if not isinstance(raw, dict):
        raw = OmegaConf.to_container(raw, resolve=True, throw_on_missing=False)
    checked, problems = check_structure({k: v for k, v in raw.items() if k != "hydra"})
    problems += rule_problems(checked, for_training=for_training)
    if problems:
        raise ConfigError(problems)
    config = Config(**checked.sections)
    config._resolved = copy.deepcopy(raw)
    return config


def objective(cfg: Config) -> tuple[str, str]:
    """The metric a sweep optimizes and its direction, from the config or the task's default."""
    metric, direction = OBJECTIVE_DEFAULTS[cfg.data.task]
    return cfg.objective.metric or metric, cfg.objective.direction or direction


register_resolvers()
