"""Load a trained adapter back for use: from an MLflow run, a sweep's best run, or a local directory.

A training run leaves one layout, both under its ``output_dir`` and as MLflow artifacts:
``adapter/`` (peft weights, tokenizer, ``label_map.json``) next to ``config.yaml`` (the
resolved config). Everything here reads that layout, so ``src.predict`` and ``src.export``
(:mod:`src.runs.predict`, :mod:`src.runs.export`) rebuild the base model, its quantization and the adapter
exactly as trained, with no setting retyped. Problems a user can fix (an unknown run, a missing artifact, a
base model that is not on this machine) raise :class:`InferenceError` with a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from src.config import OBJECTIVE_DEFAULTS, SAFETY_SETTINGS, Config, ConfigError, compose, validate
from src.errors import UserError
from src.logger import say
from src.names import filter_value, text_problem

ADAPTER_ARTIFACT = "adapter"
MODEL_ARTIFACT = "model"  # a full fine-tuning run (lora=none) saves the whole model instead of an adapter
CONFIG_ARTIFACT = "config.yaml"
LABEL_MAP_FILE = "label_map.json"
# Preset data configs whose column names stand in for a missing config.yaml, per task.
DEFAULT_DATA_PRESETS = {"classification": "topics", "multilabel": "topics_multilabel", "sft": "instructions"}


class InferenceError(UserError):
    """A problem the user can fix; the message is one line, fit to print without a traceback."""


@dataclass
class Source:
    """A trained adapter on disk with everything needed to rebuild its model."""

    adapter_dir: Path
    cfg: Config
    task: str
    labels: Optional[list[str]]  # class or label names; None for SFT
    threshold: float
    run_id: Optional[str] = None
    config_path: Optional[Path] = None  # the run's config.yaml, when there is one
    full_model: bool = False  # adapter_dir holds a whole fine-tuned model (lora=none), not an adapter


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _client(tracking_uri: Optional[str]):
    import mlflow

    from src import tracking

    uri = tracking.tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(), uri


def full_run_id(run_id: str, tracking_uri: Optional[str] = None) -> str:
    """A run id from a whole id or a unique prefix (the 8 characters ``src.compare`` prints)."""
    from src.runs.selection import RunNotFound, resolve_run_id

    client, uri = _client(tracking_uri)
    try:
        return resolve_run_id(client, run_id)
    except RunNotFound as exc:
        raise InferenceError(f"{exc} ({uri})" if exc.candidates else f"no MLflow run {run_id!r} in {uri}") from exc


def download_run(run_id: str, dest: Path, tracking_uri: Optional[str] = None) -> Path:
    """Download a run's ``adapter/`` (or a full fine-tuning run's ``model/``) and ``config.yaml`` into ``dest``
    (the training layout); return the directory of the adapter or model."""
    from mlflow.exceptions import MlflowException

    client, uri = _client(tracking_uri)
    run_id = full_run_id(run_id, tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise InferenceError(f"no MLflow run {run_id!r} in {uri} ({_one_line(exc)})") from exc
    names = {a.path for a in client.list_artifacts(run_id)}
    present = [n for n in (ADAPTER_ARTIFACT, MODEL_ARTIFACT) if n in names and client.list_artifacts(run_id, n)]
    saved = present[0] if present else None
    if saved is None:
        raise InferenceError(
            f"run {run_id} ({run.info.run_name}, status {run.info.status}) has no "
            f"'{ADAPTER_ARTIFACT}/' artifact (nor a full fine-tuning run's '{MODEL_ARTIFACT}/'): it failed before "
            "saving one, or was trained with tracking.log_adapter=false"
        )
    dest.mkdir(parents=True, exist_ok=True)
    client.download_artifacts(run_id, saved, str(dest))
    if CONFIG_ARTIFACT in names:
        client.download_artifacts(run_id, CONFIG_ARTIFACT, str(dest))
    return dest / saved


def best_sweep_run(sweep_id: str, tracking_uri: Optional[str] = None) -> str:
    """The id of a sweep's best finished child run by its ``objective`` metric and direction."""
    import mlflow

    _client(tracking_uri)
    if text_problem(sweep_id):
        raise InferenceError(f"--sweep-best {sweep_id!r} {text_problem(sweep_id)}")
    runs = mlflow.search_runs(
        search_all_experiments=True,
        output_format="list",
        filter_string=f"tags.sweep_id = {filter_value(sweep_id)} and attributes.status = 'FINISHED'",
    )
    scored = [r for r in runs if math.isfinite(r.data.metrics.get("objective", math.nan))]
    children = [r for r in scored if "mlflow.parentRunId" in r.data.tags]
    candidates = children or scored
    if not candidates:
        raise InferenceError(
            f"sweep {sweep_id!r} has no finished run with an 'objective' metric "
            f"({len(runs)} finished run(s) carry tag sweep_id={sweep_id})"
        )
    params = candidates[0].data.params
    direction = params.get("objective.direction")
    if direction in (None, "null", "None"):
        direction = OBJECTIVE_DEFAULTS[params["data.task"]][1]
    pick = max if direction == "maximize" else min
    return pick(candidates, key=lambda r: r.data.metrics["objective"]).info.run_id


def _default_config(base_model: str, task: str, labels: Optional[list[str]]) -> Config:
    """The project's default config (conf/config.yaml) for a task, with the adapter's base model.

    The base model's name is stored text (adapter_config.json): it is set in the composed, resolved config, never
    handed to Hydra or OmegaConf, where ``${...}`` in it would be resolved."""
    raw = compose([f"data={DEFAULT_DATA_PRESETS[task]}"])
    raw["model"].update(name_or_path=base_model, name=Path(base_model.replace("\\", "/")).name)  # a Windows path too
    if task == "multilabel" and labels:
        raw["data"]["label_columns"] = list(labels)
    return validate(raw)


def safety_flag(key: str) -> str:
    """The flag that grants a safety setting: ``model.allow_pickle_weights`` -> ``--allow-pickle-weights``."""
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def _with_setting(cfg: Config, key: str, value: Any) -> Config:
    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def _granted_only(cfg: Config, config_path: Optional[Path], granted: Collection[str]) -> Config:
    """``cfg`` with every safety setting (:data:`SAFETY_SETTINGS`) as the loading command grants it.

    A file in a run's artifacts must not relax a policy of the process that reads it (run a model directory's
    Python code, unpickle its weights): a stored setting the command did not grant is refused, naming its flag."""
    relaxed = [key for key in SAFETY_SETTINGS if _setting(cfg, key) and key not in granted]
    if relaxed:
        keys = ", ".join(f"{key}=true" for key in relaxed)
        flags = " ".join(safety_flag(key) for key in relaxed)
        raise InferenceError(
            f"the run's config ({config_path}) sets {keys}, and a stored config never relaxes a safety setting: "
            f"pass {flags} to this command if you trust the model"
        )
    for key in SAFETY_SETTINGS:
        cfg = _with_setting(cfg, key, key in granted)
    return cfg


def _setting(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InferenceError(f"{path}: not readable JSON ({exc}); restore the file the run saved") from exc
    if not isinstance(value, dict):
        raise InferenceError(f"{path}: not a JSON object but a {type(value).__name__}; restore the file the run saved")
    return value


def read_adapter_config(path: Path) -> dict:
    """``adapter_config.json``, checked for what loading it takes: a LoRA adapter with a positive rank and its
    target modules; an edited file fails here, naming the key, not deep inside peft."""
    config = _json_object(path)
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA' (the adapters this project trains)")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"r is {r!r}, not a positive integer")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    ):
        problems.append(f"target_modules is {targets!r}, not a module name pattern or a list of names")
    if problems:
        raise InferenceError(f"{path}: {'; '.join(problems)}; restore the file the run saved")
    return config


def read_label_map(path: Path) -> dict:
    """``label_map.json``: the task and, for a classifier, its distinct class or label names, in head order."""
    label_map = _json_object(path)
    task, labels = label_map.get("task"), label_map.get("labels")
    if task not in DEFAULT_DATA_PRESETS:
        problem = f"task is {task!r}, not one of {sorted(DEFAULT_DATA_PRESETS)}"
    elif task == "sft":
        problem = None
    elif not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        problem = f"labels is {labels!r}, not a list of names"
    elif len(set(labels)) != len(labels):
        problem = f"labels repeats a name: {sorted({x for x in labels if labels.count(x) > 1})}"
    else:
        problem = None
    threshold = label_map.get("threshold", 0.5)
    if problem is None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        problem = f"threshold is {threshold!r}, not a number"
    if problem:
        raise InferenceError(f"{path}: {problem}; restore the file the run saved")
    return label_map


def check_adapter_weights(adapter_dir: Path, peft_config: dict, labels: Optional[list[str]]) -> None:
    """The saved weights agree with the adapter's config and label map: each LoRA weight's rank is ``r``, its
    module is one ``target_modules`` names, and a classifier head has one output per label. peft would otherwise
    fail with a page of size mismatches, or worse, start fresh adapters on modules the file does not hold."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return  # assert_safetensors_only, before the load, names what is missing
    with safe_open(str(weights), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    r, targets = peft_config["r"], peft_config["target_modules"]
    lora_a = {k.removeprefix("base_model.model.").split(".lora_A.")[0]: v for k, v in shapes.items() if ".lora_A." in k}
    ranks = sorted({shape[0] for shape in lora_a.values()} - {r})
    untargeted = sorted(m for m in lora_a if not check_target_module_exists(LoraConfig(target_modules=targets), m))
    heads = [v[0] for k, v in shapes.items() if k.split(".")[-2] in ("score", "classifier") and k.endswith(".weight")]
    problems = []
    if ranks and not peft_config.get("rank_pattern"):  # a rank_pattern gives some modules other ranks
        problems.append(f"adapter_config.json: r={r}, but the saved LoRA weights have rank {ranks}")
    if untargeted:
        problems.append(f"adapter_config.json: target_modules does not name the saved modules {untargeted[:4]}")
    if labels is not None and heads and heads[0] != len(labels):
        problems.append(f"{LABEL_MAP_FILE}: {len(labels)} labels, but the saved classifier head has {heads[0]} outputs")
    if problems:
        raise InferenceError(f"{adapter_dir}: {'; '.join(problems)}; restore the files the run saved")


def read_source(
    adapter_dir: Path, run_id: Optional[str] = None, base_model: Optional[str] = None, granted: Collection[str] = ()
) -> Source:
    """Read an adapter directory and the ``config.yaml`` beside it (or in it).

    Without a config.yaml the base model comes from ``adapter_config.json`` and everything
    else from the project defaults, unquantized. ``base_model`` replaces model.name_or_path.
    ``granted``: the safety settings (:data:`src.config.SAFETY_SETTINGS`) the loading command turns on; they
    come from the command alone, never from the stored config (:func:`_granted_only`).
    """
    adapter_dir = Path(adapter_dir)
    adapter_config = adapter_dir / "adapter_config.json"
    full_model = not adapter_config.is_file() and (adapter_dir / "config.json").is_file()  # lora=none's model/
    if not adapter_config.is_file() and not full_model:
        raise InferenceError(
            f"{adapter_dir} is not an adapter directory (no adapter_config.json) nor a fully fine-tuned model "
            "(no config.json)"
        )
    peft_config = {} if full_model else read_adapter_config(adapter_config)
    label_map = _label_map(adapter_dir, peft_config)
    task = label_map["task"]
    if not full_model:
        check_adapter_weights(adapter_dir, peft_config, label_map.get("labels"))
    cfg, config_path = _run_config(adapter_dir, peft_config, task, label_map.get("labels"))
    cfg = _granted_only(cfg, config_path, granted)
    if base_model:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=base_model))
    if cfg.data.task != task:
        raise InferenceError(f"{adapter_dir}: {LABEL_MAP_FILE} says task {task!r}, its config {cfg.data.task!r}")
    # The threshold the run trained with; else (an adapter from elsewhere) the config's, whose default conf/ holds.
    threshold = float(label_map.get("threshold", cfg.data.threshold))
    if full_model:  # the fine-tuned weights are the model: load them from here, at the dtype they trained in
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(adapter_dir)))
    return Source(adapter_dir, cfg, task, label_map.get("labels"), threshold, run_id, config_path, full_model)


def _label_map(adapter_dir: Path, peft_config: dict[str, Any]) -> dict[str, Any]:
    """The run's task and class names: its label map, else (an SFT adapter from elsewhere) task ``sft``."""
    label_map_path = adapter_dir / LABEL_MAP_FILE
    if label_map_path.is_file():
        return read_label_map(label_map_path)
    if peft_config.get("task_type") == "CAUSAL_LM":
        return {"task": "sft", "labels": None}
    raise InferenceError(f"{adapter_dir} has no {LABEL_MAP_FILE}: the class names of this classifier are unknown")


def _run_config(
    adapter_dir: Path, peft_config: dict[str, Any], task: str, labels: Optional[list]
) -> tuple[Config, Optional[Path]]:
    """The run's config and its path: the ``config.yaml`` in or beside ``adapter_dir``, else the project defaults
    around the adapter's base model (path None)."""
    config_path = next(
        (p for p in (adapter_dir / CONFIG_ARTIFACT, adapter_dir.parent / CONFIG_ARTIFACT) if p.is_file()), None
    )
    if config_path is not None:
        try:
            return validate(yaml.safe_load(config_path.read_text())), config_path
        except ConfigError as exc:
            problems = "; ".join(exc.problems)
            raise InferenceError(f"the run's config ({config_path}) no longer validates: {problems}") from exc
    base = peft_config.get("base_model_name_or_path")
    if not base:
        raise InferenceError(
            f"{adapter_dir}: no {CONFIG_ARTIFACT} beside it and no base_model_name_or_path in "
            "adapter_config.json; pass --base-model"
        )
    say(
        f"note: no {CONFIG_ARTIFACT} beside {adapter_dir}; using the project defaults with base model {base}",
        logging.WARNING,
    )
    return _default_config(base, task, labels), None


@contextlib.contextmanager
def open_source(
    run: Optional[str] = None,
    sweep_best: Optional[str] = None,
    adapter: Optional[Path] = None,
    tracking_uri: Optional[str] = None,
    base_model: Optional[str] = None,
    granted: Collection[str] = (),
) -> Iterator[Source]:
    """Resolve exactly one of a run id, a sweep id (its best run) or an adapter directory.

    Run artifacts are downloaded to a temporary directory that lives as long as the context.
    """
    if sum(x is not None for x in (run, sweep_best, adapter)) != 1:
        raise InferenceError("give exactly one of --run, --sweep-best or --adapter")
    if adapter is not None:
        yield read_source(Path(adapter), base_model=base_model, granted=granted)
        return
    if sweep_best is not None:
        run = best_sweep_run(sweep_best, tracking_uri)
        say(f"note: best run of sweep {sweep_best} is {run}", logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="lora-run-") as tmp:
        run = full_run_id(run, tracking_uri)
        saved_dir = download_run(run, Path(tmp), tracking_uri)
        yield read_source(saved_dir, run_id=run, base_model=base_model, granted=granted)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick and rebuild a trained adapter, as ``src.predict`` and ``src.export`` take them."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="MLflow run id, or a unique prefix of one (as src.compare prints it)")
    which.add_argument("--sweep-best", metavar="SWEEP_ID", help="the best finished run of this sweep (tag sweep_id)")
    which.add_argument("--adapter", type=Path, metavar="DIR", help="a local adapter directory (<output_dir>/adapter)")
    parser.add_argument("--base-model", help="replaces the run's model.name_or_path (e.g. a local copy of it)")
    helps = {
        "model.trust_remote_code": "run the base model's own Python code (auto_map)",
        "model.allow_pickle_weights": "load a base model stored only as pickle (.bin), which can run code",
    }
    for key in SAFETY_SETTINGS:
        parser.add_argument(
            safety_flag(key), action="store_true", help=f"{helps[key]}; a run's stored config never turns this on"
        )
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's)")


def open_source_of(args: argparse.Namespace) -> contextlib.AbstractContextManager[Source]:
    """:func:`open_source` for the options of :func:`add_source_arguments`."""
    granted = [key for key in SAFETY_SETTINGS if getattr(args, safety_flag(key)[2:].replace("-", "_"))]
    return open_source(args.run, args.sweep_best, args.adapter, args.tracking_uri, args.base_model, granted)


def load_run_tokenizer(source: Source):
    """The tokenizer saved with the adapter (with its pad token), else the base model's."""
    from transformers import AutoTokenizer

    from src import modeling

    if (source.adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.adapter_dir), trust_remote_code=source.cfg.model.trust_remote_code
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return tokenizer
    return _base_available(source, lambda: modeling.load_tokenizer(source.cfg.model))


def _base_available(source: Source, load):
    from src.hub import ModelUnavailable

    try:
        return load()
    except ModelUnavailable as exc:
        name = source.cfg.model.name_or_path
        raise InferenceError(
            f"base model {name!r} (model.name_or_path) is not available here ({_one_line(exc.__cause__ or exc)}); "
            "download it, or point to a local copy with --base-model PATH"
        ) from exc


def load_finetuned(source: Source, tokenizer, quantized: bool = True):
    """The base model (with the run's quantization unless ``quantized`` is False) plus the adapter, in eval mode.

    For classifiers the trained score head is in the adapter's ``modules_to_save`` and loads with it.
    """
    from peft import PeftModel

    from src import guards, modeling

    try:
        guards.assert_safetensors_only(source.adapter_dir)  # before any model loads
    except guards.UnsafeFileError as exc:
        raise InferenceError(str(exc)) from exc
    quant = source.cfg.quant if quantized else dataclasses.replace(source.cfg.quant, bits=16, fp8=False)
    base = _base_available(
        source,
        lambda: modeling.load_model(
            source.cfg.model, quant, source.task, source.labels, tokenizer.pad_token_id, training=False
        ),
    )
    if source.full_model:
        return base.eval()
    from peft.utils.error import NoMatchingPeftModuleError

    try:
        model = PeftModel.from_pretrained(base, str(source.adapter_dir), is_trainable=False)
    except NoMatchingPeftModuleError as exc:
        raise InferenceError(
            f"{source.adapter_dir / 'adapter_config.json'}: target_modules matches no module of the base model "
            f"{source.cfg.model.name_or_path!r}; restore the file the run saved, or give its base with --base-model"
        ) from exc
    return model.eval()


def _batches(items: list, batch_size: int, progress: bool, desc: str) -> Iterator[list]:
    from tqdm import tqdm

    with tqdm(total=len(items), desc=desc, unit="row", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            yield batch
            bar.update(len(batch))


@torch.no_grad()
def classify_logits(
    model, tokenizer, texts: list[str], max_length: int, batch_size: int, progress: bool = False, packed: bool = True
) -> np.ndarray:
    """Float32 logits (rows x classes), texts truncated to max_length as in training.

    A decoder classifier runs each batch as one flat row without padding (``src.engine.classification``, as it
    trained); an encoder, or ``packed=False``, padded batches."""
    from src.engine.classification import FlatClassificationCollator, flat_attention, flat_logits

    attention = flat_attention(model) if packed else None
    collate = FlatClassificationCollator(multilabel=False)
    out = []
    for batch in _batches(texts, batch_size, progress, "classify"):
        ids = tokenizer(batch, truncation=True, max_length=max_length)["input_ids"]
        if attention is not None and all(ids):
            row = collate([{"input_ids": x, "label": 0} for x in ids])
            device = next(model.parameters()).device
            tensors = [row[k].to(device) for k in ("input_ids", "position_ids", "last_token")]
            logits = flat_logits(model, *tensors, attention, row["bounds"])
        else:  # an empty text (a tokenizer without BOS) has no last token to pool: the padded path
            enc = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            logits = model(**enc.to(model.device)).logits
        out.append(logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    progress: bool = False,
) -> list[str]:
    """Completions for the prompts without the prompt: greedy, or sampled when temperature > 0."""
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from the last token
    completions: list[str] = []
    try:
        for batch in _batches(prompts, batch_size, progress, "generate"):
            enc = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            completions.extend(tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return completions


def quiet_inference_libraries() -> None:
    """Keep a command's stderr to its own progress bar and errors: no download bars, load reports or deprecations.

    The load report would call the classifier head "missing": it is, in the base checkpoint, and loads with the adapter.
    """
    import logging
    import warnings

    from src import console

    console.quiet_libraries()
    if console.verbose():
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)  # model card and license lookups on the hub
