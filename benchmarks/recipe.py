"""The independent recipe: the OpenLLaMA-3B QLoRA SFT tutorial's training, written out with nothing of the project.

The bench's seed side (:func:`benchmarks.sft.run_seed`) builds the seeds' recipe from the project's composed config
(its hyperparameters, its Trainer arguments), so a difference in what the project passes could slow it without
anyone noticing: on an H100 an independent run of the recipe was 12% faster than the seed side (issue 31). This side
is that independent run, kept next to the others so that both are measured in one process:

- plain ``transformers.Trainer`` and peft, no project module (only the bench's rows, meter and checkpoint);
- NF4 with double quantization and bf16 compute (a 4-bit workload; LLM.int8 for 8-bit, none for 16-bit);
- ``prepare_model_for_kbit_training(model)`` with its defaults: fp32 norms and every layer checkpointed, as users
  call it;
- LoRA r 8, alpha 16 (the other sides'; the tutorial's alpha 8 costs the same), dropout 0.05 on q, k, v, o, gate,
  up, down and ``lm_head``;
- batches of 8 padded by ``DataCollatorForLanguageModeling`` (its labels: the ids, pads ignored);
- ``paged_adamw_8bit``, bf16, lr 2e-4, a cosine schedule, one epoch.

The tutorial is "Efficient Fine-Tuning with LoRA: A Guide to Optimal Parameter Selection for Large Language Models"
(https://www.databricks.com/blog/efficient-fine-tuning-lora-guide-llms); its table is ``sweeps/seed_table.yaml``.
On a CPU (``--device cpu``, a smoke test of the code path) the model is fp32 with AdamW.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Meter, Workload, bench_tokenizer, reset_memory, side_result, timed_train

RECIPE_BATCH_SIZE = 8
RECIPE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
RECIPE_LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, bias="none")
RECIPE_LEARNING_RATE = 2e-4


def recipe_model(workload: Workload, model_dir: Path, device: str):
    """The recipe's model: the base at the workload's bits, prepared for k-bit training as the tutorial does, with
    its LoRA adapter."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    gpu = device != "cpu"
    quant = None
    if workload.bits == 4:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if gpu else torch.float32,
        )
    elif workload.bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.bfloat16 if gpu else torch.float32,
        quantization_config=quant,
        device_map={"": 0} if gpu else None,
    )
    model = prepare_model_for_kbit_training(model)  # its defaults: gradient checkpointing on, fp32 norms
    lora = LoraConfig(target_modules=RECIPE_TARGETS, task_type="CAUSAL_LM", **RECIPE_LORA)
    return get_peft_model(model, lora)


def recipe_arguments(output_dir: str, device: str):
    """The recipe's TrainingArguments, as the tutorial writes them (on a CPU: fp32 and torch's AdamW)."""
    from transformers import TrainingArguments

    gpu = device != "cpu"
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=RECIPE_BATCH_SIZE,
        learning_rate=RECIPE_LEARNING_RATE,
        lr_scheduler_type="cosine",
        num_train_epochs=1,
        optim="paged_adamw_8bit" if gpu else "adamw_torch",
        bf16=gpu,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1_000_000,
    )


def run_recipe(workload: Workload, model_dir: Path, rows: list[list[int]], device: str, warmup: int) -> dict:
    """The independent recipe's side: tokens/s (non-pad), peak memory; no plan estimate (it has no config)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer

    from src import distributed

    base = reset_memory(device)
    model = recipe_model(workload, model_dir, device)
    tokenizer = bench_tokenizer()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    meter = Meter(warmup, device)
    args = distributed.one_gpu_per_process(recipe_arguments(tempfile.mkdtemp(prefix="bench-recipe-"), device))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        data_collator=meter.wrap(collator),
        callbacks=[meter.callback()],
    )
    wall, peak = timed_train(trainer, device)
    trainer.accelerator.free_memory()
    del trainer, model
    settings: dict[str, Any] = dict(micro_batch_size=RECIPE_BATCH_SIZE, checkpointed="all", optim=args.optim)
    return side_result("recipe", None, meter, wall, peak, None, base, settings)
