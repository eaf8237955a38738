"""The classification workloads of ``python -m src.bench``: a seed's classifier recipe against the project's trainer.

    python -m src.bench --workload mistral7b-4bit-multilabel --budgets default,24,8 --examples 512
    python -m src.bench --workload w3b-4bit-cls-short,bert-large-4bit-cls --budgets default --examples 1024
    python -m src.bench --device cpu --workload tiny-cls,tiny-multilabel,tiny-bert-cls --examples 16   # smoke test

Each workload is a recipe: the project config of a seed tutorial (``conf/experiment/seed000_*``, ``seed001_*``) or
of the seeds' QLoRA recipe (``conf/train/gpu.yaml``), composed by :func:`classifier_config`. Both sides train on
the same synthetic rows (random token ids, lengths uniform in the workload's range, fixed seed) and labels
(uniform classes; multi-label: each label on with probability 0.3, at least one a row), one epoch:

- **seed**: the recipe written out as its tutorial wrote it: ``AutoModelForSequenceClassification`` on a
  bitsandbytes 4-bit base, ``prepare_model_for_kbit_training`` (gradient checkpointing on), peft's ``LoraConfig``
  with the recipe's r, alpha, dropout, bias and targets, HF ``Trainer`` with the recipe's batch, accumulation,
  learning rate, weight decay, optimizer and precision (seed 000 and 001: no bf16 autocast, as published), the
  loss of the recipe (BCE with seed 000's ``pos_weight``, cross-entropy), and batches padded to the longest row
  (seed 000's ``pad_sequence`` collator; seed 001's pre-tokenized data is taken as padded to the longest in its
  batch too, the kinder reading). BERT's head is kept out of 4-bit, as the tutorial meant.
- **fast**: the project's trainer as ``src.train`` builds it for classification (``src.fit.build_trainer``):
  ``src.modeling`` loads and adapts the model, :func:`src.engine.classification.flat_attention` switches it to
  flat rows, :func:`src.engine.classification.plan_fast_classifier` plans the step from the rows' token counts at
  the ``--budgets`` given, and :class:`src.engine.classification.FlatClassifierTrainer` trains. Its config is
  the recipe's with the GPU precision of ``conf/train/gpu.yaml`` (``train.bf16=true``), which the fast path
  needs for its bf16 weights and flash attention; on CPU, fp32.

Variants (``--variants``): ``length-grouped`` trains padded batches drawn by HF's length-grouped sampler
(``train_sampling_strategy=group_by_length``) with the rest of the fast path's plan (bf16 weights, cached
dequantized weights, fused AdamW, the micro-batches): the encoder alternative issue 16 asks to measure against
packing; ``no-graphs`` is the packed side with its CUDA graphs off (the graphs' share of the speed, measured).

Reported as for the SFT workloads, with one difference: the fast side's ``est_peak_gpu_mem_gb`` is the estimate of
the plan it trained with (from the data's token lengths, before training), not one made afterwards at the largest
micro-batch seen (that one is ``observed_est_peak_gpu_mem_gb``).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.common import (
    QUANT_GROUPS,
    SEED_CHECKPOINTING,
    Meter,
    StepProfiler,
    Workload,
    bench_tokenizer,
    plan_estimate_gb,
    reset_memory,
    side_result,
    timed_train,
)
from src import console, distributed
from src.training_args import training_arguments

MULTILABEL_POSITIVE_RATE = 0.3


def classifier_config(workload: Workload, model_dir: Path, device: str, train: Optional[dict[str, Any]] = None):
    """The project's composed and validated config of the workload's recipe, set up for one timed epoch, with
    ``train`` fields set on top (a side's own: ``fast_path``, ``memory_budget_gb``, precision)."""
    import copy
    import tempfile

    from src.config import validate

    raw = copy.deepcopy(_composed(workload.recipe, workload.bits, workload.lengths[1], str(model_dir), device))
    raw["train"].update(train or {})
    raw["output_dir"] = tempfile.mkdtemp(prefix="bench-")
    return validate(raw)


@functools.cache  # Hydra's compose takes ~0.4 s, and every side of a workload starts from the same config
def _composed(recipe: tuple[str, ...], bits: int, max_length: int, model_dir: str, device: str) -> dict[str, Any]:
    from src.config import compose

    base = [
        "hydra/sweeper=basic",  # one run's config: the project's sweeper and its settings are not needed
        *recipe,
        f"quant={QUANT_GROUPS[bits]}",
        f"model.name_or_path={model_dir}",
        f"model.max_length={max_length}",
        "train.num_train_epochs=1",
        "train.max_steps=-1",
        "train.eval_strategy=no",
        "train.save_strategy=no",
        "train.load_best_model_at_end=false",
        "train.early_stopping_patience=null",
        "train.logging_steps=1000000",
    ]
    if device == "cpu":  # bf16 autocast and bitsandbytes' paged optimizer are GPU features
        base += ["model.dtype=float32", "train.bf16=false", "train.tf32=null", "train.optim=adamw_torch"]
        base += ["quant.compute_dtype=float32"] if bits in (4, 8) else []
    return compose(base)


def label_names(cfg) -> list[str]:
    return list(cfg.data.label_columns if cfg.data.task == "multilabel" else cfg.data.labels)


def synthetic_labels(n: int, num_labels: int, multilabel: bool, seed: int = 1) -> list:
    """Uniform classes, or for multi-label 0/1 rows with each label on at probability 0.3 (at least one on)."""
    generator = torch.Generator().manual_seed(seed)
    if not multilabel:
        return torch.randint(0, num_labels, (n,), generator=generator).tolist()
    rows = (torch.rand(n, num_labels, generator=generator) < MULTILABEL_POSITIVE_RATE).float()
    empty = rows.sum(1) == 0
    rows[empty, torch.randint(0, num_labels, (int(empty.sum()),), generator=generator)] = 1.0
    return rows.tolist()


def label_weights(cfg, labels: list) -> Optional[list[float]]:
    """The recipe's loss weights on these labels, by ``src.data``'s definitions: seed 000's ``one_minus_share``
    (1 - a label's share of all positives) or ``auto`` (negatives / positives) ``pos_weight``; ``balanced`` class
    weights; None for ``none``."""
    if cfg.data.task == "multilabel":
        spec, y = cfg.data.pos_weight, torch.tensor(labels)
        positives = y.sum(0)
        if spec == "one_minus_share":
            return (1 - positives / positives.sum()).tolist()
        if spec == "auto":
            return ((len(y) - positives) / positives.clamp(min=1)).tolist()
    else:
        spec = cfg.data.class_weights
        if spec == "balanced":
            counts = torch.bincount(torch.tensor(labels), minlength=len(cfg.data.labels)).float()
            return (len(labels) / (len(counts) * counts.clamp(min=1))).tolist()
    if spec in ("none", None):
        return None
    if isinstance(spec, list):
        return [float(w) for w in spec]
    raise ValueError(f"the bench has no synthetic weights for {spec!r}")


def pad_classification(examples: list[dict], pad_id: int, multilabel: bool) -> dict[str, torch.Tensor]:
    """Seed 000's collator: input ids padded on the right with the pad id, the attention mask, the labels stacked."""
    ids = [torch.tensor(e["input_ids"]) for e in examples]
    key = "labels" if multilabel else "label"
    return {
        "input_ids": torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id),
        "attention_mask": torch.nn.utils.rnn.pad_sequence(
            [torch.ones_like(x) for x in ids], batch_first=True, padding_value=0
        ),
        "labels": torch.tensor([e[key] for e in examples], dtype=torch.float32 if multilabel else torch.long),
    }


def seed_targets(model, workload: Workload) -> list[str]:
    """The recipe's LoRA targets as its tutorial named them: the workload's list, or else seed 001's
    ``find_all_linear_names`` (the leaf names of every 4-bit linear layer, 16-bit ones on a 16-bit base; the head
    is not among them, being unquantized)."""
    if workload.seed_targets:
        return list(workload.seed_targets)
    from src.engine.weights import quantized_layers

    layers = {id(m) for m in quantized_layers(model)}
    names = set()
    for name, module in model.named_modules():
        if id(module) in layers or (not layers and type(module) is torch.nn.Linear):
            names.add(name.split(".")[-1])
    return sorted(names - {"classifier", "score", "lm_head"})


def loss_trainer(*args, label_weights: Optional[list[float]], multilabel: bool, **kwargs):
    """HF Trainer whose loss is the recipe's: seed 000's ``CustomTrainer`` (BCE with ``pos_weight``), else
    cross-entropy (what BertForSequenceClassification computes from its labels), both in fp32, normalised over the
    accumulated step as the project's padded path normalises it (:class:`src.engine.classification.ClassifierTrainer`),
    so that both sides train the same steps."""
    from src.classifier import ClassifierTrainer

    return ClassifierTrainer(*args, label_weights=label_weights, multilabel=multilabel, **kwargs)


def _dataset(rows: list[list[int]], labels: list, multilabel: bool):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows, "labels" if multilabel else "label": labels})


def run_seed_classifier(
    workload: Workload, model_dir: Path, rows: list[list[int]], labels: list, device: str, warmup: int
) -> dict[str, Any]:
    """(a) The recipe, written out as its tutorial wrote it (see the module docstring)."""
    cfg = classifier_config(workload, model_dir, device, {"fast_path": False})
    multilabel = cfg.data.task == "multilabel"
    base = reset_memory(device)
    pad_id = bench_tokenizer().pad_token_id
    model = seed_classifier_model(workload, model_dir, device, cfg, pad_id)
    args = distributed.one_gpu_per_process(seed_classifier_arguments(cfg))
    meter = Meter(warmup, device)
    trainer = loss_trainer(
        model=model,
        args=args,
        train_dataset=_dataset(rows, labels, multilabel),
        data_collator=meter.wrap(lambda examples: pad_classification(examples, pad_id, multilabel)),
        callbacks=[meter.callback()],
        label_weights=label_weights(cfg, labels),
        multilabel=multilabel,
    )
    wall, peak = timed_train(trainer, device)
    t = cfg.train
    batch = t.per_device_train_batch_size
    longest = meter.max_micro_batch_rows_x_len // batch  # the widest padded micro-batch
    estimate = plan_estimate_gb(cfg, batch, longest, 1.0, t.optim)
    _release(trainer, device)
    del trainer, model
    settings = dict(
        micro_batch_size=batch, gradient_accumulation_steps=t.gradient_accumulation_steps, checkpointed="all"
    )
    return side_result("seed", None, meter, wall, peak, estimate, base, settings)


def seed_classifier_model(workload: Workload, model_dir: Path, device: str, cfg, pad_id: int):
    """The recipe's model: ``AutoModelForSequenceClassification`` on the bitsandbytes base, every layer
    checkpointed, peft's LoRA on the tutorial's targets."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from src.modeling import DTYPES

    multilabel = cfg.data.task == "multilabel"
    encoder = cfg.model.architecture == "encoder"
    quant = None
    if workload.bits == 4:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant.quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant,
            bnb_4bit_compute_dtype=DTYPES[cfg.quant.compute_dtype],
            llm_int8_skip_modules=["classifier"] if encoder else None,  # seed 001 quantized its head: not meant
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=len(label_names(cfg)),
        problem_type="multi_label_classification" if multilabel else "single_label_classification",
        dtype=DTYPES[cfg.model.dtype],
        quantization_config=quant,
        device_map={"": 0} if device != "cpu" else None,
    )
    if not encoder:
        model.config.pad_token_id = pad_id  # seed 000: pad = EOS, for the pooling of the last non-pad token
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # As peft's prepare_model_for_kbit_training(model) leaves the seeds' recipes (SEED_CHECKPOINTING), written out:
    # peft's use_gradient_checkpointing calls transformers' deprecated gradient_checkpointing_enable.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=SEED_CHECKPOINTING)
    model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        bias=cfg.lora.bias,
        target_modules=seed_targets(model, workload),
        task_type="SEQ_CLS",  # trains and saves the head (score, classifier)
    )
    return get_peft_model(model, lora)


def seed_classifier_arguments(cfg):
    """The recipe's TrainingArguments as its tutorial wrote them: batch, accumulation, optimizer and precision."""
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        optim=t.optim,
        bf16=t.bf16,
        tf32=t.tf32,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=1,
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def run_fast_classifier(
    workload: Workload,
    model_dir: Path,
    rows: list[list[int]],
    labels: list,
    device: str,
    warmup: int,
    budget: Optional[float],
    variant: str = "",
    profile: Optional[Path] = None,
) -> dict[str, Any]:
    """(b) The project's trainer, as ``src.fit.build_trainer`` builds it for a classifier."""
    from src import modeling

    if variant not in ("", "profile", "length-grouped", "no-graphs"):
        raise ValueError(f"no variant {variant!r} for a classification workload (length-grouped, no-graphs)")
    train = dict(workload.fast) if device != "cpu" else {}
    cfg = classifier_config(workload, model_dir, device, train | {"memory_budget_gb": budget})
    base = reset_memory(device)
    pad_id = bench_tokenizer().pad_token_id
    model = modeling.load_model(
        cfg.model, cfg.quant, cfg.data.task, label_names(cfg), pad_id, cfg.train.activation_checkpointing
    )
    model = modeling.apply_lora(model, cfg.lora, cfg.data.task)
    meter = Meter(warmup, device)
    profiler = None if profile is None else StepProfiler(profile, start=warmup + 4, device=device)
    callbacks = [meter.callback()] + ([profiler.callback()] if profiler else [])
    trainer, micro, attention = fast_classifier_trainer(cfg, model, rows, labels, variant, meter, callbacks)
    optim = trainer.args.optim
    wall, peak = timed_train(trainer, device)
    meter.gather()
    observed = observed_estimate(cfg, trainer, meter, micro, variant, optim)
    graphs = getattr(trainer, "graphs", None)  # the length-grouped side's Trainer has none
    graph_note = None if graphs is None else graphs.summary()
    _release(trainer, device)
    del trainer, model, graphs
    settings = {"attention": attention} if micro is None else dataclasses.asdict(micro)
    settings |= {"optim": optim, "variant": variant or None, "cuda_graphs": graph_note}  # as the SFT sides report
    planned = None if micro is None else micro.est_peak_gpu_mem_gb
    result = side_result("fast", budget, meter, wall, peak, planned, base, settings)
    result["observed_est_peak_gpu_mem_gb"] = observed
    if profiler is not None:
        result["profile"] = profiler.summary
    return result


def fast_classifier_trainer(cfg, model, rows: list[list[int]], labels: list, variant: str, meter: Meter, callbacks):
    """(trainer, micro-batch plan, attention) of the fast side: flat rows planned from their token counts, or for
    ``length-grouped`` padded batches of like lengths, planned as padded (max_length an example)."""
    from src.engine.classification import (
        FlatClassificationCollator,
        FlatClassifierTrainer,
        flat_attention,
        plan_fast_classifier,
    )

    multilabel = cfg.data.task == "multilabel"
    args = training_arguments(cfg.train, cfg.output_dir, cfg.data.task, cfg.model.max_length)
    args = distributed.one_gpu_per_process(args)
    common = dict(
        model=model,
        train_dataset=_dataset(rows, labels, multilabel),
        callbacks=callbacks,
        label_weights=label_weights(cfg, labels),
        multilabel=multilabel,
    )
    if variant == "length-grouped":
        pad_id = bench_tokenizer().pad_token_id
        args, micro = plan_fast_classifier(cfg, model, args, "padded")
        args.train_sampling_strategy = "group_by_length"
        collate = meter.wrap(lambda examples: pad_classification(examples, pad_id, multilabel))
        return loss_trainer(args=args, data_collator=collate, **common), micro, "padded"
    attention = flat_attention(model)
    args, micro = plan_fast_classifier(cfg, model, args, attention, [len(r) for r in rows])
    args.include_num_input_tokens_seen = "all"  # a flat row has no padding
    collate = meter.wrap(FlatClassificationCollator(multilabel))
    graphed = micro is not None and micro.cuda_graphs and variant != "no-graphs"
    trainer = FlatClassifierTrainer(
        args=args, data_collator=collate, attention=attention, cuda_graphs=graphed, **common
    )
    return trainer, micro, attention


def observed_estimate(cfg, trainer, meter: Meter, micro, variant: str, optim: str) -> Optional[float]:
    """src.plan's peak at the largest micro-batch the side saw (padded: its rows x longest), plus the cached weights."""
    checkpointed = 0.0 if micro is None else micro.checkpointed_layers / micro.num_layers
    if variant == "length-grouped":
        batch = trainer.args.per_device_train_batch_size
        observed = plan_estimate_gb(cfg, batch, meter.max_micro_batch_rows_x_len // batch, checkpointed, optim)
    else:
        observed = plan_estimate_gb(cfg, 1, meter.max_micro_batch_tokens, checkpointed, optim)
    if observed is not None and micro is not None:
        observed += micro.dequantized_gb
    return observed


def run_sides(
    workload: Workload,
    model_dir: Path,
    rows: list[list[int]],
    device: str,
    sides: list[str],
    budgets: list[Optional[float]],
    variants: list[str],
    warmup_steps: int,
    failed: list[dict[str, str]],
    profile: Optional[Path] = None,
) -> tuple[list[dict[str, Any]], int]:
    """Every side of a classification workload, on labels drawn for ``rows``; (results, warm-up steps)."""
    recipe = classifier_config(workload, model_dir, device)
    multilabel = recipe.data.task == "multilabel"
    labels = synthetic_labels(len(rows), len(label_names(recipe)), multilabel)
    per_step = recipe.train.per_device_train_batch_size * recipe.train.gradient_accumulation_steps
    warmup = min(warmup_steps, -(-len(rows) // per_step) // 4)
    results = []
    if "seed" in sides:
        results.append(run_seed_classifier(workload, model_dir, rows, labels, device, warmup))
    if "fast" in sides:
        for budget in budgets:
            results.append(run_fast_classifier(workload, model_dir, rows, labels, device, warmup, budget))
        for variant in variants:  # experiments: one that breaks is reported, not fatal
            try:
                results.append(
                    run_fast_classifier(workload, model_dir, rows, labels, device, warmup, budgets[0], variant)
                )
            except Exception as exc:
                console.log.warning(f"variant {variant} failed: {type(exc).__name__}: {exc}")
                failed.append({"workload": workload.name, "variant": variant, "error": f"{type(exc).__name__}: {exc}"})
        if profile is not None:
            path = profile / f"{workload.name}-rank{distributed.rank()}.txt"
            results.append(
                run_fast_classifier(workload, model_dir, rows, labels, device, warmup, budgets[0], "profile", path)
            )
    return results, warmup


def _release(trainer, device: str) -> None:
    """Free the trainer's GPU memory before the next side (accelerate's ``free_memory``: a full ``gc.collect``,
    which on CPU, where nothing is measured, only costs time)."""
    if device != "cpu":
        trainer.accelerator.free_memory()
