"""Command-line overrides checked against the schema and the config groups before Hydra reads them.

Hydra answers a mistyped key (``lora.rank=16``) with "To append to your config use +lora.rank=16", which is the
wrong advice here: the schema refuses the added key afterwards. So each entry point checks its overrides first
and names the closest keys or options ("lora.rank: unknown key; did you mean lora.r?"). Keys under ``hydra``,
and those added or deleted (``+key``, ``++key``, ``~key``), are left to Hydra; sweep values (``lora.r=4,8``,
``range(...)``) are values like any other, and each option of a group's sweep (``lora=attn,mlp``) is checked.

Where it runs: ``src.train``'s command line (:func:`src.train.preflight`, which also prints ``--help``),
:func:`src.config.compose` (``src.plan`` and every other composing caller), and a sweep file's rows, params and
derived keys (:func:`src.sweeps.configs.vet`). The schema is passed in (:class:`src.config.Config`), so this module
imports no other of the project's.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

# How close a name must be to be offered (difflib's ratio): lora.rank -> lora.r is 0.8, model -> modle 0.8.
CUTOFF = 0.6
# Names offered besides the nearest are as near to within this much: max_step gets max_steps, not save_steps too.
MARGIN = 0.1


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The names among ``candidates`` nearest to ``word``, best first (at most ``n``; none when nothing is
    close): difflib's nearest and those nearly as near, else the names that one starts ("rank" -> "r") or
    that hold the word ("epochs" -> "num_train_epochs")."""
    names = list(dict.fromkeys(candidates))
    scored = sorted(((difflib.SequenceMatcher(None, word, name).ratio(), name) for name in names), reverse=True)
    near = [name for score, name in scored if score >= max(CUTOFF, scored[0][0] - MARGIN)] if scored else []
    if not near:
        near = [name for name in names if word.startswith(name) or name.startswith(word)]
        near += [name for name in names if len(word) >= 3 and word in name]
    return list(dict.fromkeys(near))[:n]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean lora.r?"`` for the closest candidates, or ``""``."""
    names = closest(word, candidates)
    return f"; did you mean {' or '.join(names)}?" if names else ""


def schema_fields(schema: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every key of a dataclass schema, nested sections included, by dotted path: ``{"lora.r": Field, ...}``."""
    hints = typing.get_type_hints(schema)
    found: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(schema):
        found[prefix + f.name] = f
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(schema_fields(hints[f.name], f"{prefix}{f.name}."))
    return found


def _sections(fields: dict[str, dataclasses.Field]) -> set[str]:
    return {key.rsplit(".", 1)[0] for key in fields if "." in key}


def key_problem(key: str, schema: type) -> Optional[str]:
    """Why the dotted ``key`` names no field of ``schema``, with the closest keys, or None."""
    fields = schema_fields(schema)
    if key in fields:
        return None
    parent, _, leaf = key.rpartition(".")
    if parent in fields and parent not in _sections(fields):
        # An index into a list field (data.labels.0=...) is a key OmegaConf takes.
        tp = _field_type(schema, parent)
        if leaf.isdigit() and any(typing.get_origin(t) is list for t in (tp, *typing.get_args(tp))):
            return None
        return f"{key}: unknown key ({parent} takes a value, not keys)"
    sections = _sections(fields)
    section = parent if parent in sections else ""
    siblings = {k.rpartition(".")[2]: k for k in fields if k.rpartition(".")[0] == section}
    leaves = sorted(set(fields) - sections)
    if parent and parent not in sections:  # a section mistyped: lroa.r
        names = closest(key, leaves)
    else:  # a sibling, else the same name in another section (lora.learning_rate), else a near one (rank)
        names = [siblings[name] for name in closest(leaf, siblings)]
        names = names or [k for k in leaves if k.rpartition(".")[2] == leaf]
        if not names and not parent:
            by_leaf = {k.rpartition(".")[2]: k for k in leaves}
            names = [by_leaf[name] for name in closest(leaf, by_leaf)]
    if names:
        hint = f"; did you mean {' or '.join(names)}?"
    else:
        hint = f" ({section or 'top-level'} keys: {', '.join(siblings)})"
    return f"{key}: unknown key{hint}"


def _field_type(schema: type, key: str) -> Any:
    for part in key.split(".")[:-1]:
        schema = typing.get_type_hints(schema)[part]
    return typing.get_type_hints(schema)[key.rsplit(".", 1)[-1]]


def group_options(
    primary_dir: Path, config_name: str, extra_dir: Optional[Path] = None
) -> Optional[dict[str, list[str]]]:
    """The config groups outside ``hydra/`` and their options, as Hydra finds them for this primary config and
    ``-cd`` directory (:func:`groups_on`)."""
    sources = [("hydra", "pkg://hydra.conf")]
    if extra_dir is not None:  # before the main directory, as Hydra puts a -cd directory
        sources.append(("command-line", f"file://{Path(extra_dir).resolve()}"))
    sources += [("main", f"file://{Path(primary_dir).resolve()}"), ("schema", "structured://")]
    return groups_on(sources, config_name)


def groups_on(sources: Sequence[tuple[str, str]], config_name: str) -> Optional[dict[str, list[str]]]:
    """The config groups outside ``hydra/`` and their options on a search path of (provider, url) entries, with
    the primary config's own ``hydra.searchpath`` (a sweep config reaches ``conf/`` through it). None when Hydra
    cannot read the primary config: Hydra reports that itself.

    The search path is Hydra's without its plugins' additions, which only add ``hydra/`` groups: finding the
    plugins imports every one of them, seconds before a typo could be named.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra._internal.core_plugins.file_config_source import FileConfigSource
    from hydra._internal.core_plugins.importlib_resources_config_source import ImportlibResourcesConfigSource
    from hydra._internal.core_plugins.structured_config_source import StructuredConfigSource
    from hydra._internal.sources_registry import SourcesRegistry
    from hydra.core.object_type import ObjectType

    for source in (FileConfigSource, ImportlibResourcesConfigSource, StructuredConfigSource):
        SourcesRegistry.instance().register(source)
    search_path = ConfigSearchPathImpl()
    for provider, url in sources:
        search_path.append(provider, url)
    try:
        loader = ConfigLoaderImpl(config_search_path=search_path)
        groups = loader.get_group_options("", results_filter=ObjectType.GROUP, config_name=config_name)
        return {g: loader.get_group_options(g, config_name=config_name) for g in sorted(groups) if g != "hydra"}
    except Exception:  # noqa: BLE001 - a missing config or a broken file: Hydra's own message says which
        return None


def _option_problem(group: str, value: Any, options: Sequence[str]) -> Optional[str]:
    if value is None or "/" in str(value) or str(value) in options:  # null deselects; a/b is a nested option
        return None
    return f"{group}={value}: no such {group} option{did_you_mean(str(value), options)} (options: {', '.join(options)})"


def problems(overrides: Sequence[str], schema: type, groups: Optional[dict[str, list[str]]]) -> list[str]:
    """Every override whose key is no schema field or config group, or whose group option does not exist, with
    the closest names. ``groups``: :func:`group_options`; None checks keys only. An override Hydra cannot parse
    is left to Hydra's message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    found = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException:
            continue
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if groups is not None and key in groups:
            if override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
                values = override.value().list
            elif override.value_type == ValueType.ELEMENT:
                values = [override.value()]
            else:  # glob(...) picks among the options; a range or interval of options is Hydra's to refuse
                values = []
            found += filter(None, (_option_problem(key, v, groups[key]) for v in values))
        elif groups is not None and "/" in key:
            found.append(f"{key}={override.get_value_string()}: no such config group{did_you_mean(key, groups)}")
        elif problem := key_problem(key, schema):
            if groups is not None and "." not in key:
                problem = _top_level_problem(key, schema, groups)
            found.append(problem)
    return found


def _top_level_problem(key: str, schema: type, groups: dict[str, list[str]]) -> str:
    names = [*groups, *(f.name for f in dataclasses.fields(schema))]
    listed = ", ".join(groups)
    return f"{key}: unknown key or group{did_you_mean(key, names) or f' (groups: {listed})'}"


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(args[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def field_help(f: dataclasses.Field, tp: Any) -> str:
    """A field's line of help: its type, its ``help`` metadata, its choices, its bounds."""
    meta = f.metadata
    parts = [meta["help"].rstrip(".")] if "help" in meta else []
    if "choices" in meta:
        parts.append("one of " + ", ".join(_type_name(c) if typing.get_origin(c) else repr(c) for c in meta["choices"]))
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts += [f"{op} {meta[name]}" for name, op in ops.items() if name in meta]
    return f"[{_type_name(tp)}] " + "; ".join(parts)


def help_text(command: str, schema: type, groups: Optional[dict[str, list[str]]]) -> str:
    """``--help``: the config groups with their options, then every key with its help."""
    lines = [
        f"usage: {command} [--multirun] [-cd DIR] [-cn NAME] [group=option ...] [key=value ...]",
        "",
        "Config groups (group=option; one file each under conf/<group>/):",
    ]
    for group, options in (groups or {}).items():
        lines.append(f"  {group:<12}{', '.join(options)}")
    if groups is None:
        lines.append("  (the config could not be read; python -m src.train --cfg job shows Hydra's error)")
    fields = schema_fields(schema)
    leaves = {key: f for key, f in fields.items() if key not in _sections(fields)}
    width = max(map(len, leaves)) + 2
    lines += ["", "Keys (key=value; a sweep: key=a,b or range(...)):"]
    lines += [f"  {key:<{width}}{field_help(f, _field_type(schema, key))}".rstrip() for key, f in leaves.items()]
    lines += ["", "Hydra's own flags (--cfg job, --info, -cp, ...): --hydra-help. Documentation: README.md."]
    return "\n".join(lines)


def parse_command_line(argv: Sequence[str]) -> Any:
    """Hydra's reading of a command line (``overrides``, ``help``, ``config_dir``, ``config_name``, ...)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(list(argv))


def primary_dir(config_path: Optional[str], default: Path, module_dir: Path) -> Path:
    """The primary config directory: ``-cp`` is absolute or relative to the entry point's file, as in Hydra."""
    if config_path is None:
        return default
    return Path(config_path) if os.path.isabs(config_path) else module_dir / config_path
