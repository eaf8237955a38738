"""One run: load the data and the model, fit, log to MLflow, save the adapter, and return the objective.

:func:`run` is what ``python -m src.train`` calls for one configuration, what a sweep job calls by name
(:mod:`src.sweeps.job`), and what each trial of a pack calls on its shared base (:mod:`src.packs.runtime`). Under DDP
every rank runs it; rank 0 alone writes MLflow and the adapter (``src/distributed.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlflow
from omegaconf import OmegaConf
from transformers import TrainerCallback, set_seed

from src import console, distributed, guards, modeling, tiny, tracking, training
from src.classifier import ClassifierTrainer
from src.config import FULL_FINE_TUNING, Config, ConfigError, metric_problems, objective, per_label_metrics
from src.data import TaskData, load_data
from src.engine.classification import (
    FlatClassificationCollator,
    FlatClassifierTrainer,
    flat_attention,
    plan_fast_classifier,
)
from src.engine.trainer import build_flat_sft_trainer
from src.trial import trial_callbacks

# Where a run saves what it trained: a LoRA adapter, or with lora=none (full fine-tuning) the whole model.
ADAPTER_DIR, MODEL_DIR = "adapter", "model"
# Each class's (or label's) per-class metric name, as {label: metric}: src.labels.metric_suffixes.
METRIC_NAMES_FILE = "metric_names.json"
# The LM loss on eval.forgetting_path's text: the base's before training, the adapted model's after, and after - base.
FORGETTING_BASE, FORGETTING_AFTER = "forgetting_loss_base", "forgetting_loss_after"
FORGETTING_DELTA = "forgetting_loss_delta"


@dataclass
class Loaded:
    """What a run trains: the tokenizer, the data and the model (with a pack trial's place on the shared base,
    ``member``), the checkpoint it resumes from, its fingerprint, and its parameter counts and LoRA targets."""

    tokenizer: Any
    data: TaskData
    model: Any
    member: Any
    checkpoint: Optional[str]
    fingerprint: dict
    trainable: int
    total: int
    targets: list[str]


def run(cfg: Config, slot: Any = None) -> Optional[float]:
    """Train one configuration, validated (``src.train.validated_or_exit``, or a sweep job's
    :func:`src.sweeps.job.validated_job`), and return the objective value. ``slot``: the run is one trial of a
    pack (:class:`src.packs.runtime.PackSlot`), on the pack's shared base."""
    console.quiet_libraries()
    with tracking.tracked_run(cfg, None if slot is None else slot.tags()) as active:
        output_dir = start(cfg)
        loaded = load(cfg, output_dir) if slot is None else load_from_slot(cfg, slot)
        log_counts(cfg, loaded)
        # A pack's trials print from one process: each of their lines carries the trial's run name.
        label = active.info.run_name if slot is not None and active is not None else None
        trainer, metrics = prepare_trainer(cfg, loaded, output_dir, None if slot is None else slot.env, label)
        prompts = sample_prompts(cfg, loaded.data)
        before = sample_generations(loaded, prompts, trained=False)
        forgetting = forgetting_text(cfg)
        base_loss = log_base_loss(cfg, loaded, forgetting)
        if loaded.checkpoint:
            tracking.set_tags({"resumed_from": loaded.checkpoint})
        trainer.train(resume_from_checkpoint=loaded.checkpoint)
        final, saved_dir = evaluate_and_save(cfg, loaded, trainer, metrics, output_dir)
        log_forgetting(cfg, loaded, forgetting, base_loss)
        if prompts:
            log_samples(loaded, prompts, before, sample_generations(loaded, prompts, trained=True))
        value = summarize(cfg, loaded, final, saved_dir)
        distributed.finish()  # every rank gets here; under DDP they leave together
        return value


def start(cfg: Config) -> Path:
    """Log the config as params (and as ``config.yaml``) and make the output directory."""
    tracking.log_params({**run_params(cfg), "train.world_size": distributed.world_size()})
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main_process():  # tracking.* writes nothing on other DDP ranks
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg.resolved()))
        mlflow.log_artifact(str(output_dir / "config.yaml"))
        if on_demo_model(cfg):
            console.say(tiny.demo_note())
    return output_dir


def run_params(cfg: Config) -> dict[str, Any]:
    """The run's params: its resolved config flattened (``lora.r``), as it was written, less ``output_dir``. That is a
    tag (``tracking.tracked_run``): it differs between every two runs, and the UI's compare view would list it as the
    one parameter that always differs."""
    return {k: v for k, v in tracking.flatten(cfg.resolved()).items() if k != "output_dir"}


def load(cfg: Config, output_dir: Path) -> Loaded:
    """The tokenizer, the data (checked before any model loads), and the model with its LoRA adapter."""
    tokenizer = modeling.load_tokenizer(cfg.model)
    # Raises DataError listing every fault (rows far over max_length included), before any model loads.
    data = load_data(cfg.data, tokenizer, cfg.model.max_length)
    check_label_metrics(cfg, data.labels)
    checkpoint = guards.resume_checkpoint(cfg.train.resume_from_checkpoint, output_dir / "checkpoints")
    fingerprint = guards.run_fingerprint(cfg, data.task, data.labels)
    if checkpoint:
        guards.check_resume(checkpoint, fingerprint)  # another dataset, labels or base: refused here
    set_seed(cfg.train.seed)
    model = modeling.load_model(
        cfg.model, cfg.quant, data.task, data.labels, tokenizer.pad_token_id, cfg.train.activation_checkpointing
    )
    model = modeling.apply_lora(model, cfg.lora, data.task)
    if distributed.is_main_process():
        modeling.save_initial_adapter(model, cfg.lora, output_dir)
    trainable, total = modeling.count_params(model)
    targets = modeling.target_leaf_names(model)
    return Loaded(tokenizer, data, model, None, checkpoint, fingerprint, trainable, total, targets)


def load_from_slot(cfg: Config, slot: Any) -> Loaded:
    """A pack trial's share of the pack's base: the first trial to get here loads it for all."""
    tokenizer, data, member = slot.shared.load(slot.index)
    fingerprint = guards.run_fingerprint(cfg, data.task, data.labels)
    trainable, total = member.pack.counts(member.adapter)
    targets = member.pack.targets(member.adapter)
    return Loaded(tokenizer, data, member.model, member, None, fingerprint, trainable, total, targets)


def log_counts(cfg: Config, loaded: Loaded) -> None:
    """What the run trains on: the GPUs, the LoRA targets, the rows and the parameter counts."""
    data, trainable, total = loaded.data, loaded.trainable, loaded.total
    tracking.set_tags(tracking.device_tags())  # the GPUs, now that the model is on them
    tracking.log_params(
        {
            "lora.resolved_targets": ",".join(loaded.targets),
            "data.train_rows": data.train.num_rows,
            "data.eval_rows": data.eval.num_rows,
        }
    )
    tracking.log_metrics(
        {"trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total}
    )
    if distributed.is_main_process() and data.labels:  # which metric is which class: "R&D" and "R+D" both need a name
        mlflow.log_dict(per_label_metrics(data.task, data.labels), METRIC_NAMES_FILE)


def prepare_trainer(cfg: Config, loaded: Loaded, output_dir: Path, env: Optional[dict], label: Optional[str]):
    """The run's trainer (:func:`build_trainer`) with its callbacks, and the rows too long for the model logged.
    Returns (trainer, metrics)."""
    # An Optuna trial reports its evaluations and may be pruned; under DDP rank 0 reports, and if it prunes,
    # torchrun stops the others.
    pruning = trial_callbacks(objective(cfg)[0], env) if distributed.is_main_process() else []
    callbacks = [*pruning, guards.FingerprintWriter(loaded.fingerprint)]  # the fingerprint goes in each checkpoint
    data = loaded.data
    trainer, metrics, truncated = build_trainer(
        cfg, loaded.model, loaded.tokenizer, data, str(output_dir / "checkpoints"), callbacks, loaded.member, label
    )
    skipped = data.long_rows if cfg.data.long_rows == "skip" else 0
    tracking.log_metrics({"data_truncated_rows": truncated, "data_skipped_rows": skipped})
    if data.long_rows:
        what = "skipped" if skipped else "truncated to model.max_length"
        console.log.warning(
            f"note: {data.long_rows} row(s) over {cfg.data.max_length_factor:g} x model.max_length="
            f"{cfg.model.max_length} tokens were {what} (data.long_rows=truncate|skip|error)"
        )
    if truncated:
        console.log.warning(
            f"note: {truncated} row(s) longer than model.max_length={cfg.model.max_length} were truncated"
        )
    return trainer, metrics


def sample_prompts(cfg: Config, data: TaskData) -> list[str]:
    """The eval prompts an SFT run answers before and after training (samples.json)."""
    sampled = data.task == "sft" and distributed.is_main_process()
    return data.eval["prompt"][: cfg.data.num_sample_prompts] if sampled else []


def sample_generations(loaded: Loaded, prompts: list[str], trained: bool) -> list[str]:
    """The model's answers to ``prompts``: with the run's adapter (``trained``) or without it (the base)."""
    model, member = loaded.model, loaded.member
    if member is not None:
        with member.pack.routed(member.adapter if trained else None) as routed:
            return training.generate_samples(routed, loaded.tokenizer, prompts)
    if trained:
        return training.generate_samples(model, loaded.tokenizer, prompts)
    with modeling.adapters_disabled(model):
        return training.generate_samples(model, loaded.tokenizer, prompts)


def forgetting_text(cfg: Config) -> Optional[str]:
    """The text whose LM loss the run logs before and after training (``eval.forgetting_path``, checked readable by
    validation; an SFT run's alone); None: none, or a DDP rank other than 0, which logs nothing."""
    path = cfg.eval.forgetting_path
    if path is None or not distributed.is_main_process():
        return None
    return Path(path).expanduser().read_text(encoding="utf-8")


def forgetting_loss(loaded: Loaded, text: str, max_length: int, trained: bool) -> float:
    """The model's LM loss on ``text``: with the run's adapter (``trained``) or without it (the base)."""
    model, member, tokenizer = loaded.model, loaded.member, loaded.tokenizer
    if member is not None:
        with member.pack.routed(member.adapter if trained else None) as routed:
            return training.text_loss(routed, tokenizer, text, max_length)
    if trained:
        return training.text_loss(model, tokenizer, text, max_length)
    with modeling.adapters_disabled(model):
        return training.text_loss(model, tokenizer, text, max_length)


def log_base_loss(cfg: Config, loaded: Loaded, text: Optional[str]) -> Optional[float]:
    """The base's LM loss on the forgetting text, before training (``forgetting_loss_base``); None without text."""
    if text is None:
        return None
    base_loss = forgetting_loss(loaded, text, cfg.model.max_length, trained=False)
    tracking.log_metrics({FORGETTING_BASE: base_loss})
    return base_loss


def log_forgetting(cfg: Config, loaded: Loaded, text: Optional[str], base_loss: Optional[float]) -> None:
    """What training cost on other text ("LoRA Learns Less and Forgets Less", https://arxiv.org/abs/2405.09673):
    the adapted model's LM loss on it (``forgetting_loss_after``) and ``forgetting_loss_delta`` = after - base."""
    if text is None or base_loss is None:
        return
    after = forgetting_loss(loaded, text, cfg.model.max_length, trained=True)
    tracking.log_metrics({FORGETTING_AFTER: after, FORGETTING_DELTA: after - base_loss})


def evaluate_and_save(cfg: Config, loaded: Loaded, trainer, metrics, output_dir: Path) -> tuple[dict, Path]:
    """The final evaluation, the peak GPU memory, and the saved adapter (or model). Returns (final, saved_dir)."""
    final = training.final_evaluation(trainer)
    if loaded.data.task == "sft" and "eval_loss" in final:  # an objective src.config allows (DERIVED_METRICS)
        final["eval_perplexity"] = training.perplexity(final["eval_loss"])
    peak = training.peak_gpu_mem_gb()
    if peak is not None:
        tracking.log_metrics({"peak_gpu_mem_gb": peak})
    saved_dir = output_dir / (MODEL_DIR if modeling.is_full_fine_tuning(cfg.lora) else ADAPTER_DIR)
    if distributed.is_main_process():
        save_outputs(cfg, loaded.model, loaded.tokenizer, loaded.data, saved_dir, metrics)
    return final, saved_dir


def log_samples(loaded: Loaded, prompts: list[str], before: list[str], after: list[str]) -> None:
    """The SFT samples (``samples.json``): each prompt, its reference answer, and the answers before and after."""
    tokenizer, completions = loaded.tokenizer, loaded.data.eval["completion"][: len(prompts)]
    samples = {
        "prompt": prompts,
        # A chat template's reply ends in EOS, as the generations, decoded without it, do not.
        "reference": [c.removesuffix(tokenizer.eos_token) for c in completions],
        "before": before,
        "after": after,
    }
    mlflow.log_table(samples, artifact_file="samples.json")


def summarize(cfg: Config, loaded: Loaded, final: dict, saved_dir: Path) -> float:
    """Log the objective and the run's description, print the summary, and return the objective."""
    metric, _ = objective(cfg)
    value = final.get(metric)
    if value is None:
        raise KeyError(f"objective metric {metric!r} not in the final evaluation: {sorted(final)}")
    tracking.log_metrics({"objective": value})
    tracking.set_tags({"mlflow.note.content": run_description(cfg, loaded.data, loaded.trainable, metric, value)})
    if distributed.is_main_process():
        active = mlflow.active_run()
        info = active.info
        where = (saved_dir.resolve(), mlflow.get_tracking_uri(), info.experiment_id)
        console.log.info(console.summary(info.run_id, info.run_name, metric, final, *where))
    return float(value)


def on_demo_model(cfg: Config) -> bool:
    """The builtin tiny model on data the project does not ship (a user's file, a hub dataset)."""
    paths = [p for p in (cfg.data.path, cfg.data.eval_path) if p is not None]
    user_data = cfg.data.hub_id is not None or not all(tiny.is_bundled(p) for p in paths)
    return tiny.is_builtin(cfg.model.name_or_path) and user_data


def check_label_metrics(cfg: Config, labels: Optional[list[str]]) -> None:
    """Raise ConfigError if ``objective.metric`` or ``train.metric_for_best_model`` names a per-class metric the
    data's classes do not log: with labels inferred from the data, validation could not know them. Runs once
    the data is read, before the model loads."""
    if labels:
        problems = metric_problems(cfg.data, cfg.objective.metric, cfg.train.metric_for_best_model, labels)
        if problems:
            raise ConfigError(problems)


def run_description(cfg: Config, data, trainable: int, metric: str, value: float) -> str:
    """The run's MLflow description (the runs table's Description column): what was trained and how it scored."""
    targets = ", ".join(cfg.lora.target_modules or [cfg.lora.preset])
    if cfg.lora.preset == FULL_FINE_TUNING:
        how = f"Full fine-tuning of the {cfg.quant.bits}-bit {cfg.model.name}"
    else:
        bits = "FP8" if cfg.quant.fp8 else f"{cfg.quant.bits}-bit"
        how = f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on {targets}; {bits} {cfg.model.name} base"
    chat = " on conversations, loss on each last assistant turn" if cfg.data.format == "messages" else ""
    return (
        f"{metric} = {value:.4g}. {how}; {trainable:,} trainable params; {cfg.data.name} ({data.task}{chat}, "
        f"{data.train.num_rows} train rows)."
    )


def save_outputs(cfg: Config, model, tokenizer, data, saved_dir: Path, metrics) -> None:
    """Save the adapter (or, with lora=none, the whole model) with tokenizer and label map, and log it and the
    classification report. The artifact is named as the directory: ``adapter/`` or ``model/``."""
    from src import training

    modeling.save_adapter(model, cfg.lora, saved_dir)
    tokenizer.save_pretrained(saved_dir)
    (saved_dir / "label_map.json").write_text(
        json.dumps({"task": data.task, "labels": data.labels, "threshold": cfg.data.threshold}, indent=2)
    )
    if cfg.tracking.log_adapter:
        mlflow.log_artifacts(str(saved_dir), artifact_path=saved_dir.name)
    if metrics is not None:
        mlflow.log_dict(metrics.last_report, "classification_report.json")
        training.log_confusion_matrix(metrics)


def build_trainer(
    cfg: Config,
    model,
    tokenizer,
    data: TaskData,
    output_dir: str,
    extra_callbacks: Sequence[TrainerCallback] = (),
    member=None,
    label: Optional[str] = None,
):
    """The trainer for the task; ``extra_callbacks`` come after the project's own (a sweep trial's pruning);
    ``member``: the run is a trial of a pack (:class:`src.packs.model.PackMember`; on the fast path);
    ``label`` leads its console lines (a pack trial's run name).

    Returns (trainer, metrics, truncated): metrics keeps the last per-class report (None for
    SFT), and truncated counts the rows longer than model.max_length.
    """
    args = training.training_arguments(
        cfg.train, output_dir, data.task, cfg.model.max_length, cfg.data.response_only_loss, member is not None
    )
    distributed.one_gpu_per_process(args)
    callbacks = [*_callbacks(cfg, data), *extra_callbacks]
    inputs = dict(model=model, args=args, processing_class=tokenizer, callbacks=callbacks)  # every task's trainer
    if data.task == "sft":
        trainer = _sft_trainer(cfg, data, inputs, member)
        metrics, truncated = None, training.count_truncated_sft(data, tokenizer, cfg.model.max_length)
    else:
        trainer, metrics, truncated = _classification_trainer(cfg, data, inputs, member)
    if cfg.lora.loraplus_lr_ratio is not None:  # never in a pack: src.sweeps.grouping.unpackable
        training.use_loraplus(trainer, cfg.lora.loraplus_lr_ratio)
    training.use_console(trainer, label)
    return trainer, metrics, truncated


def _callbacks(cfg: Config, data: TaskData) -> list[TrainerCallback]:
    """The project's own callbacks: token rate, metrics to MLflow, the non-finite loss guard, early stopping."""
    from transformers import EarlyStoppingCallback

    # TokenRateCallback first: the callbacks after it read the rate it writes into the logs.
    callbacks: list[TrainerCallback] = [
        training.TokenRateCallback(),
        training.MlflowMetricsCallback(perplexity=data.task == "sft"),
    ]
    if cfg.train.stop_on_nonfinite_loss:
        callbacks.append(guards.NonFiniteLossGuard())  # after the metrics callback: the bad loss is logged first
    if cfg.train.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    return callbacks


def _sft_trainer(cfg: Config, data: TaskData, inputs: dict[str, Any], member):
    from trl import SFTTrainer

    train_ds, eval_ds = data.train.remove_columns("row_id"), data.eval.remove_columns("row_id")
    if not cfg.train.fast_path:
        return SFTTrainer(train_dataset=train_ds, eval_dataset=eval_ds, **inputs)
    # Padding-free packed micro-batches sized to the memory budget.
    model, tokenizer, args, callbacks = (inputs[k] for k in ("model", "processing_class", "args", "callbacks"))
    if member is None:
        trainer, micro = build_flat_sft_trainer(cfg, model, tokenizer, args, train_ds, eval_ds, callbacks)
    else:  # src.packs.runtime hands its trials in: its module, not this one, knows packs
        trainer, micro = member.build_trainer(cfg, tokenizer, args, train_ds, eval_ds, callbacks)
    if micro.est_peak_gpu_mem_gb is not None:  # the plan the fast path follows, to set against the peak
        tracking.log_metrics({"fast_path_est_peak_gpu_mem_gb": micro.est_peak_gpu_mem_gb})
    return trainer


def _classification_trainer(cfg: Config, data: TaskData, inputs: dict[str, Any], member=None):
    from transformers import DataCollatorWithPadding

    model, tokenizer, args = inputs["model"], inputs["processing_class"], inputs["args"]
    train_ds, eval_ds, truncated = training.tokenize_classification(data, tokenizer, cfg.model.max_length)
    best = cfg.train.metric_for_best_model or ""
    keep = (objective(cfg)[0], best if best.startswith("eval_") else f"eval_{best}")  # per-class at any class count
    metrics = training.ClassificationMetrics(data.task, data.labels, cfg.data.threshold, keep=keep)
    common = dict(
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics,
        **inputs,
    )
    multilabel = data.task == "multilabel"
    if member is not None:  # a pack's trial (src.packs.runtime): its module, not this one, knows packs
        common.pop("data_collator")
        trainer, micro = member.build_classifier_trainer(data, args, common)
        return trainer, metrics, truncated
    attention = flat_attention(model) if cfg.train.fast_path else None
    if attention is None:
        trainer = ClassifierTrainer(label_weights=data.label_weights, multilabel=multilabel, **common)
        return trainer, metrics, truncated
    # A decoder or BERT: several examples per row, each pooled at its own token.
    lengths = [len(ids) for ids in train_ds["input_ids"]]  # the plan sizes micro-batches by their tokens
    args, micro = plan_fast_classifier(cfg, model, args, attention, lengths)
    args.include_num_input_tokens_seen = "all"  # a flat row has no padding
    common.update(args=args, data_collator=FlatClassificationCollator(multilabel))
    if micro is not None:
        console.log.info(micro.describe().replace("fast path:", "fast path (classification):"))
        tracking.log_metrics({"fast_path_est_peak_gpu_mem_gb": micro.est_peak_gpu_mem_gb})
    cuda_graphs = micro is not None and micro.cuda_graphs
    trainer = FlatClassifierTrainer(
        label_weights=data.label_weights, multilabel=multilabel, attention=attention, cuda_graphs=cuda_graphs, **common
    )
    return trainer, metrics, truncated
