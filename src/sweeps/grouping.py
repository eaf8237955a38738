"""Packs of a sweep (``hydra.sweeper.pack=K``): which jobs may train together on one base, and how they are grouped.

A pack is the jobs with the same base key (:func:`base_key`; up to ``pack_jobs`` of them), launched as one job that
trains K at a time: the launcher runs the first job's overrides with ``LORA_SWEEP_PACK`` naming a file of the slots
and every member's resolved config (:func:`write_pack`), and ``src.train`` trains them on one base
(:func:`src.sweeps.job.run_pack_job`, :mod:`src.packs.model`): as one ends, the next takes its slot. A job that cannot
be packed (:func:`unpackable`) runs alone, as without ``pack``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from src.config import ConfigError, validate
from src.config_schema import unshareable_variant
from src.memory import plans_own_micro_batches

PACK_ENV = "LORA_SWEEP_PACK"  # a pack job's member file


def unpackable(cfg) -> Optional[str]:
    """Why a validated config cannot train in a pack, or None."""
    if cfg.data.task != "sft" and not plans_own_micro_batches(cfg):
        return (
            f"data.task={cfg.data.task} on {cfg.model.name}: a pack's classifiers train on flat rows, which take "
            "decoders and BERT (its config.json must be local)"
        )
    if cfg.lora.preset == "none":
        return "lora=none trains the whole base, which the pack shares"
    if cfg.lora.bias != "none":
        return f"lora.bias={cfg.lora.bias} trains the base's biases, which the pack shares"
    if cfg.lora.modules_to_save:
        return "lora.modules_to_save trains base modules, which the pack shares"
    variant = unshareable_variant(cfg.lora)
    if variant is not None:
        return variant
    if not cfg.train.fast_path:
        return "train.fast_path=false: packs run on the fast path"
    if cfg.train.nproc_per_node > 1:
        return "train.nproc_per_node > 1: a pack runs on one GPU"
    if cfg.train.resume_from_checkpoint:
        return "train.resume_from_checkpoint: a pack starts its trials afresh"
    if cfg.train.fp16:
        return "train.fp16: packs train in bf16 or fp32 (one loss scaler per trial is not done)"
    return None


def base_key(raw: dict) -> str:
    """What the jobs of a pack share: the model, its quantization, the data (and so the task), the precision and
    the tracking store. Two jobs with the same key load the same base and read the same rows."""
    train = raw.get("train") or {}
    shared = {
        "model": raw.get("model"),
        "quant": raw.get("quant"),
        "data": raw.get("data"),
        "precision": [train.get("bf16"), train.get("fp16"), train.get("memory_budget_gb")],
        "tracking": (raw.get("tracking") or {}).get("tracking_uri"),
    }
    return json.dumps(shared, sort_keys=True, default=str)


def member_config(config_loader, config: DictConfig, overrides: Sequence[str], number: int) -> dict:
    """A job's resolved config as its launch would resolve it: job number ``number``, its output directory
    ``hydra.sweep.dir/hydra.sweep.subdir`` (absolute, as Hydra sets ``runtime.output_dir``)."""
    job = config_loader.load_sweep_config(config, list(overrides))
    with open_dict(job):
        job.hydra.job.num = number
    output_dir = Path(str(OmegaConf.select(job, "hydra.sweep.dir"))) / str(OmegaConf.select(job, "hydra.sweep.subdir"))
    raw = OmegaConf.to_container(job, resolve=False)
    raw.pop("hydra", None)
    raw["output_dir"] = str(output_dir.absolute())
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


def group(
    raws: Sequence[Optional[dict]],
    size: int,
    say: Optional[Callable[[int, str], None]] = None,
    jobs: Optional[int] = None,
) -> list[list[int]]:
    """The jobs (by index) as units to launch: packs of up to ``jobs`` (None: all) jobs of one base key, trained
    ``size`` at a time, in the order of their first job; a job that cannot be packed (or whose config did not
    compose: None) is a unit alone, and ``say`` is told its index and why. ``size`` 1: every job alone."""
    units: list[list[int]] = []
    open_packs: dict[str, list[int]] = {}
    for index, raw in enumerate(raws):
        if size <= 1:
            units.append([index])
            continue
        reason = "its config does not compose" if raw is None else why_alone(raw)
        if reason is not None:
            if say is not None:
                say(index, reason)
            units.append([index])
            continue
        key = base_key(raw)
        pack = open_packs.get(key)
        if pack is None or (jobs is not None and len(pack) >= jobs):
            pack = open_packs[key] = []
            units.append(pack)
        pack.append(index)
    return units


def why_alone(raw: dict) -> Optional[str]:
    """Why a job trains alone (:func:`unpackable`, or a config that does not validate: it fails as its own job)."""
    try:
        cfg = validate({**raw}, for_training=True)
    except ConfigError:
        return "its config does not validate"
    return unpackable(cfg)


def write_pack(path: Path, members: Sequence[tuple[int, dict, dict[str, str]]], slots: int) -> Path:
    """The member file of a pack job: its slots (trials at once) and each member's number, resolved config and own
    environment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    listed = [{"number": n, "raw": raw, "env": env} for n, raw, env in members]
    path.write_text(json.dumps({"slots": slots, "members": listed}, default=str))
    return path


def read_pack(path: str) -> tuple[int, list[dict[str, Any]]]:
    """(slots, members) of a member file (:func:`write_pack`)."""
    written = json.loads(Path(path).read_text())
    return written["slots"], written["members"]
