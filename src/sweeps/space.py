"""An Optuna study's search space, from Hydra's override grammar, and the overrides of one trial.

``choice(4,8,16)`` or ``4,8,16`` (categorical), ``range(1,9,2)`` (stepped), ``interval(0,0.1)`` and
``tag(log, interval(1e-5,1e-3))`` (continuous). A param that is not a config key is a sweep variable that only
feeds ``derived`` (``lora.alpha: lora.alpha_ratio * lora.r``).
"""

from __future__ import annotations

from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer

from src.sweeps.record import SweepFailed


def distribution(override: Override):
    """The Optuna distribution of a sweep override (choice, range, interval, tag(log, ...))."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key = override.get_key_element()
    if override.is_choice_sweep():
        values = [
            v if v is None or isinstance(v, (int, float, bool)) else Transformer.str(v)
            for v in override.sweep_iterator()
        ]
        return CategoricalDistribution(values)
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        sweep = override.value()
        if all(isinstance(v, int) for v in values):
            return IntDistribution(min(values), max(values), step=abs(int(sweep.step)))
        return FloatDistribution(min(values), max(values), step=abs(float(sweep.step)))
    if override.is_interval_sweep():
        sweep = override.value()
        log = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    raise SweepFailed(f"{key}: unsupported sweep {override.input_line!r}")


def search_space(parser: OverridesParser, params: Optional[dict], arguments: list[str]) -> tuple[dict, list[str]]:
    """(name -> distribution, fixed overrides): ``params`` from the config, then the command line's."""
    items = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides(items):  # later items win, as on Hydra's command line
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = f"{key}={override.get_value_element_as_str()}"
    return space, list(fixed.values())


def evaluate_derived(expression: str, params: dict[str, Any]) -> Any:
    """A product of params and numbers, e.g. ``lora.alpha_ratio * lora.r``; integral results are ints."""
    value: float = 1.0
    for factor in expression.split("*"):
        factor = factor.strip()
        if factor in params:
            value *= params[factor]
        else:
            try:
                value *= float(factor)
            except ValueError:
                raise SweepFailed(
                    f"hydra.sweeper.derived: {factor!r} in {expression!r} is neither a param "
                    f"nor a number (params: {', '.join(params)})"
                ) from None
    return int(value) if float(value).is_integer() else value


def trial_overrides(params: dict[str, Any], variables: set[str], derived: dict[str, str]) -> list[str]:
    """A trial's overrides: its params (sweep variables left out) and the derived keys."""
    out = []
    for key, value in params.items():
        if key not in variables:
            out.append(f"{key}={value if isinstance(value, str) else Transformer.str(value)}")
    for key, expression in derived.items():
        out.append(f"{key}={evaluate_derived(expression, params)}")
    return out
