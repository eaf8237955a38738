"""Protections that stop a run early and say why: non-finite loss, unsafe files, remote code.

- :class:`NonFiniteLossGuard` ends training at the first logged loss that is NaN or inf (the
  Trainer's ``logging_nan_inf_filter`` is off, so the loss it sees is the real one).
- :func:`assert_safetensors_only` and :func:`assert_safe_checkpoint` refuse adapters and
  checkpoints whose weights are pickles: unpickling runs code, safetensors cannot.
- :func:`check_remote_code` refuses a model that needs code from its checkpoint unless
  ``model.trust_remote_code=true``.
- :func:`model_source_problem` stops a hub model that is not cached and cannot be downloaded, in seconds.
- :func:`run_fingerprint` is what defines a run's checkpoints; :class:`FingerprintWriter` saves it in each
  checkpoint, and :func:`check_resume` refuses to resume one with another (another dataset, labels, base, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Union

from transformers import TrainerCallback

from src.config import Config, ConfigError, config_changes
from src.errors import UserError
from src.logger import say
from src.tiny import resolve_builtin

SAFE_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
# Trainer state the HF Trainer reads back with torch.load(weights_only=True): tensors and plain data only.
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")
# Written by the Trainer, never read back by it, and not read here.
NEVER_LOADED = {"training_args.bin"}


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or inf."""


class UnsafeFileError(UserError, ValueError):
    """An adapter or checkpoint holds pickled weights, or a Trainer state file that needs code to load."""


class CheckpointNotFound(UserError, FileNotFoundError):
    """``train.resume_from_checkpoint`` names no Trainer checkpoint."""


class RemoteCodeError(UserError, ValueError):
    """The model needs Python code from its checkpoint and model.trust_remote_code is false."""


class NonFiniteLossGuard(TrainerCallback):
    """Raise :class:`NonFiniteLossError` at the first logged training loss that is NaN or inf.

    Runs after the metrics callback, so the bad value is in MLflow before the run ends FAILED.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss} at step {state.global_step} (logged every {args.logging_steps} "
                "steps); lower train.learning_rate, keep train.max_grad_norm > 0, or check the data"
            )


def _pickles(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def assert_safetensors_only(directory: Union[str, Path]) -> None:
    """Refuse an adapter or model directory unless its weights are safetensors and no file is a pickle.

    Call before ``PeftModel.from_pretrained`` or ``from_pretrained`` on a directory that came
    from elsewhere (a downloaded run, a shared folder).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UnsafeFileError(f"{directory}: not a directory")
    pickles = [p for p in _pickles(directory) if p.name not in NEVER_LOADED]
    if pickles:
        names = ", ".join(str(p.relative_to(directory)) for p in pickles)
        raise UnsafeFileError(
            f"{directory} holds pickle files ({names}); loading a pickle can run arbitrary code, so only "
            "safetensors are loaded. Re-save the weights with save_pretrained(safe_serialization=True)."
        )
    if not any((directory / name).is_file() for name in SAFE_WEIGHTS):
        raise UnsafeFileError(f"{directory} has no safetensors weights (expected one of {', '.join(SAFE_WEIGHTS)})")


def assert_safe_checkpoint(directory: Union[str, Path]) -> None:
    """Refuse a Trainer checkpoint to resume from unless its weights are safetensors and its
    optimizer, scheduler and RNG states load as plain data (``torch.load(weights_only=True)``).
    """
    import torch
    from transformers.trainer_pt_utils import safe_globals

    directory = Path(directory)
    state = {p for pattern in TRAINER_STATE_FILES for p in directory.glob(pattern)}
    weights = [p for p in _pickles(directory) if p not in state and p.name not in NEVER_LOADED]
    if weights:
        names = ", ".join(str(p.relative_to(directory)) for p in weights)
        raise UnsafeFileError(f"checkpoint {directory} holds pickled weights ({names}); only safetensors are loaded")
    if not any((directory / name).is_file() for name in SAFE_WEIGHTS):
        raise UnsafeFileError(f"checkpoint {directory} has no safetensors weights")
    for path in sorted(state):
        try:
            with safe_globals():  # the Trainer's allowlist: numpy arrays (the RNG state) are plain data too
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UnsafeFileError(
                f"checkpoint file {path} does not load as plain tensors (torch.load weights_only=True): "
                f"{str(exc).splitlines()[0]}"
            ) from exc


def resume_checkpoint(setting: Optional[str], checkpoints_dir: Union[str, Path]) -> Optional[str]:
    """The checkpoint to resume from for ``train.resume_from_checkpoint``, checked safe; None to start fresh.

    ``latest`` takes the newest ``checkpoint-N`` in ``checkpoints_dir`` and starts fresh if
    there is none, so a sweep can be re-run with it; a path must be a Trainer checkpoint.
    """
    if setting is None:
        return None
    if setting == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        path = get_last_checkpoint(str(checkpoints_dir)) if Path(checkpoints_dir).is_dir() else None
        if path is None:
            say(f"note: no checkpoint in {checkpoints_dir} to resume from; starting from step 0", logging.WARNING)
            return None
    else:
        path = setting
        if not (Path(path) / "trainer_state.json").is_file():
            raise CheckpointNotFound(
                f"train.resume_from_checkpoint={setting}: not a Trainer checkpoint (no trainer_state.json there)"
            )
    assert_safe_checkpoint(path)
    return str(path)


def check_remote_code(name_or_path: str, revision: Optional[str], trust_remote_code: bool) -> None:
    """Raise :class:`RemoteCodeError` if the model's architecture exists only as code in its checkpoint.

    A config with ``auto_map`` whose ``model_type`` the installed transformers implements loads
    the built-in class and runs nothing from the checkpoint, so it is allowed (Phi-3 is one).
    """
    if trust_remote_code:
        return
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        config, _ = PretrainedConfig.get_config_dict(resolve_builtin(name_or_path), revision=revision)
    except (OSError, ValueError):
        return  # no config to read here: loading the model reports that itself
    model_type, auto_map = config.get("model_type"), config.get("auto_map") or {}
    if auto_map and model_type not in CONFIG_MAPPING_NAMES:
        code = sorted(
            {ref for value in auto_map.values() for ref in ([value] if isinstance(value, str) else value) if ref}
        )
        raise RemoteCodeError(
            f"model {name_or_path!r} needs code from its checkpoint: model_type {model_type!r} is not built into "
            f"transformers and its config maps to {code}. That code would run on this "
            "machine; set model.trust_remote_code=true only if you trust its source and revision."
        )


class PickleWeightsError(UserError, ValueError):
    """The base model's weights exist only as pickle files and model.allow_pickle_weights is false."""


def check_weight_format(name_or_path: str, allow_pickle: bool) -> None:
    """Raise :class:`PickleWeightsError` for a local model directory that holds pickled weights and no safetensors.

    Loading a pickle can run code, whatever ``weights_only`` blocks today; the policy is safetensors. A hub id
    is held to the same rule by ``use_safetensors=True`` at load time (src.modeling).
    """
    path = Path(resolve_builtin(name_or_path))
    if allow_pickle or not path.is_dir():
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles and not any(path.glob("*.safetensors")):
        raise PickleWeightsError(
            f"model {name_or_path!r} holds only pickled weights ({', '.join(pickles[:3])}), which can run code when "
            "loaded; convert them to safetensors, or set model.allow_pickle_weights=true if you trust the files"
        )


FINGERPRINT_NAME = "run_fingerprint.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(cfg: Config, task: str, labels: Optional[list]) -> dict[str, Any]:
    """What defines a run's checkpoints, as JSON stores it: the data (each local file's content hash, or the hub
    dataset's id, config, revision and splits), its task and labels, the base model and its revision,
    ``model.max_length``, and every ``quant`` and ``lora`` setting. A file's place is not part of it (a moved
    copy is the same data); the speed of training and where it logs are not either."""
    data = cfg.data
    found: dict[str, Any] = {"data.task": task, "data.labels": None if labels is None else list(labels)}  # sft: None
    for key in ("path", "eval_path"):
        value = getattr(data, key)
        if value:
            found[f"data.{key}.sha256"] = _sha256(value) if Path(value).is_file() else str(Path(value).resolve())
    if data.hub_id:
        for key in ("hub_id", "hub_config", "revision", "train_split", "eval_split"):
            found[f"data.{key}"] = getattr(data, key)
    found.update(
        {
            "model.name_or_path": cfg.model.name_or_path,
            "model.revision": cfg.model.revision,
            "model.max_length": cfg.model.max_length,
        }
    )
    found.update({f"quant.{k}": v for k, v in dataclasses.asdict(cfg.quant).items()})
    # A lora key at its schema default (one added after checkpoints were saved: use_dora ...) is left out, so that
    # a checkpoint of plain LoRA saved before the key existed still resumes.
    later = {f.name: f.default for f in dataclasses.fields(cfg.lora) if f.default is not dataclasses.MISSING}
    lora = {k: v for k, v in dataclasses.asdict(cfg.lora).items() if k not in later or v != later[k]}
    found.update({f"lora.{k}": v for k, v in lora.items()})
    return json.loads(json.dumps(found, default=str))


def check_resume(checkpoint: str, fingerprint: dict[str, Any]) -> None:
    """Raise ConfigError, naming every key that differs (checkpoint vs this run), if ``checkpoint`` was trained
    on another configuration. A checkpoint saved without a fingerprint cannot be checked: a note says so."""
    path = Path(checkpoint) / FINGERPRINT_NAME
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        say(f"note: {checkpoint} has no {FINGERPRINT_NAME}; its data and settings are not checked", logging.WARNING)
        return
    except (OSError, ValueError) as exc:
        raise ConfigError([f"train.resume_from_checkpoint: {path} is unreadable ({exc})"]) from exc
    changes = config_changes(stored if isinstance(stored, dict) else {}, fingerprint)
    if changes:
        raise ConfigError(
            [
                f"train.resume_from_checkpoint: {checkpoint} was trained on another configuration (checkpoint vs this "
                "run); resume it with its own, or start afresh",
                *changes,
            ]
        )


class FingerprintWriter(TrainerCallback):
    """Save the run's fingerprint (:func:`run_fingerprint`) in each checkpoint, beside its weights."""

    def __init__(self, fingerprint: dict[str, Any]):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and directory.is_dir():
            (directory / FINGERPRINT_NAME).write_text(json.dumps(self.fingerprint, indent=2) + "\n")
