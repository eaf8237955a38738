"""The Trainer's arguments from the ``train`` config: one builder for the trainer (``src.fit``) and the benchmarks.

Pure and MLflow-free: the benchmarks time the trainers without the tracker, so this module imports nothing of it
(``tests/integration/test_training_args.py`` checks in a fresh interpreter).
"""

from __future__ import annotations

import dataclasses

from src import distributed
from src.config import TrainConfig

# TrainConfig fields read by src.fit and src.engine, not TrainingArguments fields.
NOT_TRAINING_ARGUMENTS = {
    "early_stopping_patience",
    "stop_on_nonfinite_loss",
    "resume_from_checkpoint",
    "fast_path",
    "memory_budget_gb",
    "dequantize_weights",
    "pack_cuda_graphs",
    "fused_loss",
    "fused_lora",
    "nproc_per_node",
}


def training_arguments(
    train: TrainConfig,
    output_dir: str,
    task: str,
    max_length: int,
    response_only_loss: bool = True,
    shared_state: bool = False,
):
    """TrainingArguments (or TRL's SFTConfig for ``task="sft"``) from the config; the field names are the same.

    ``shared_state``: one of several trainers in threads of one process (a trial pack's): the arguments use the
    process's accelerate state as it is, where by default setting up their devices resets it, under the feet of
    the trainers already training (``AcceleratorState._reset_state() was called``). The process makes that state
    before its threads start (:func:`src.packs.runtime.trial_functions`)."""
    kwargs = {f.name: getattr(train, f.name) for f in dataclasses.fields(train) if f.name not in NOT_TRAINING_ARGUMENTS}
    kwargs.update(
        output_dir=output_dir,
        report_to="none",  # MLflow is written by src.training.MlflowMetricsCallback, under the project's names
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        include_num_input_tokens_seen="non_padding",
        save_only_model=False,
        disable_tqdm=True,
    )
    kwargs.update(distributed.ddp_training_kwargs())  # under torchrun (src/distributed.py)
    if shared_state:
        kwargs["accelerator_config"] = {"use_configured_state": True}
    if task == "sft":
        from trl import SFTConfig

        return SFTConfig(max_length=max_length, packing=False, completion_only_loss=response_only_loss, **kwargs)
    from transformers import TrainingArguments

    return TrainingArguments(**kwargs)
