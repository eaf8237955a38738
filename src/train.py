"""The train entrypoint: compose, validate, load data and model, fit, log, return the objective.

    python -m src.train                                   # tiny model, bundled data, CPU
    python -m src.train model=openllama3b quant=4bit lora=all_linear data=red_dot train=gpu
    python -m src.train --multirun lora.r=8,16 lora=attn_qv,all_linear
    python -m src.train data=instructions train.nproc_per_node=2   # one run on 2 GPUs (DDP, torchrun)

Every run is an MLflow run (see ``src/tracking.py`` for the names). The config and the data
are validated before any model loads; a run that fails ends FAILED with the reason. Under DDP
every rank runs :func:`run`; rank 0 alone writes MLflow and the adapter (``src/distributed.py``).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import hydra
import mlflow
from omegaconf import DictConfig, OmegaConf

from src import console, distributed, overrides, tiny, tracking
from src.config import (
    CONF_DIR,
    FULL_FINE_TUNING,
    Config,
    ConfigError,
    metric_problems,
    objective,
    per_label_metrics,
    refuse_unresolved,
    resolve,
    validate,
)
from src.data import load_data
from src.errors import StoreError, exit_on_user_error, report
from src.sweeps import configs as sweep_configs  # registers the hydra/sweeper and hydra/launcher configs
from src.sweeps.job import run_job, run_pack_job, validated_job
from src.sweeps.outcomes import quote
from src.sweeps.packs import PACK_ENV, read_pack
from src.sweeps.trial import trial_callbacks

# Where a run saves what it trained: a LoRA adapter, or with lora=none (full fine-tuning) the whole model.
ADAPTER_DIR, MODEL_DIR = "adapter", "model"
# Each class's (or label's) per-class metric name, as {label: metric}: src.labels.metric_suffixes.
METRIC_NAMES_FILE = "metric_names.json"


def run(raw: dict, cfg: Config, slot: Optional[PackSlot] = None) -> Optional[float]:
    """Train one configuration and return the objective value: ``cfg`` validated (:func:`validated`, or a sweep
    job's :func:`src.sweeps.job.validated_job`), ``raw`` the same resolved config as a plain dict, logged as params.
    ``slot``: the run is one trial of a pack (:func:`pack`), on the pack's shared base."""
    console.quiet_libraries()
    tags = None if slot is None else slot.tags()
    with tracking.tracked_run(raw, tags) as active:
        main_process = distributed.is_main_process()  # tracking.* writes nothing on other DDP ranks
        # output_dir is a tag (tracking.tracked_run), not a param: it differs between every two runs, and the UI's
        # compare view would list it as the one parameter that always differs.
        params = {k: v for k, v in tracking.flatten(raw).items() if k != "output_dir"}
        tracking.log_params({**params, "train.world_size": distributed.world_size()})
        output_dir = Path(cfg.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if main_process:
            (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw))
            mlflow.log_artifact(str(output_dir / "config.yaml"))
        from transformers import set_seed

        from src import guards, modeling, training

        if main_process and on_demo_model(cfg):
            console.say(tiny.demo_note())
        member = None
        if slot is None:
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
            trainable, total = modeling.count_params(model)
            targets = modeling.target_leaf_names(model)
        else:  # the pack's first trial to get here loads the base for all
            tokenizer, data, member = slot.shared.load(slot.index)
            checkpoint, model = None, member.model
            fingerprint = guards.run_fingerprint(cfg, data.task, data.labels)
            trainable, total = member.pack.counts(member.adapter)
            targets = member.pack.targets(member.adapter)
        tracking.set_tags(tracking.device_tags())  # the GPUs, now that the model is on them
        tracking.log_params(
            {
                "lora.resolved_targets": ",".join(targets),
                "data.train_rows": data.train.num_rows,
                "data.eval_rows": data.eval.num_rows,
            }
        )
        tracking.log_metrics(
            {"trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total}
        )
        if main_process and data.labels:  # which metric is which class: "R&D" and "R+D" both need a name
            mlflow.log_dict(per_label_metrics(data.task, data.labels), METRIC_NAMES_FILE)
        # An Optuna trial reports its evaluations and may be pruned; under DDP rank 0 reports, and if it prunes,
        # torchrun stops the others.
        env = None if slot is None else slot.env
        pruning = trial_callbacks(objective(cfg)[0], env) if main_process else []
        callbacks = [*pruning, guards.FingerprintWriter(fingerprint)]  # the fingerprint goes in each checkpoint
        # A pack's trials print from one process: each of their lines carries the trial's run name.
        label = active.info.run_name if slot is not None and active is not None else None
        trainer, metrics, truncated = training.build_trainer(
            cfg, model, tokenizer, data, str(output_dir / "checkpoints"), callbacks, member, label
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
        sampled = data.task == "sft" and main_process
        prompts = data.eval["prompt"][: cfg.data.num_sample_prompts] if sampled else []
        with modeling.adapters_disabled(model) if member is None else member.pack.routed(None) as base:
            before = training.generate(model if member is None else base, tokenizer, prompts)
        if checkpoint:
            tracking.set_tags({"resumed_from": checkpoint})
        trainer.train(resume_from_checkpoint=checkpoint)
        final = training.final_evaluation(trainer)
        if data.task == "sft" and "eval_loss" in final:  # an objective src.config allows (DERIVED_METRICS)
            final["eval_perplexity"] = training.perplexity(final["eval_loss"])
        peak = training.peak_gpu_mem_gb()
        if peak is not None:
            tracking.log_metrics({"peak_gpu_mem_gb": peak})
        saved_dir = output_dir / (MODEL_DIR if modeling.is_full_fine_tuning(cfg.lora) else ADAPTER_DIR)
        if main_process:
            save_outputs(cfg, model, tokenizer, data, saved_dir, metrics)
        if prompts and member is None:
            after = training.generate(model, tokenizer, prompts)
        elif prompts:
            with member.pack.routed(member.adapter) as routed:
                after = training.generate(routed, tokenizer, prompts)
        if prompts:
            mlflow.log_table(
                {
                    "prompt": prompts,
                    # A chat template's reply ends in EOS, as the generations, decoded without it, do not.
                    "reference": [c.removesuffix(tokenizer.eos_token) for c in data.eval["completion"][: len(prompts)]],
                    "before": before,
                    "after": after,
                },
                artifact_file="samples.json",
            )

        metric, _ = objective(cfg)
        value = final.get(metric)
        if value is None:
            raise KeyError(f"objective metric {metric!r} not in the final evaluation: {sorted(final)}")
        tracking.log_metrics({"objective": value})
        tracking.set_tags({"mlflow.note.content": run_description(cfg, data, trainable, metric, value)})
        if main_process:
            active = mlflow.active_run()
            console.log.info(
                console.summary(
                    active.info.run_id,
                    active.info.run_name,
                    metric,
                    final,
                    saved_dir.resolve(),
                    mlflow.get_tracking_uri(),
                    active.info.experiment_id,
                )
            )
        distributed.finish()  # every rank gets here; under DDP they leave together
        return float(value)


@dataclass
class SharedBase:
    """What the trials of a pack share: the tokenizer, the data and the base with every trial's adapter, loaded
    once, by the first trial to ask (after its MLflow run has started: a base that fails to load fails every
    trial's run with the reason)."""

    jobs: list[tuple[dict, Config]]
    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: Optional[tuple[Any, Any, list]] = None
    error: Optional[BaseException] = None
    pack: Any = None
    left: set[int] = field(default_factory=set)  # trials that ended, some before the pack was made
    stopping: Optional[BaseException] = None

    def load(self, index: int):
        from transformers import set_seed

        from src import modeling
        from src.fast import pack as pack_mod

        with self.lock:
            if self.error is not None:
                raise self.error
            if self.stopping is not None:
                raise self.stopping
            if self.loaded is None:
                try:
                    cfg = self.jobs[0][1]
                    tokenizer = modeling.load_tokenizer(cfg.model)
                    data = load_data(cfg.data, tokenizer, cfg.model.max_length)
                    for _, job in self.jobs:
                        check_label_metrics(job, data.labels)
                    set_seed(cfg.train.seed)
                    model = modeling.load_model(
                        cfg.model, cfg.quant, data.task, data.labels, tokenizer.pad_token_id, False
                    )
                    cfgs = [c for _, c in self.jobs]
                    self.pack = pack_mod.build_pack(
                        model, [c.lora for c in cfgs], data.task, [c.train.seed for c in cfgs]
                    )
                    members = pack_mod.prepare(self.pack, cfgs, bf16=bool(cfg.train.bf16))
                    # One tokenizer each: a fast tokenizer's padding and truncation are state that every call sets,
                    # so one trial's generate (padding=True) would race another's tokenize_sft (no padding).
                    tokenizers = [tokenizer, *(copy.deepcopy(tokenizer) for _ in cfgs[1:])]
                    self.loaded = (tokenizers, data, members)
                except BaseException as exc:
                    self.error = exc
                    raise
                # Trials that ended before the pack was made (their setup raised) would be waited for in its step.
                for gone in self.left:
                    self.pack.leave(self.pack.adapters[gone])
            if self.stopping is not None:  # a stop (SIGTERM) came while the base loaded
                raise self.stopping
        tokenizers, data, members = self.loaded
        return tokenizers[index], data, members[index]

    def stop(self, reason: BaseException) -> None:
        """Stop every trial: at its next step, or before it starts (:meth:`load`). Called from a signal handler,
        so it does not wait for the lock a loading trial holds (``load`` reads ``stopping`` after ``pack`` is set)."""
        self.stopping = reason
        if self.pack is not None:
            self.pack.stop(reason)

    def leave(self, index: int) -> None:
        """A trial's thread is done, however it ended: the others no longer wait for its steps."""
        with self.lock:  # not while the pack is being made: load applies it then
            self.left.add(index)
            pack = self.pack
        if pack is not None:
            pack.leave(pack.adapters[index])


@dataclass
class PackSlot:
    """One trial's place in a pack: the shared base, its index, and its own environment (an Optuna trial's)."""

    shared: SharedBase
    index: int
    env: Optional[dict[str, str]] = None

    def tags(self) -> dict[str, str]:
        return {"pack_size": str(len(self.shared.jobs)), "pack_trial": f"t{self.index}"}


def pack(jobs: list[tuple[dict, Config, Optional[dict]]]):
    """The trials of a pack (resolved config, validated config, environment), as one training function each
    (``train(raw, cfg)``, to run each in its own thread) and their shared base (``stop``, ``leave``)."""
    import functools

    # Imported here, once: the trials' threads would race through transformers' and TRL's lazy modules, which
    # are not thread-safe ("cannot import name 'SFTConfig' from 'trl'").
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: F401

    from src import guards, modeling, training  # noqa: F401
    from src.fast import pack as pack_mod  # noqa: F401
    from src.fast import trainer as fast_trainer  # noqa: F401

    shared = SharedBase([(raw, cfg) for raw, cfg, _ in jobs])
    trains = [functools.partial(run, slot=PackSlot(shared, i, env)) for i, (_, _, env) in enumerate(jobs)]
    return trains, shared


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
        how = f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on {targets}; {cfg.quant.bits}-bit {cfg.model.name} base"
    chat = " on conversations, loss on each last assistant turn" if cfg.data.format == "messages" else ""
    return (
        f"{metric} = {value:.4g}. {how}; {trainable:,} trainable params; {cfg.data.name} ({data.task}{chat}, "
        f"{data.train.num_rows} train rows)."
    )


def save_outputs(cfg: Config, model, tokenizer, data, saved_dir: Path, metrics) -> None:
    """Save the adapter (or, with lora=none, the whole model) with tokenizer and label map, and log it and the
    classification report. The artifact is named as the directory: ``adapter/`` or ``model/``."""
    from src import training

    model.save_pretrained(saved_dir)
    tokenizer.save_pretrained(saved_dir)
    (saved_dir / "label_map.json").write_text(
        json.dumps({"task": data.task, "labels": data.labels, "threshold": cfg.data.threshold}, indent=2)
    )
    if cfg.tracking.log_adapter:
        mlflow.log_artifacts(str(saved_dir), artifact_path=saved_dir.name)
    if metrics is not None:
        mlflow.log_dict(metrics.last_report, "classification_report.json")
        training.log_confusion_matrix(metrics)


def validated(raw: dict, unresolved: Optional[dict[str, str]] = None) -> Config:
    """Validate a config before anything heavy: the error shows at once (a model load or an MLflow store
    takes seconds), and an invalid config still ends as a FAILED run (:func:`src.tracking.record_invalid`),
    unless its store is what is broken or unknown (``unresolved``: :func:`src.config.resolve`'s problems)."""
    try:
        refuse_unresolved(unresolved or {})
        return validate(raw, for_training=True)
    except ConfigError as exc:
        report(exc)  # before the store is opened, which takes seconds
        unknown = sorted(k for k in unresolved or {} if k.startswith("tracking."))
        try:
            if unknown:
                raise StoreError(f"the run is not recorded: {', '.join(unknown)} cannot be resolved")
            tracking.record_invalid(raw, exc)
        except StoreError as store:
            print(f"  ({store})", file=sys.stderr)
        sys.exit(2)


def relaunch_argv(argv: list[str], output_dir: str) -> list[str]:
    """The command line again, pinned to this run's output directory (else each rank picks its own time)."""
    kept = [arg for arg in argv if not arg.lstrip("+~").startswith("hydra.run.dir=")]
    return [*kept, f"hydra.run.dir={quote(output_dir)}"]


def preflight(argv: list[str]) -> None:
    """Before Hydra reads the command line: ``--help`` prints the groups and keys (from the schema's help, which
    Hydra's own help cannot show), and a mistyped key or group option exits 2 naming the closest ones (where
    Hydra would advise adding the key with +). Hydra's own flags and syntax errors are Hydra's."""
    line = overrides.parse_command_line(argv)
    primary = overrides.primary_dir(line.config_path, CONF_DIR, Path(__file__).parent)
    extra = Path(line.config_dir) if line.config_dir else None
    groups = overrides.group_options(primary, line.config_name or "config", extra)
    if line.help:
        print(overrides.help_text("python -m src.train", Config, groups))
        sys.exit(0)
    problems = overrides.problems(line.overrides, Config, groups)
    if problems:
        print(f"error: {ConfigError(problems)}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> Union[float, dict, None]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    raw, unresolved = resolve(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # One job of a sweep: in a fresh process unless hydra.sweeper.isolate=false; errors (an invalid config
        # included) go to the sweeper, which records them and goes on. Returns the run id and its final metrics.
        job = sweep_configs.job_conf(hydra_cfg.sweeper)
        # The trial process gets the training function by reference: src.train.run, importable by name in a
        # launcher's worker (joblib's loky, submitit), where __main__ is not this module and __main__.run fails.
        import src.train

        members = os.environ.get(PACK_ENV)
        if members:  # a pack (hydra.sweeper.pack): this job's config and the others', trained on one base
            listed = read_pack(members)
            jobs = [(raw if i == 0 else m["raw"], m["env"] or None) for i, m in enumerate(listed)]
            return run_pack_job(jobs, src.train.pack, isolate=job.isolate, feasibility=job.feasibility)
        config = validated_job(raw, unresolved)
        return run_job(raw, config, src.train.run, isolate=job.isolate, feasibility=job.feasibility)
    config = validated(raw, unresolved)
    nproc = config.train.nproc_per_node
    if nproc > 1 and not distributed.under_torchrun():  # DDP: the same command on nproc ranks
        sys.exit(distributed.relaunch(nproc, relaunch_argv(sys.argv[1:], hydra_cfg.runtime.output_dir)))
    # A UserError (bad data, a model that is not there, a broken store...) is one line and exit 2; the run, if it
    # started, ended FAILED with it (tracking.tracked_run). Anything else is a bug and keeps its traceback.
    return exit_on_user_error(lambda: run(raw, config))


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
    distributed.exit_worker()  # a DDP rank whose run is complete leaves without tearing down its process group
