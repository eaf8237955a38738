"""The fast SFT path: padding-free flat rows, varlen flash attention, CUDA graphs, a memory budget.

``train.fast_path=true`` (the default) trains SFT with :class:`FlatTrainer`;
``train.fast_path=false`` goes back to TRL's plain ``SFTTrainer`` on padded batches.

What the fast path changes, and why learning does not change:

- **Padding-free packing.** The examples of a micro-batch are concatenated into one row, with
  ``position_ids`` that restart at 0 for each example and no ``attention_mask`` (TRL's
  ``DataCollatorForLanguageModeling(padding_free=True)``). transformers reads the restarts in
  ``position_ids`` and builds a block-causal mask for sdpa and eager attention
  (``masking_utils.find_packed_sequence_indices``; only without a KV cache, so the trainer passes
  ``use_cache=False``), so an example never attends to another one,
  and the label of each example's first token is -100, so no token is predicted across a
  boundary. No FLOP is spent on padding. ``tests/unit/engine/test_flat.py`` checks the per-token loss
  and the LoRA gradients against the padded batch of the same examples.
- **The optimizer step is the config's.** Each step still takes
  ``per_device_train_batch_size x gradient_accumulation_steps`` examples, in the same order;
  only how they are split into forward/backward passes changes, and the loss is normalized by
  the step's token count either way (HF's ``num_items_in_batch``).
- **Attention.** On CUDA in bf16/fp16: flash attention over the whole flat row in one call per
  layer, with the examples' offsets (``torch.nn.attention.varlen``, :func:`flat_varlen_attention`;
  head sizes that are not a multiple of 8 are zero-padded). Elsewhere transformers' block-causal
  mask, which rules out sdpa's flash kernel (and for head sizes that are not a multiple of 8, its
  memory-efficient kernel: the math kernel then keeps ``heads x T x T`` matrices per layer), where
  those fit the budget; else causal attention per example (:func:`flat_sdpa_attention`).
- **bf16 weights under a 4/8-bit base** (:func:`cast_frozen_to_bf16`): fewer dtype casts per step.
- **Cached dequantized 4/8-bit weights** (:func:`cache_dequantized_weights`), as many layers as the
  budget leaves room for: the same matmul without dequantizing every weight in every pass (8-bit:
  without LLM.int8's rounding of the activations, see there).
- **CUDA graphs** (:class:`GraphedSteps`): each step's forward and backward replayed as one graph
  per padded row length, so a small step is no longer bound by launching ~5,000 kernels.
- **Micro-batches sized to a memory budget.** ``train.memory_budget_gb`` (null: 90% of the
  GPU's memory; no budget on CPU), less ``PLAN_MARGIN`` for the plan's error, and ``src.plan``'s
  estimate choose the largest micro-batch that fits, and activation checkpointing only for as
  many decoder layers as memory needs (:func:`plan_micro_batches`). ``train.activation_checkpointing``
  applies to the plain path.
- **An HF ``Trainer``, not TRL's ``SFTTrainer``**, whose fused LM head reads ``lm_head.weight``
  directly and so refuses LoRA on ``lm_head`` (the seeds' all-linear-plus-head recipe). The loss is
  the model's own, through the LoRA-wrapped head. :func:`tokenize_sft` prepares the rows as TRL
  does (EOS appended, completion-only labels, truncation to ``model.max_length``); the tests check
  the token ids and labels against TRL's. Like ``SFTTrainer``, it trains the adapters of a
  quantized model in bf16 (with the base's other weights, above).
- **Token-balanced ranks under DDP** (:class:`TokenBalancedSampler`): each optimizer step takes the
  same examples as the default shuffle, dealt to the ranks so that their token counts match; the
  averaged gradient is the same for any split of a step's examples (the loss is normalized by all
  ranks' tokens), and no rank waits for one with longer rows at the all-reduce.
- **Fused AdamW** (``adamw_torch_fused``, one kernel for all LoRA tensors) replaces the other
  AdamW variants on CUDA: LoRA's trainable parameters are too few for 8-bit or paged state
  to save memory that matters, and the fp32 state is the more exact of the two.

Evaluation uses the plain padded collator, so ``eval_loss`` is computed as on the plain path.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from transformers import Trainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from src import distributed
from src.engine.attention import (
    HALF_DTYPES,
    mask_attention_gb,
    seq_bounds,
    use_flat_attention,
    use_varlen_attention,
    varlen_available,
)
from src.engine.budget import (
    MicroBatchPlan,
    decoder_layers,
    fast_optimizer,
    plan_step,
    set_checkpointed_layers,
)
from src.engine.graphs import GraphedSteps, HostTokenCount, graphable
from src.engine.lora import fuse_lora_layers
from src.engine.loss import causal_lm_loss
from src.engine.rows import tokenize_sft
from src.engine.sampler import TokenBalancedSampler
from src.engine.weights import prepare_frozen_weights
from src.logger import say
from src.modeling import fused_head


class FlatTrainer(HostTokenCount, Trainer):
    """HF Trainer on padding-free packed batches of tokenized SFT rows.

    Overrides the documented hooks ``compute_loss`` (no KV cache, which would hide the packing;
    the examples' bounds for per-example or varlen attention) and ``evaluate`` (padded batches,
    as the plain path evaluates).
    """

    def __init__(
        self,
        *args,
        eval_data_collator,
        attention: str = "mask",
        graphs: Optional[GraphedSteps] = None,
        fused_loss: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        self.attention = attention
        self.graphs = graphs
        self.fused_loss = fused_loss  # training steps through src.engine.loss (train.fused_loss)

    def _get_train_sampler(self, train_dataset=None):
        """Under DDP, :class:`TokenBalancedSampler` in place of the default shuffle; else the Trainer's."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if (
            distributed.world_size() > 1
            and self.args.train_sampling_strategy == "random"
            and dataset is not None
            and "input_ids" in getattr(dataset, "column_names", ())
        ):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            lengths = [len(ids) for ids in dataset["input_ids"]]
            return TokenBalancedSampler(lengths, self.args.per_device_train_batch_size, distributed.world_size(), seed)
        return super()._get_train_sampler(train_dataset)

    def train(self, *args, **kwargs):
        """As the Trainer's; under DDP with CUDA graphs, on a side stream that DDP is built on and
        the graphs are captured on (:class:`GraphedSteps`)."""
        if self.graphs is None or distributed.world_size() == 1 or not torch.cuda.is_available():
            return super().train(*args, **kwargs)
        stream = self.graphs.stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = super().train(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A CUDA graph replay where :class:`GraphedSteps` takes the row, else the Trainer's eager step.

        Under DDP with graphs on, every step runs on the unwrapped model (a replay, or eagerly where
        a capture failed or a row does not fit), so DDP's hooks never fire, and its gradients are then
        averaged over the ranks in one all-reduce (:func:`src.distributed.average_gradients`): each
        rank makes exactly one such call per step, whichever way its step ran.
        """
        graphs = self.graphs
        if graphs is None or num_items_in_batch is None:
            return super().training_step(model, inputs, num_items_in_batch)
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        module = model.module if ddp else model
        loss = None
        if graphs.failed is None and graphs.accepts(inputs):
            model.train()
            with self.compute_loss_context_manager():
                loss = graphs.step(module, inputs, num_items_in_batch)
        if loss is None:
            loss = super().training_step(module, inputs, num_items_in_batch)
        if ddp:
            params = [p for p in module.parameters() if p.requires_grad]
            for p in params:
                if p.grad is None:  # unused on this rank's row: DDP reduces a zero gradient for it too
                    p.grad = torch.zeros_like(p)
            distributed.average_gradients([p.grad for p in params])
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "position_ids" in inputs and "attention_mask" not in inputs and self.attention != "mask":
            bounds = seq_bounds(inputs["position_ids"])  # a flat row: bounds once per micro-batch
            if self.attention == "varlen":
                cu = torch.tensor(bounds, dtype=torch.int32, device=inputs["input_ids"].device)
                lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
                inputs = {**inputs, "flat_cu_seqlens": cu, "flat_max_seqlen": max(lengths)}
            else:
                inputs = {**inputs, "flat_seq_bounds": bounds}
        if self.fused_loss and model.training and not return_outputs and "labels" in inputs:
            loss = self.fused_causal_lm_loss(model, inputs, num_items_in_batch)
            if loss is not None:
                return loss
        # use_cache=False: with a cache transformers ignores the packed position_ids and masks causally only.
        outputs = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
        loss = self._across_devices(outputs.loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def fused_causal_lm_loss(self, model, inputs, num_items_in_batch=None):
        """The step's loss through :func:`src.engine.loss.causal_lm_loss` (``train.fused_loss``), in the mixed
        precision that accelerate gives the model's own forward; None where the model's head does not take it."""
        with self.accelerator.autocast():
            return causal_lm_loss(model, inputs, num_items_in_batch)

    def _across_devices(self, loss, num_items_in_batch):
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: under DDP num_items_in_batch counts every rank's tokens and DDP averages
            # the gradients over the ranks, so each rank's loss is scaled back up by their number.
            loss = loss * self.accelerator.num_processes
        return loss

    def evaluate(self, *args, **kwargs):
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = train_collator


def compile_decoder_layers(model) -> int:
    """``torch.compile`` every decoder layer, with dynamic shapes (flat rows vary in length); the count.

    The layers share their code, so one compiled graph serves them all. Inductor fuses the norms,
    rotary embeddings, SwiGLU, residual adds, dtype casts and the adapters' scale-and-add, which
    eager mode runs as hundreds of small kernels per layer. Varlen attention runs uncompiled.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def build_flat_sft_trainer(
    cfg,
    model,
    tokenizer,
    args,
    train_dataset,
    eval_dataset=None,
    callbacks: Optional[list] = None,
    attention: str = "auto",
    bf16_weights: bool = True,
    dequantize: Optional[bool] = None,
    compile_layers: bool = False,
    cuda_graphs: Optional[bool] = None,
) -> tuple[FlatTrainer, MicroBatchPlan]:
    """The fast-path trainer for an SFT run, and the micro-batch plan it follows.

    Args:
        cfg: the validated :class:`src.config.Config`.
        args: the plain path's ``SFTConfig``; its batch, checkpointing and optimizer fields are replanned.
        train_dataset / eval_dataset: prompt/completion rows, or already tokenized ``input_ids``.
        attention: ``varlen`` (:func:`flat_varlen_attention`: flash over the whole flat row,
            CUDA only), ``mask`` (transformers' block-causal mask), ``per-example``
            (:func:`flat_sdpa_attention`), or ``auto``: varlen where it runs (CUDA, bf16/fp16); else the mask
            when the plan plus :func:`mask_attention_gb` fits the budget, else per example.
        bf16_weights: under bf16 training of a 4/8-bit base, cast its fp32 weights and the adapters to
            bf16 (:func:`cast_frozen_to_bf16`).
        dequantize: keep dequantized copies of a 4/8-bit base's weights (:func:`cache_dequantized_weights`);
            None: as ``train.dequantize_weights`` says, as many layers as the memory budget leaves room for
            (none without a budget).
        compile_layers: ``torch.compile`` the decoder layers (:func:`compile_decoder_layers`).
        cuda_graphs: replay each step's forward and backward as a CUDA graph (:class:`GraphedSteps`);
            None: wherever it applies (CUDA, bf16, varlen attention, one micro-batch per step, a 16- or
            4-bit base or an 8-bit one whose every layer is cached; also under DDP); a step whose capture
            fails runs eagerly, and so do the rest.
    """
    budget, micro = plan_step(cfg, model)
    set_checkpointed_layers(model, micro.checkpointed_layers)
    attention = choose_attention(attention, model, args, micro, cfg.model.max_length, budget)
    estimated = micro.est_peak_gpu_mem_gb
    if attention == "mask" and estimated is not None:
        estimated += mask_attention_gb(model, micro.micro_batch_size * cfg.model.max_length, micro.checkpointed_layers)
    dequantized, cache_gb = _prepare_frozen(model, cfg, args, budget, estimated, bf16_weights, dequantize)
    fused_lora = fuse_lora_layers(model) if cfg.train.fused_lora else 0
    if compile_layers:
        compile_decoder_layers(model)
    if cuda_graphs is None:
        cuda_graphs = graphable(args, attention, micro.gradient_accumulation_steps, cfg.quant.bits, dequantized, model)
    world = distributed.world_size()
    # one process: DDP's forward must run for its gradient hooks, and the fused loss bypasses it (src.memory plans
    # the fused loss on the same condition: fused_loss_applies)
    fused = bool(cfg.train.fused_loss) and world == 1 and fused_head(model) is not None
    graphs = GraphedSteps(tokenizer.pad_token_id, micro.micro_batch_size, world_size=world) if cuda_graphs else None
    micro = dataclasses.replace(
        micro,
        attention=attention,
        dequantized_layers=dequantized,
        dequantized_gb=cache_gb,
        compiled=compile_layers,
        cuda_graphs=bool(cuda_graphs),
        fused_loss=fused,
        fused_lora=fused_lora,
        est_peak_gpu_mem_gb=None if estimated is None else estimated + cache_gb,
    )
    args = flat_training_args(args, micro)
    trainer = sft_trainer(
        FlatTrainer,
        cfg,
        model,
        tokenizer,
        args,
        train_dataset,
        eval_dataset,
        callbacks,
        attention,
        graphs=graphs,
        fused_loss=fused,
    )
    if graphs is not None and fused:
        graphs.loss = trainer.fused_causal_lm_loss
    say(micro.describe())
    return trainer, micro


def choose_attention(attention: str, model, args, micro: MicroBatchPlan, max_length: int, budget) -> str:
    """The attention a flat batch runs (``attention``, or ``auto``'s pick), set up on ``model``: varlen where it
    runs (CUDA, half precision), else the block-causal mask where the plan plus the mask fits ``budget``, else per
    example; varlen falls back to the mask where the model cannot take it."""
    if attention == "auto":
        half = args.bf16 or args.fp16 or next(model.parameters()).dtype in HALF_DTYPES
        if half and varlen_available(next(model.parameters()).device):
            attention = "varlen"
        else:
            extra = mask_attention_gb(model, micro.micro_batch_size * max_length, micro.checkpointed_layers)
            fits = budget is None or (micro.est_peak_gpu_mem_gb or 0.0) + extra <= budget
            attention = "mask" if fits else "per-example"
    if attention == "varlen" and not use_varlen_attention(model):
        attention = "mask"
    if attention == "per-example":
        use_flat_attention(model)
    return attention


def _prepare_frozen(model, cfg, args, budget, estimated, bf16_weights: bool, dequantize: Optional[bool]):
    """:func:`prepare_frozen_weights` for the run: the dequantized copies get the room the budget leaves above
    ``estimated`` (all layers where ``dequantize`` is True, none where ``train.dequantize_weights`` is off).
    Returns (dequantized layers, their GB)."""
    if dequantize is None and not cfg.train.dequantize_weights:
        dequantize = False
    room = None if dequantize else (0.0 if budget is None else max(0.0, budget - (estimated or 0.0)))
    return prepare_frozen_weights(
        model,
        cfg.quant.bits,
        bf16=bf16_weights and args.bf16,
        dequantize=dequantize is not False,
        room_gb=room,
        int8_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
    )


def flat_training_args(args, micro: MicroBatchPlan):
    """The plain path's Trainer arguments replanned for flat batches: the plan's micro-batch and accumulation,
    checkpointing per layer (set by the plan, not the Trainer), the fast optimizer, one GPU per process."""
    args = dataclasses.replace(
        args,
        per_device_train_batch_size=micro.micro_batch_size,
        gradient_accumulation_steps=micro.gradient_accumulation_steps,
        activation_checkpointing=False,  # set per layer by the plan; the Trainer would turn on every layer
        optim=fast_optimizer(args.optim),
        include_num_input_tokens_seen="all",  # a flat row has no padding (and EOS may be the pad id)
        ddp_broadcast_buffers=False,  # under DDP: the cached dequantized weights are buffers, equal on every rank
    )
    distributed.one_gpu_per_process(args)  # dataclasses.replace set the devices up anew
    return args


def sft_trainer(cls, cfg, model, tokenizer, args, train_dataset, eval_dataset, callbacks, attention, **extra):
    """A flat SFT trainer (``cls``) on the rows tokenized as TRL does, padding-free for training and padded for
    evaluation."""
    completion_only = args.completion_only_loss is not False  # TRL's None: on for prompt/completion rows
    prepare = dict(tokenizer=tokenizer, max_length=cfg.model.max_length, completion_only_loss=completion_only)
    pad_id = tokenizer.pad_token_id
    return cls(
        model=model,
        args=args,
        train_dataset=tokenize_sft(train_dataset, **prepare),
        eval_dataset=None if eval_dataset is None else tokenize_sft(eval_dataset, **prepare),
        processing_class=tokenizer,
        callbacks=callbacks,
        data_collator=DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True),
        eval_data_collator=DataCollatorForLanguageModeling(pad_token_id=pad_id),
        attention=attention,
        **extra,
    )
