"""Rules of the config's validation that hold one setting against its domain, the installed libraries or the
model's own config.json: small functions, each returning the problems it finds, which :func:`src.config.validate`
(and the sweepers, for ``hydra.sweeper``) gather into one error.

A numeric field's domain is declared on the field itself (:func:`bounded`) and checked by :func:`domain_problem`
for every field of every schema dataclass, so no value reaches the code outside it: a count below 1, a fraction
outside (0, 1), a NaN or an infinity in any float.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

BOUNDS = ("ge", "gt", "le", "lt")


def bounded(help: Optional[str] = None, default: Any = dataclasses.MISSING, **domain: Any) -> Any:
    """A numeric field and its domain: ``ge``, ``gt``, ``le``, ``lt``, and ``why_high``, why the upper bound is there.

    Every float field must be finite, bounded or not; None (a nullable field left unset) is always in the domain.
    ``help`` is the metadata key every schema field's description uses.
    """
    unknown = set(domain) - {*BOUNDS, "why_high"}
    if unknown:
        raise TypeError(f"unknown domain keys {sorted(unknown)}")
    return dataclasses.field(default=default, metadata={**domain, **({"help": help} if help else {})})


def domain_problem(key: str, value: Any, metadata: Mapping[str, Any]) -> Optional[str]:
    """Why ``value`` is outside the domain in a field's ``metadata``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}: must be finite, got {value}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    ge, gt, le, lt = (metadata.get(name) for name in BOUNDS)
    low_ok = (ge is None or value >= ge) and (gt is None or value > gt)
    high_ok = (le is None or value <= le) and (lt is None or value < lt)
    if low_ok and high_ok:
        return None
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    high = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    if low and high and "why_high" not in metadata:
        return f"{key}: must be in {low}, {high}, got {value}"
    if not low_ok:
        return f"{key}: must be {'>=' if ge is not None else '>'} {low[1:]}, got {value}"
    why = f" ({metadata['why_high']})" if "why_high" in metadata else ""
    return f"{key}: must be {'<=' if le is not None else '<'} {high[:-1]}{why}, got {value}"


def domain_problems(cls: type, values: Mapping[str, Any], prefix: str) -> list[str]:
    """Every value of ``values`` outside the domain of its field in dataclass ``cls``, nested dataclasses too."""
    hints = typing.get_type_hints(cls)
    problems = []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, Mapping):
            problems += domain_problems(hints[f.name], value, f"{prefix}{f.name}.")
        elif problem := domain_problem(f"{prefix}{f.name}", value, f.metadata):
            problems.append(problem)
    return problems


def template_field_problem(key: str, template: str, name: str, conversion: Optional[str], spec: str) -> Optional[str]:
    """Why one ``{...}`` field of a data template is refused: a template names columns, nothing else. A format
    spec (``{text:>1500000000}`` pads to any width, so one row could take gigabytes), a conversion (``!r``) or an
    attribute or index read is not a column."""
    shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
    if name == "" or name.isdigit():
        return f"{key}: positional field {shown!r} in {template!r}; name a column, e.g. {{text}}"
    if "." in name or "[" in name:
        return f"{key}: field {shown!r} in {template!r} reads an attribute or an index; name a column"
    if conversion or spec:
        return f"{key}: field {shown!r} in {template!r} has a conversion or format spec; write only {{{name}}}"
    return None


# train.optim values whose optimizer transformers imports from another package: (module, pip name).
OPTIMIZER_PACKAGES = {
    **dict.fromkeys(
        (
            *("adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit"),
            *("paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit"),
            *("paged_lion_32bit", "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"),
        ),
        ("bitsandbytes", "bitsandbytes"),
    ),
    **dict.fromkeys(("adamw_torch_4bit", "adamw_torch_8bit"), ("torchao", "torchao")),
    **dict.fromkeys(
        ("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd"), ("schedulefree", "schedulefree")
    ),
    **dict.fromkeys(("lomo", "adalomo"), ("lomo_optim", "lomo-optim")),
    "grokadamw": ("grokadamw", "grokadamw"),
    "stable_adamw": ("optimi", "torch-optimi"),
    "adamw_anyprecision": ("torchdistx", "torchdistx"),
    "adamw_torch_xla": ("torch_xla", "torch_xla"),
    "adamw_torch_npu_fused": ("torch_npu", "torch_npu"),
}
# Low-rank optimizers: transformers refuses them without TrainingArguments.optim_target_modules, a key the schema
# does not have, so they could never run.
NEEDS_TARGET_MODULES = (
    *("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise"),
    *("galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "apollo_adamw", "apollo_adamw_layerwise"),
)
# Schedulers whose transformers function raises without lr_scheduler_kwargs, a key the schema does not have: the keys.
SCHEDULER_KWARGS = {
    "cosine_with_min_lr": "min_lr or min_lr_rate",
    "cosine_warmup_with_min_lr": "min_lr or min_lr_rate",
    "warmup_stable_decay": "num_decay_steps",
}


def optimizer_problems(optim: str) -> list[str]:
    """Why ``train.optim`` cannot run here: its package is not installed, or it needs a key the schema lacks."""
    if optim in NEEDS_TARGET_MODULES:
        return [
            f"train.optim={optim}: needs optim_target_modules (the layers it projects), which this config cannot "
            "set; use adamw_torch, or paged_adamw_8bit for 8-bit optimizer states"
        ]
    module, package = OPTIMIZER_PACKAGES.get(optim, (None, None))
    if module is None or importlib.util.find_spec(module) is not None:
        return []
    return [f"train.optim={optim}: needs the {module} package, which is not installed: pip install {package}"]


def scheduler_problems(scheduler: str) -> list[str]:
    """Why ``train.lr_scheduler_type`` cannot run: it needs scheduler arguments the schema cannot give."""
    if scheduler not in SCHEDULER_KWARGS:
        return []
    return [
        f"train.lr_scheduler_type={scheduler}: needs lr_scheduler_kwargs {SCHEDULER_KWARGS[scheduler]}, which this "
        "config cannot set; use cosine, linear or constant_with_warmup"
    ]


def read_model_config(path_or_id: str, revision: Optional[str], trust_remote_code: bool):
    """The transformers config of a local directory or a hub id in the local hub cache, never downloaded; raises
    OSError or ValueError where it cannot be read so."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        path_or_id, revision=revision, trust_remote_code=trust_remote_code, local_files_only=True
    )


def model_positions(name_or_path: str, revision: Optional[str]) -> Optional[int]:
    """The model's ``max_position_embeddings`` from its config.json (:func:`read_model_config`, as src.plan reads
    it), from a local directory or the hub cache: never downloaded, and the checkpoint's code never run. None where
    it cannot be read so; a hub id is looked up in the cache first, so an uncached one costs no transformers import."""
    from src.tiny import ARCH, BUILTIN_PREFIX, BUILTINS

    if name_or_path.startswith(BUILTIN_PREFIX):  # its config.json is written from ARCH, when first built
        return ARCH["max_position_embeddings"] if name_or_path[len(BUILTIN_PREFIX) :] in BUILTINS else None
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        directory = local if (local / "config.json").is_file() else None
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        except Exception:  # not a valid repo id: loading the model reports that itself
            return None
        directory = Path(cached).parent if isinstance(cached, str) else None
    if directory is None:
        return None
    try:
        config = read_model_config(str(directory), revision, trust_remote_code=False)
    except Exception:  # remote code, an unknown model_type, a broken file: loading the model reports it
        return None
    positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0 else None


def max_length_problems(name_or_path: str, revision: Optional[str], max_length: int) -> list[str]:
    """``model.max_length`` beyond the positions the model has: each row would be padded or packed past them."""
    positions = model_positions(name_or_path, revision)
    if positions is None or max_length <= positions:
        return []
    return [
        f"model.max_length: {max_length} is more than the {positions} positions of model {name_or_path!r} "
        f"(max_position_embeddings in its config.json); use model.max_length={positions} or less"
    ]
