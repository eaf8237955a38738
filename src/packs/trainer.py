"""The trainer of one trial of a pack: a :class:`src.engine.trainer.FlatTrainer` whose micro-batches run in the pack's
joint step (:meth:`src.packs.model.Pack.step`); its optimizer, schedule, clipping, evaluation and callbacks are its
own."""

from __future__ import annotations

import dataclasses

import torch

from src import distributed
from src.engine.attention import HALF_DTYPES, seq_bounds, use_flat_attention, use_varlen_attention, varlen_available
from src.engine.budget import fast_optimizer
from src.engine.trainer import FlatTrainer, sft_trainer
from src.logger import say


class PackMemberTrainer(FlatTrainer):
    """One trial of a pack (:mod:`src.packs.model`): its micro-batches run in the pack's joint step, its optimizer,
    schedule, clipping, evaluation and callbacks are its own."""

    def __init__(self, *args, member, **kwargs):
        super().__init__(*args, **kwargs)
        self.member = member
        self.model_accepts_loss_kwargs = True  # the joint step normalizes each loss by its step's tokens

    def _set_signature_columns_if_needed(self) -> None:
        """The columns a run alone keeps: the base model's forward arguments (the trial model takes ``**inputs``)."""
        if self._signature_columns is None:
            import inspect

            forward = self.member.pack.model.get_base_model().forward
            self._signature_columns = [*inspect.signature(forward).parameters, "label", "label_ids", *self.label_names]

    def _prepare_input(self, data):
        """As the Trainer's, but host-to-device copies do not wait for the GPU: the joint step is queued while the
        last one runs (a blocking copy would drain the GPU's queue at every trial's every step)."""
        if isinstance(data, torch.Tensor):
            return data.to(self.args.device, non_blocking=True)
        return super()._prepare_input(data)

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        bounds = seq_bounds(inputs["position_ids"])  # the host batch: no device sync
        inputs = self._prepare_inputs(inputs)
        return self.member.pack.step(self.member.adapter, self, {**inputs, "bounds": bounds}, num_items_in_batch)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.member.pack.leave(self.member.adapter)


def pack_attention(model, args) -> str:
    """A pack's attention: varlen where it runs, else per-example sdpa. Never transformers' block-causal mask over
    the joint row: a masked score is added to -inf, so one trial's inf activations (a diverging learning rate)
    would turn the other trials' softmax to NaN; computed apart, a trial's NaN stays its own."""
    half = args.bf16 or next(model.parameters()).dtype in HALF_DTYPES
    if half and varlen_available(next(model.parameters()).device) and use_varlen_attention(model):
        return "varlen"
    use_flat_attention(model)
    return "per-example"


def build_pack_member_trainer(cfg, tokenizer, args, train_dataset, eval_dataset, callbacks, member):
    micro = member.micro
    if member.attention == "auto":
        member.attention = pack_attention(member.pack.model, args)
    micro = dataclasses.replace(micro, attention=member.attention)
    args = dataclasses.replace(
        args,
        per_device_train_batch_size=micro.micro_batch_size,
        gradient_accumulation_steps=micro.gradient_accumulation_steps,
        activation_checkpointing=False,
        optim=fast_optimizer(args.optim),
        include_num_input_tokens_seen="all",
        # the trial's data order from its own seed alone (the trials' Trainers seed the global RNG in any order)
        data_seed=args.data_seed if args.data_seed is not None else args.seed,
        label_names=["labels"],  # the Trainer finds them in the model's forward signature, here **inputs
    )
    distributed.one_gpu_per_process(args)
    trainer = sft_trainer(
        PackMemberTrainer,
        cfg,
        member.model,
        tokenizer,
        args,
        train_dataset,
        eval_dataset,
        callbacks,
        member.attention,
        member=member,
    )
    say(micro.describe().replace("fast path:", f"fast path (pack trial {member.adapter}):"))
    return trainer, micro
