"""The bench's seed sides checkpoint as the seeds' recipes do: reentrant (the SFT side through a real training
step)."""

from __future__ import annotations

import torch

from benchmarks import sft
from benchmarks.common import SEED_CHECKPOINTING, bench_tokenizer
from benchmarks.workloads import WORKLOADS, ensure_checkpoint


def test_the_seed_side_trains_with_peft_s_default_reentrant_checkpointing(tmp_path):
    """peft's prepare_model_for_kbit_training(model) left every layer checkpointed with empty kwargs up to peft 0.21
    (the seeds' peft), which torch runs as reentrant checkpointing; the Trainer, told to checkpoint, enables it again
    with its own kwargs. After a step every decoder layer still recomputes reentrantly (the bench's seed side ran
    non-reentrant before)."""
    from datasets import Dataset
    from transformers import Trainer

    workload = WORKLOADS["tiny"]
    model_dir = ensure_checkpoint(workload, tmp_path, "cpu")
    cfg = sft.project_config(workload, model_dir, "cpu", ["train.activation_checkpointing=true", "train.max_steps=1"])
    model = sft.seed_model(workload, model_dir, "cpu", cfg)
    args = sft.seed_arguments(cfg)
    args.max_steps = 1
    pad_id = bench_tokenizer().pad_token_id
    rows = [[5 + (i * 7 + j) % 300 for j in range(12 + i)] for i in range(8)]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        data_collator=lambda examples: sft.pad_to_longest(examples, pad_id),
    )
    trainer.train()
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m._gradient_checkpointing_func.keywords == {"use_reentrant": True} for m in layers)
    assert trainer.state.global_step == 1 and torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_the_classifier_seed_sides_checkpoint_reentrantly_too(tmp_path):
    """Seeds 000 and 004 call prepare_model_for_kbit_training(model) too; their seed side is built the same way
    (its TrainingArguments leave checkpointing as the model has it), for a decoder and for BERT."""
    from benchmarks import classification

    for name in ("tiny-cls", "tiny-bert-cls"):
        workload = WORKLOADS[name]
        model_dir = ensure_checkpoint(workload, tmp_path, "cpu")
        cfg = classification.classifier_config(workload, model_dir, "cpu")
        model = classification.seed_classifier_model(workload, model_dir, "cpu", cfg, bench_tokenizer().pad_token_id)
        assert not classification.seed_classifier_arguments(cfg).activation_checkpointing  # the model's own stays
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert layers and all(m._gradient_checkpointing_func.keywords == SEED_CHECKPOINTING for m in layers), name


def test_the_independent_recipe_is_the_seed_side_s_model_written_out_without_the_project(tmp_path):
    """``--sides recipe`` (benchmarks/recipe.py) builds the tutorial's model from transformers and peft alone. On a
    4-bit base it has the seed side's layout: every decoder layer checkpointed, the same LoRA layers and trainable
    count, 4-bit linears. How it checkpoints is the installed peft's choice (peft 0.21 leaves torch's reentrant
    default, 0.22 transformers' non-reentrant one), where the seed side keeps the seeds' reentrant checkpointing: a
    gap between the two sides on a GPU is then in that choice or in what the project's Trainer arguments do."""
    import dataclasses

    from benchmarks import recipe

    workload = dataclasses.replace(WORKLOADS["tiny"], bits=4)
    model_dir = ensure_checkpoint(workload, tmp_path, "cpu")
    cfg = sft.project_config(workload, model_dir, "cpu", ["train.activation_checkpointing=true"])
    seed, independent = sft.seed_model(workload, model_dir, "cpu", cfg), recipe.recipe_model(workload, model_dir, "cpu")

    def layout(model):
        layers = model.base_model.model.model.layers
        checkpointed = [m for m in layers if m.gradient_checkpointing]
        lora = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        return len(checkpointed), lora, type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__

    assert layout(independent) == layout(seed)
    assert layout(seed)[0] == workload.arch["num_hidden_layers"] and layout(seed)[2] == "Linear4bit"
    kwargs = [m._gradient_checkpointing_func.keywords for m in independent.base_model.model.model.layers]
    assert len(kwargs) == 2 and kwargs[0] == kwargs[1]  # one choice for every layer, whichever peft made
    args = recipe.recipe_arguments(str(tmp_path / "out"), "cpu")
    assert (args.per_device_train_batch_size, args.lr_scheduler_type.value, args.learning_rate) == (8, "cosine", 2e-4)
