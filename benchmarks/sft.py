"""Training throughput and memory: the seeds' QLoRA recipe against the project's trainer, on one GPU.

    python -m src.bench                                        # W3B 4-bit; fast path at the default and 8 GiB budgets
    python -m src.bench --workload w3b-8bit,w3b-16bit,mistral7b-4bit --budgets default
    python -m src.bench --examples 512 --json outputs/bench/x.json
    python -m src.bench --device cpu --workload tiny --examples 16   # smoke test: the code paths, not the numbers
    torchrun --standalone --nproc_per_node 2 -m src.bench --sides fast --budgets default   # DDP on 2 GPUs
    python -m src.bench --workload mistral7b-4bit-multilabel,bert-large-4bit-cls --budgets default,8   # classifiers

The classifier workloads (``mistral7b-4bit-multilabel``, ``w3b-4bit-cls-short``, ``bert-large-4bit-cls`` and their
CPU smoke tests ``tiny-cls``, ``tiny-multilabel``, ``tiny-bert-cls``) set a seed's classification recipe against
the flat-batch classifier: :mod:`benchmarks.classification`. What follows describes the SFT workloads.

Both sides run in one process, one after the other, on the same synthetic data and the same
random-weight model (built from the architecture's config and saved once under
``--model-dir``; throughput and memory do not depend on the weight values):

- **seed**: the seeds' recipe. HF ``Trainer`` + peft + bitsandbytes, batches of 8 padded to the
  longest row, gradient checkpointing on (reentrant, as peft leaves it), ``paged_adamw_8bit``, bf16 autocast.
- **recipe** (``--sides seed,recipe,fast``): the same recipe written out independently, with nothing of the
  project (:mod:`benchmarks.recipe`): a check that the seed side is not slowed by what the project passes it.
- **fast**: the project's trainer with its defaults (``conf/train/gpu.yaml``): the SFT fast path
  of :mod:`src.engine` as ``src.train`` builds it, at the memory budget given by ``--budgets``
  (``default``: the config's null, 90% of the GPU).

Both use the same hyperparameters from ``conf/train/gpu.yaml`` (batch 8, lr 2e-4, one epoch) and
LoRA r=8, alpha=16 on every linear layer plus ``lm_head``. The data are ``--examples`` rows of
random token ids with lengths uniform in [64, 256] (fixed seed), loss on every token.

Reported per side: tokens/s counting non-pad tokens, timed from the end of the warm-up steps;
peak GPU memory (``torch.cuda.max_memory_allocated``) next to ``src.plan``'s estimate; MFU =
4 x non-embedding parameters x tokens/s over the bf16 matmul rate measured in the same run
(LoRA's forward and input-gradient passes; the input embedding is a lookup, ``lm_head`` counts);
and the ratios fast/seed and fast/recipe. A table is printed and the results, with device, versions and date, are
written as JSON.

Under torchrun (fast side only) each rank trains its shard with the per-GPU batch, and tokens/s
counts every rank's tokens over the slowest rank's time; MFU is per GPU. A single process uses one
GPU even where it sees several (``src.distributed.one_gpu_per_process``).
Needs transformers, peft, trl, datasets and bitsandbytes. The fast side's Trainer arguments come from
:func:`src.training_args.training_arguments`, as a run's do.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.common import (
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
from benchmarks.workloads import (
    WORKLOADS,
    all_params,
    bf16_matmul_tflops,
    ensure_checkpoint,
    non_embedding_params,
    synthetic_examples,
    versions,
)
from src import console, distributed
from src.training_args import training_arguments

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SEED_BATCH_SIZE = 8
LORA_TARGETS = "[all_linear,lm_head]"
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
FAST_VARIANTS = (
    "configured-optim, mask-attention, per-example-attention, fp32-weights, no-dequant, no-graphs, compile, "
    "compile-no-dequant, liger, fused-loss, fused-lora, fused, batch<N>"
)


# ---------------------------------------------------------------------------------------------- config


def project_config(workload: Workload, model_dir: Path, device: str, overrides: list[str]):
    """The project's composed and validated config for the workload (conf/train/gpu.yaml)."""
    from src.config import compose, validate

    base = [
        "hydra/sweeper=basic",  # one run's config: the project's sweeper and its settings are not needed
        f"model={workload.model_group}",
        f"model.name_or_path={model_dir}",
        f"model.max_length={workload.lengths[1]}",
        f"quant={workload.quant_group}",
        "lora=all_linear",
        f"lora.target_modules={LORA_TARGETS}",
        "data=instructions",  # an SFT data config; the bench passes its own rows
        "train=gpu",
        "train.num_train_epochs=1",
        "train.max_steps=-1",
        "train.eval_strategy=no",
        "train.save_strategy=no",
        "train.logging_steps=1000000",
    ]
    if device == "cpu":  # bf16 autocast and bitsandbytes' paged optimizer are GPU features
        base += ["model.dtype=float32", "train.bf16=false", "train.tf32=null", "train.optim=adamw_torch"]
    raw = compose([*base, *overrides])
    raw["output_dir"] = tempfile.mkdtemp(prefix="bench-")
    return validate(raw)


# ---------------------------------------------------------------------------------------------- the seed side


def pad_to_longest(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The seeds' collator: rows padded on the right to the longest in the batch, pads ignored by the loss."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def run_seed(workload: Workload, model_dir: Path, rows: list[list[int]], device: str, warmup: int) -> dict[str, Any]:
    """(a) The seeds' recipe, written out as the seeds wrote it (at the workload's bits through bitsandbytes)."""
    from datasets import Dataset
    from transformers import Trainer

    workload = dataclasses.replace(workload, quant="")  # an FP8 workload's seed side is the seeds' 8-bit: LLM.int8
    cfg = project_config(
        workload,
        model_dir,
        device,
        [
            "train.fast_path=false",  # the plain path: src.plan models its fp32 residual stream under 4/8-bit
            f"train.per_device_train_batch_size={SEED_BATCH_SIZE}",
            "train.activation_checkpointing=true",
        ]
        + (["train.optim=paged_adamw_8bit"] if device != "cpu" else []),
    )
    base = reset_memory(device)
    model = seed_model(workload, model_dir, device, cfg)
    args = distributed.one_gpu_per_process(
        seed_arguments(cfg)
    )  # one GPU, as the seeds ran it, also on a host with more
    meter = Meter(warmup, device)
    pad_id = bench_tokenizer().pad_token_id
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        data_collator=meter.wrap(lambda examples: pad_to_longest(examples, pad_id)),
        callbacks=[meter.callback()],
    )
    wall, peak = timed_train(trainer, device)
    longest = meter.max_micro_batch_rows_x_len // SEED_BATCH_SIZE  # the widest padded batch
    estimate = plan_estimate_gb(cfg, SEED_BATCH_SIZE, longest, 1.0, cfg.train.optim)
    trainer.accelerator.free_memory()
    del trainer, model
    return side_result(
        "seed", None, meter, wall, peak, estimate, base, dict(micro_batch_size=SEED_BATCH_SIZE, checkpointed="all")
    )


def seed_model(workload: Workload, model_dir: Path, device: str, cfg):
    """The seeds' model: the base at its bits through bitsandbytes, every layer checkpointed, peft's LoRA."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = {
        4: BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        8: BitsAndBytesConfig(load_in_8bit=True),
        16: None,
    }[workload.bits]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.bfloat16 if device != "cpu" else torch.float32,
        quantization_config=quant,
        device_map={"": 0} if device != "cpu" else None,
    )
    if workload.bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # What peft's prepare_model_for_kbit_training(model) does by default, as the seeds call it: every layer
    # checkpointed with its empty kwargs, which torch takes as reentrant checkpointing. Written out, because peft's
    # use_gradient_checkpointing calls transformers' deprecated gradient_checkpointing_enable.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=SEED_CHECKPOINTING)
    model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=LLAMA_LINEARS,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def seed_arguments(cfg):
    """The seeds' TrainingArguments, written out as they wrote them: the project's hyperparameters, their batch."""
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=SEED_BATCH_SIZE,
        activation_checkpointing=True,
        # the same again: without kwargs the Trainer would switch the layers to non-reentrant checkpointing
        activation_checkpointing_kwargs=SEED_CHECKPOINTING,
        optim=t.optim,
        bf16=t.bf16,
        tf32=t.tf32,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=1,
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


# ---------------------------------------------------------------------------------------------- the fast side


def run_fast(
    workload: Workload,
    model_dir: Path,
    rows: list[list[int]],
    device: str,
    warmup: int,
    budget: Optional[float],
    variant: str = "",
    profile: Optional[Path] = None,
) -> dict[str, Any]:
    """(b) The project's trainer with its defaults: src.modeling + src.engine, as src.train builds them."""
    cfg = fast_config(workload, model_dir, device, budget, variant)
    base = reset_memory(device)
    if variant == "liger":
        apply_liger(workload)
    meter = Meter(warmup, device)
    profiler = None if profile is None else StepProfiler(profile, start=warmup + 4, device=device)
    callbacks = [meter.callback()] + ([profiler.callback()] if profiler else [])
    trainer, micro, model = fast_trainer(cfg, rows, variant, callbacks)
    if variant.startswith("compile"):  # a dedicated run compiles once, outside the timed steps
        warm_compiled(trainer, rows[: SEED_BATCH_SIZE * 2])
    if variant == "configured-optim":  # measure what fused AdamW buys
        trainer.args.optim = cfg.train.optim
    optim = trainer.args.optim
    trainer.data_collator = meter.wrap(trainer.data_collator)
    wall, peak = timed_train(trainer, device)
    meter.gather()
    estimate = fast_estimate(cfg, model, meter, micro, optim)
    graphs = trainer.graphs
    graph_note = None if graphs is None else graphs.summary()
    trainer.accelerator.free_memory()
    del trainer, model, graphs
    settings = dataclasses.asdict(micro) | {"optim": optim, "variant": variant or None, "cuda_graphs": graph_note}
    result = side_result("fast", budget, meter, wall, peak, estimate, base, settings)
    if profiler is not None:
        result["profile"] = profiler.summary
    result["planned_est_peak_gpu_mem_gb"] = micro.est_peak_gpu_mem_gb
    return result


def fast_config(workload: Workload, model_dir: Path, device: str, budget: Optional[float], variant: str):
    """The project's config of the fast side: the workload's, at the budget (and a variant's batch)."""
    overrides = [] if budget is None else [f"train.memory_budget_gb={budget}"]
    if variant.startswith("batch"):  # a larger optimizer step: learning differs from the seeds' batch of 8
        overrides.append(f"train.per_device_train_batch_size={int(variant[len('batch') :])}")
    if variant in ("fused-loss", "fused"):  # the loss a chunk of tokens at a time (src/engine/loss.py)
        overrides.append("train.fused_loss=true")
    if variant in ("fused-lora", "fused"):  # each LoRA linear's scale and add in one addmm (src/engine/lora.py)
        overrides.append("train.fused_lora=true")
    return project_config(workload, model_dir, device, overrides)


def apply_liger(workload: Workload) -> None:
    """Liger's kernels for the architecture's RoPE, RMSNorm and SwiGLU (the loss stays the project's)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_mistral

    patch = {"llama": apply_liger_kernel_to_llama, "mistral": apply_liger_kernel_to_mistral}[workload.model_type]
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def fast_trainer(cfg, rows: list[list[int]], variant: str, callbacks: list):
    """The SFT fast path's (trainer, micro-batch plan, model) as src.fit builds it, with a variant's switch turned."""
    from datasets import Dataset

    from src import modeling
    from src.engine.trainer import build_flat_sft_trainer

    tokenizer = bench_tokenizer()
    model = modeling.load_model(
        cfg.model, cfg.quant, "sft", None, tokenizer.pad_token_id, cfg.train.activation_checkpointing
    )
    model = modeling.apply_lora(model, cfg.lora, "sft")
    args = training_arguments(cfg.train, cfg.output_dir, "sft", cfg.model.max_length, cfg.data.response_only_loss)
    trainer, micro = build_flat_sft_trainer(
        cfg,
        model,
        tokenizer,
        args,
        Dataset.from_dict({"input_ids": rows}),
        callbacks=callbacks,
        attention={"mask-attention": "mask", "per-example-attention": "per-example"}.get(variant, "auto"),
        bf16_weights=variant != "fp32-weights",
        dequantize=False if variant in ("no-dequant", "compile-no-dequant") else None,
        compile_layers=variant in ("compile", "compile-no-dequant"),
        cuda_graphs=False if variant == "no-graphs" else None,
    )
    return trainer, micro, model


def fast_estimate(cfg, model, meter: Meter, micro, optim: str) -> Optional[float]:
    """src.plan's peak at the largest packed micro-batch seen (the plan bounds it by max_length rows), with what the
    fast path adds: the mask attention's mask, the dequantized weights' cache."""
    from src.engine.attention import mask_attention_gb

    checkpointed = micro.checkpointed_layers / micro.num_layers
    estimate = plan_estimate_gb(cfg, 1, meter.max_micro_batch_tokens, checkpointed, optim)
    if estimate is None:
        return None
    if micro.attention == "mask":
        estimate += mask_attention_gb(model, meter.max_micro_batch_tokens, micro.checkpointed_layers)
    return estimate + micro.dequantized_gb


def warm_compiled(trainer, rows: list[list[int]]) -> None:
    """Run the compiled layers forward and backward on two flat rows of other lengths, so that
    compilation (once per dynamic-shape graph) is not timed; nothing is updated."""
    model = trainer.model
    for size in (len(rows) // 2, len(rows)):
        batch = trainer.data_collator([{"input_ids": r, "labels": r} for r in rows[:size]])
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- command


def format_bench_table(runs: list[dict[str, Any]]) -> str:
    header = (
        "workload",
        "side",
        "budget",
        "tokens/s",
        "peak GiB",
        "plan GiB (err)",
        "MFU",
        "4N TF/s",
        "/seed",
        "/recipe",
    )
    lines = [header]
    for run in runs:
        for s in run["sides"]:
            side = s["side"] + (f"+{s['settings']['variant']}" if s["settings"].get("variant") else "")
            budget = (
                "-"
                if s["side"] in ("seed", "recipe")
                else ("default" if s["budget_gb"] is None else f"{s['budget_gb']:g}")
            )
            peak = "-" if s["peak_gpu_mem_gb"] is None else f"{s['peak_gpu_mem_gb']:.2f}"
            est = "-" if s["est_peak_gpu_mem_gb"] is None else f"{s['est_peak_gpu_mem_gb']:.2f}"
            if s["planner_error_pct"] is not None:
                est += f" ({s['planner_error_pct']:+.0f}%)"
            ratio = "-" if s.get("ratio_over_seed") is None else f"{s['ratio_over_seed']:.2f}x"
            over_recipe = "-" if s.get("ratio_over_recipe") is None else f"{s['ratio_over_recipe']:.2f}x"
            mfu, tf4n = f"{100 * s['mfu']:.1f}%", "-" if s.get("tf4n") is None else f"{s['tf4n']:.3g}"
            rate = f"{s['tokens_per_s']:,.0f}"
            lines.append((run["workload"], side, budget, rate, peak, est, mfu, tf4n, ratio, over_recipe))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines)


def parse_budgets(text: str) -> list[Optional[float]]:
    return [None if b == "default" else float(b) for b in text.split(",") if b]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line, with ``sides``, ``budgets`` and ``variants`` as lists."""
    parser = argparse.ArgumentParser(prog="python -m src.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="w3b-4bit", help=f"comma-separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--examples", type=int, default=2048, help="synthetic rows (one epoch)")
    parser.add_argument(
        "--budgets",
        default=None,
        help="fast-path memory budgets in GiB; 'default' is the config's null (default: default,8 on a GPU; "
        "default on CPU, which has no budget of its own)",
    )
    parser.add_argument(
        "--variants",
        default="",
        help=f"extra fast runs (comma-separated): {FAST_VARIANTS}; for a classifier: length-grouped, no-graphs",
    )
    parser.add_argument("--sides", default="seed,fast", help="which sides to run: seed, recipe (SFT workloads), fast")
    parser.add_argument("--warmup-steps", type=int, default=3, help="optimizer steps left out of the timing")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "lora-bench-models")
    parser.add_argument("--json", type=Path, default=None, help="default: outputs/bench/<date>.json")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="also profile 8 steps of one more fast run (first budget); operator table written to this folder",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu for a smoke test")
    args.sides = args.sides.split(",")
    args.budgets = parse_budgets(args.budgets or ("default,8" if args.device == "cuda" else "default"))
    args.variants = [v for v in args.variants.split(",") if v]
    if distributed.world_size() > 1 and {"seed", "recipe"} & set(args.sides):
        parser.error("under torchrun run --sides fast (the seed recipe is measured on one GPU)")
    unknown = set(args.sides) - {"seed", "recipe", "fast"}
    if unknown:
        parser.error(f"--sides: unknown side(s) {', '.join(sorted(unknown))}; choose from seed, recipe, fast")
    return args


def start_ranks(device: str) -> int:
    """Under torchrun, the process group (the fast side only, data-parallel; rank 0 reports); the world size."""
    world = distributed.world_size()
    if world > 1:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    return world


def shared_checkpoint(workload: Workload, root: Path, device: str, world: int) -> Path:
    """The workload's random-weight checkpoint: one rank writes it, the others wait for it."""
    if distributed.is_main_process():
        ensure_checkpoint(workload, root, device)
    if world > 1:
        torch.distributed.barrier()
    return ensure_checkpoint(workload, root, device)


def sft_sides(
    workload: Workload, model_dir: Path, rows: list[list[int]], args: argparse.Namespace, warmup: int, failed: list
) -> list[dict[str, Any]]:
    """The seed side, the fast side at each budget, its variants and its profiled run, as the command asks."""
    results = []
    if "seed" in args.sides:
        results.append(run_seed(workload, model_dir, rows, args.device, warmup))
    if "recipe" in args.sides:
        from benchmarks.recipe import run_recipe

        results.append(run_recipe(workload, model_dir, rows, args.device, warmup))
    if "fast" not in args.sides:
        return results
    for budget in args.budgets:
        results.append(run_fast(workload, model_dir, rows, args.device, warmup, budget))
    for variant in args.variants:  # experiments: one that breaks is reported, not fatal
        try:
            results.append(run_fast(workload, model_dir, rows, args.device, warmup, args.budgets[0], variant))
        except Exception as exc:
            console.log.warning(f"variant {variant} failed: {type(exc).__name__}: {exc}")
            failed.append({"workload": workload.name, "variant": variant, "error": f"{type(exc).__name__}: {exc}"})
    if args.profile is not None:
        path = args.profile / f"{workload.name}-rank{distributed.rank()}.txt"
        results.append(run_fast(workload, model_dir, rows, args.device, warmup, args.budgets[0], "profile", path))
    return results


def run_workload(name: str, args: argparse.Namespace, world: int, peak_tflops: float, failed: list) -> dict[str, Any]:
    """Every side of one workload on its synthetic rows; the run's record, MFU and fast/seed ratios included."""
    workload = WORKLOADS[name]
    model_dir = shared_checkpoint(workload, args.model_dir, args.device, world)
    rows = synthetic_examples(args.examples, workload.lengths, workload.vocab_size)
    n_params = non_embedding_params(workload)
    if workload.task != "sft":
        from benchmarks import classification

        results, warmup = classification.run_sides(
            workload,
            model_dir,
            rows,
            args.device,
            args.sides,
            args.budgets,
            args.variants,
            args.warmup_steps,
            failed,
            args.profile,
        )
    else:
        warmup = min(args.warmup_steps, -(-len(rows) // SEED_BATCH_SIZE) // 4)
        results = sft_sides(workload, model_dir, rows, args, warmup, failed)
    seed_rate = next((r["tokens_per_s"] for r in results if r["side"] == "seed"), None)
    recipe_rate = next((r["tokens_per_s"] for r in results if r["side"] == "recipe"), None)
    n_all = all_params(workload)
    for r in results:  # MFU over every GPU of the run
        r["world_size"] = world
        r["mfu"] = 4 * n_params * r["tokens_per_s"] / (peak_tflops * 1e12 * world)
        r["tf4n"] = 4 * n_all * r["tokens_per_s"] / 1e12 / world  # per GPU, as the other tools report it
        fast = r["side"] == "fast"
        r["ratio_over_seed"] = r["tokens_per_s"] / seed_rate if seed_rate and r["side"] != "seed" else None
        r["ratio_over_recipe"] = r["tokens_per_s"] / recipe_rate if recipe_rate and fast else None
    return {
        "workload": name,
        "examples": len(rows),
        "dataset_tokens": sum(len(r) for r in rows),
        "non_embedding_params": n_params,
        "warmup_steps": warmup,
        "sides": results,
    }


def write_report(args: argparse.Namespace, runs: list, failed: list, peak_tflops: float, world: int) -> Path:
    """The JSON of the whole invocation, with device, versions and date; its path."""
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "versions": versions(),
        "matmul_peak_tflops": peak_tflops,
        "world_size": world,
        "runs": runs,
        "failed_variants": failed,
    }
    path = args.json or Path("outputs") / "bench" / f"{datetime.datetime.now():%Y-%m-%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    world = start_ranks(args.device)
    main_process = distributed.is_main_process()
    failed: list[dict[str, str]] = []
    peak_tflops = bf16_matmul_tflops(args.device)
    console.say(f"measured matmul peak: {peak_tflops:.0f} TFLOP/s")
    runs = []
    for name in args.workload.split(","):
        runs.append(run_workload(name, args, world, peak_tflops, failed))
        if main_process:
            print(format_bench_table(runs[-1:]), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
        if not main_process:
            return 0
    path = write_report(args, runs, failed, peak_tflops, world)
    print("\n" + format_bench_table(runs))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
