"""The trainer of one trial of a pack: a :class:`src.engine.trainer.FlatTrainer` whose micro-batches, clipping and
optimizer step run in the pack's joint step (:meth:`src.packs.model.Pack.step`); its schedule, logging, evaluation and
callbacks are its own."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from src import distributed
from src.engine.attention import HALF_DTYPES, seq_bounds, use_flat_attention, use_varlen_attention, varlen_available
from src.engine.budget import fast_optimizer
from src.engine.classification import FlatClassificationCollator, FlatClassifierTrainer, flat_attention, flat_logits
from src.engine.graphs import graphable
from src.engine.trainer import FlatTrainer, sft_trainer
from src.logger import say
from src.packs import engine
from src.packs.graphs import JointGraphs


class ScheduleOnly(torch.optim.Optimizer):
    """The optimizer a pack trial's Trainer holds: its learning-rate schedule runs on it, and its ``step`` does
    nothing. The trial's weights step in the pack's joint step (:class:`src.packs.engine.SlotAdamW`), at the
    learning rate this optimizer's group holds then."""

    def __init__(self, lr: float):
        super().__init__([torch.zeros(1, requires_grad=True)], {"lr": lr})

    def step(self, closure=None):  # noqa: D102  the pack's joint step moved the weights
        return None


class SlotTrainer:
    """What makes a Trainer a pack trial's (mixed into a flat-batch trainer): its micro-batches, clipping and
    optimizer step run in the pack's joint step; its loop (:meth:`Trainer._run_epoch`), schedule, logging, evaluation
    and callbacks are its own."""

    member: Any

    def __init__(self, *args, member, **kwargs):
        super().__init__(*args, **kwargs)
        self.member = member
        self.model_accepts_loss_kwargs = True  # the joint step normalizes each loss by its window's total
        self._window = 0  # micro-batches left in this accumulation window
        self._norm: Optional[torch.Tensor] = None  # the last step's gradient norm, before clipping (on the device)

    def _set_signature_columns_if_needed(self) -> None:
        """The columns a run alone keeps: the base model's forward arguments (the trial model takes ``**inputs``)."""
        if self._signature_columns is None:
            import inspect

            forward = self.member.pack.model.get_base_model().forward
            self._signature_columns = [*inspect.signature(forward).parameters, "label", "label_ids", *self.label_names]

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = ScheduleOnly(self.args.learning_rate)
        return self.optimizer

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """As the Trainer's; and how many micro-batches this window holds (its last steps the optimizer)."""
        samples, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window = len(samples)
        return samples, count

    def _clip_grad_norm(self, model):
        return self._norm  # the pack clipped the trial's gradient in its joint step

    def _get_grad_norm(self, model, grad_norm=None):
        return self._norm

    def slot_row(self, inputs, count) -> engine.SlotRow:
        """The trial's micro-batch as the pack's joint step takes it (host tensors: no device sync)."""
        return engine.SlotRow(
            self.member.pack.slot(self.member.adapter),
            inputs["input_ids"],
            inputs["position_ids"],
            inputs["labels"],
            tuple(inputs["bounds"]) if "bounds" in inputs else seq_bounds(inputs["position_ids"]),
            count,
            inputs.get("last_token"),
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        self._window -= 1
        args = self.args
        hyper = (
            self.lr_scheduler.get_last_lr()[0],
            args.adam_beta1,
            args.adam_beta2,
            args.adam_epsilon,
            args.weight_decay,
            args.max_grad_norm,
        )
        row = self.slot_row(inputs, num_items_in_batch)
        submission = engine.Submission(row, self._window <= 0, hyper, self.compute_loss_context_manager)
        loss, norm = self.member.pack.step(self.member.adapter, submission)
        if norm is not None:
            self._norm = norm
        return loss

    def train(self, *args, **kwargs):
        """Train in a slot of the pack's bank: taken here, given back when training ends, however it ends."""
        self.member.pack.join(self.member.adapter)
        try:
            return super().train(*args, **kwargs)
        finally:
            self.member.pack.leave(self.member.adapter)


class PackMemberTrainer(SlotTrainer, FlatTrainer):
    """One SFT trial of a pack (:mod:`src.packs.model`)."""


class PackClassifierTrainer(SlotTrainer, FlatClassifierTrainer):
    """One classification trial of a pack: its evaluation runs the shared model with its slot alone."""

    def forward(self, model, inputs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        with self.member.pack.routed(self.member.adapter) as shared:
            logits = flat_logits(
                shared,
                inputs["input_ids"],
                inputs["position_ids"],
                inputs["last_token"],
                self.attention,
                inputs["bounds"],
            )
        return SequenceClassifierOutput(logits=logits)


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
    """An SFT trial's trainer on the pack (:class:`PackMemberTrainer`) and its plan."""
    if member.attention == "auto":
        member.attention = pack_attention(member.pack.model, args)
    pack = member.pack
    pack.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if pack.graphs is None and _graphable(cfg, args, member):
        pack.graphs = JointGraphs(pack.model, pack.bank, pack.pad_token_id, member.micro.micro_batch_size)
    if pack.graphs is not None:
        member.micro = dataclasses.replace(member.micro, cuda_graphs=True)
    micro = _trial_plan(member)
    trainer = sft_trainer(
        PackMemberTrainer,
        cfg,
        member.model,
        tokenizer,
        _pack_args(args, member),
        train_dataset,
        eval_dataset,
        callbacks,
        member.attention,
        member=member,
    )
    return trainer, micro


def _graphable(cfg, args, member) -> bool:
    """Whether the pack's SFT joint steps replay as CUDA graphs (:mod:`src.packs.graphs`): where every trial asks
    (``train.pack_cuda_graphs``), and where a run alone's steps would (one micro-batch a step or several: the graphs
    accumulate), and no layer of the base is checkpointed."""
    micro = member.micro
    if not member.pack.graphs_asked:
        return False
    graphs_apply = graphable(args, member.attention, 1, cfg.quant.bits, micro.dequantized_layers, member.pack.model)
    return graphs_apply and micro.checkpointed_layers == 0


def _trial_plan(member):
    """The trial's plan with the pack's attention (set on the pack too), as its run's log shows it."""
    member.pack.attention = member.attention
    micro = dataclasses.replace(member.micro, attention=member.attention)
    say(micro.describe().replace("fast path:", f"fast path (pack trial {member.adapter}):"))
    return micro


def _pack_args(args, member):
    """The trial's Trainer arguments on the pack's plan: its micro-batches, no checkpointing of its own (the pack
    set it), the fast optimizer's name (its step is the pack's), its own data order."""
    micro = member.micro
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
        # the process's accelerate state as it is (src.training_args: shared_state); transformers pops the flag
        # from the arguments it was given, so each new copy is given it again
        accelerator_config={"use_configured_state": True},
    )
    return distributed.one_gpu_per_process(args)


def build_pack_classifier_trainer(data, args, common: dict, member):
    """A classification trial's trainer on the pack (:class:`PackClassifierTrainer`) and its plan. ``common``: the
    trainer's arguments as a run alone gets them (datasets, metrics, callbacks, tokenizer)."""
    pack = member.pack
    if member.attention == "auto":
        member.attention = flat_attention(pack.model) or "bounds"
    micro = _trial_plan(member)
    pack.task = data.task
    if data.label_weights is not None and pack.label_weights is None:
        pack.label_weights = torch.tensor(data.label_weights, dtype=torch.float32)
    multilabel = data.task == "multilabel"
    trainer = PackClassifierTrainer(
        **{**common, "model": member.model, "args": _pack_args(args, member)},
        data_collator=FlatClassificationCollator(multilabel),
        label_weights=data.label_weights,
        multilabel=multilabel,
        attention=member.attention,
        member=member,
    )
    return trainer, micro
