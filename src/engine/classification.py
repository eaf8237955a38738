"""Sequence classification on flat rows: a decoder classifier's fast path (``train.fast_path``, the default).

A padded batch of short texts is mostly padding: SST-2's sentences are 10-60 tokens, and a batch padded to its
longest runs the base model over every pad. Here a batch's examples are concatenated into one row without
padding, with per-example positions, and attention never crosses from one example into another (per-example
sdpa on the CPU, one varlen flash call on a GPU: :mod:`src.engine.attention`). Each example is pooled at its
own last token, as ``*ForSequenceClassification`` pools the last non-pad token of a padded row, and the head
runs on the pooled states only. The losses are the padded path's (cross-entropy with class weights, BCE with
``pos_weight``), each normalised over the whole optimizer step (:class:`ClassifierTrainer`). Training and
evaluation both run packed; ``train.fast_path=false`` keeps the padded path.

BERT is packed too: each example attends to all of itself and to nothing else (:func:`flat_encoder_attention`:
one non-causal varlen flash call where there is no attention dropout, else the row's examples laid out as a padded
batch for the attention alone, so that BERT's attention dropout stays), and it is pooled at its own first token
([CLS]) through BERT's pooler. Other encoders stay padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from src import distributed
from src.classifier import ClassifierTrainer, classification_loss, loss_total
from src.engine import attention as attention_mod
from src.engine import budget as budget_mod
from src.engine import weights
from src.engine.graphs import GraphedSteps, HostTokenCount, graphable, pad_row
from src.engine.lora import fuse_lora_layers
from src.modeling import CLASSIFIER_HEADS, FLAT_ENCODER_TYPES, base_model

# A classifier's rows can be short (8 sentences of SST-2: ~300 tokens) or long (8 abstracts: ~2,000), so its graphs'
# lengths step by 1/8 of the first row's tokens, rounded up to a power of two and at least 64: ~12% padding at most,
# and a handful of graphs (each capture costs about two eager steps).
MIN_GRAPH_BUCKET_TOKENS = 64
GRAPH_BUCKETS_PER_ROW = 8


class FlatClassificationCollator:
    """Tokenized examples (``input_ids`` and ``label``/``labels``) to one flat row.

    Returns ``input_ids`` and ``position_ids`` of shape [1, tokens], ``last_token`` (each example's last
    position in the row), ``bounds`` (each example's start and the row's end, as host ints: the attention reads
    them without a device sync) and ``labels`` ([examples], or [examples, labels] for multi-label).
    """

    def __init__(self, multilabel: bool):
        self.multilabel = multilabel

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(f["input_ids"]) for f in features]
        lengths = torch.tensor([len(x) for x in ids])
        labels = [f["labels"] if "labels" in f else f["label"] for f in features]
        ends = torch.cumsum(lengths, 0)
        return {
            "input_ids": torch.tensor([[t for x in ids for t in x]]),
            "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0),
            "last_token": ends - 1,
            "bounds": (0, *ends.tolist()),
            "labels": torch.tensor(labels, dtype=torch.float32 if self.multilabel else torch.long),
        }


def classifier_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer under a (peft-wrapped) ``*ForSequenceClassification`` and its head."""
    classifier = base_model(model)
    backbone = getattr(classifier, classifier.base_model_prefix)
    for name in sorted(CLASSIFIER_HEADS):
        head = getattr(classifier, name, None)
        if head is not None:
            return backbone, head
    raise ValueError(f"{type(classifier).__name__} has no classification head among {sorted(CLASSIFIER_HEADS)}")


def flat_logits(
    model,
    input_ids,
    position_ids,
    last_token,
    attention: str,
    bounds: Optional[tuple[int, ...]] = None,
    first_token: Optional[tuple[int, ...]] = None,
) -> torch.Tensor:
    """Logits [examples, classes] of a flat row: the transformer once over the row, each example pooled at its
    last token (``attention``: ``varlen`` for one flash call, else per-example sdpa). ``bounds``: the collator's
    host copy of the examples' offsets; else read from ``last_token``. ``first_token``: where BERT pools (None: at
    every example's start; a trial pack's row has pad examples that pool nowhere)."""
    if bounds is None:
        bounds = (0, *(int(b) + 1 for b in last_token.tolist()))
    if attention == "varlen":
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        cu = torch.tensor(bounds, dtype=torch.int32).to(input_ids.device, non_blocking=True)
        extra = {"flat_cu_seqlens": cu, "flat_max_seqlen": max(lengths)}
    else:
        extra = {"flat_seq_bounds": tuple(bounds)}
    if attention == "bidirectional":
        return _encoder_logits(model, *classifier_parts(model), input_ids, position_ids, bounds, first_token)
    return _decoder_logits(model, input_ids, position_ids, last_token, extra)


def _decoder_logits(model, input_ids, position_ids, last_token, attention_inputs: dict[str, Any]) -> torch.Tensor:
    """The transformer once over a flat row (its attention's inputs: offsets or bounds), each example pooled at its
    last token, the head on the pooled states."""
    backbone, head = classifier_parts(model)
    hidden = backbone(
        input_ids=input_ids, position_ids=position_ids, use_cache=False, **attention_inputs
    ).last_hidden_state
    return head(hidden[0, last_token.to(hidden.device)])


def _encoder_logits(
    model, backbone, head, input_ids, position_ids, bounds: tuple[int, ...], first_token=None
) -> torch.Tensor:
    """BERT over a flat row: each example pooled at its first token ([CLS]), as BertForSequenceClassification
    pools ``hidden[:, 0]`` of a padded row (its pooler, dropout and head)."""
    row = attention_mod.EncoderRow.from_bounds(bounds, input_ids.device)
    hidden = backbone(
        input_ids=input_ids,
        position_ids=position_ids,
        token_type_ids=torch.zeros_like(input_ids),
        flat_row=row,
    ).last_hidden_state
    starts = bounds[:-1] if first_token is None else first_token
    first = torch.tensor(starts).to(hidden.device, non_blocking=True)
    pooled = backbone.pooler(hidden[0, first].unsqueeze(1))
    return head(base_model(model).dropout(pooled))


class GraphedClassifierSteps(GraphedSteps):
    """A flat-batch classifier's forward, pooling, head, loss and backward as one CUDA graph replay per padded row
    length.

    As :class:`src.engine.graphs.GraphedSteps` does for SFT rows: the row is padded up to a multiple of ``bucket``
    tokens with one more example (token 0 at positions 0, 1, ...), which attends only to itself and is never pooled,
    so no logit, loss or gradient sees it. The loss is a mean over the row's examples and the pooled positions
    (``last_token``) and labels have their number as shape, so a graph is captured per padded length and number of
    examples (an epoch's smaller last batch gets its own). The loss is summed over the examples and divided by the
    step's :func:`loss_total` (the Trainer's ``num_items_in_batch``; else the row's own), an input of the graph, as
    :class:`ClassifierTrainer`'s eager step divides it. ``bucket`` None: set from the first row
    (``MIN_GRAPH_BUCKET_TOKENS``, ``GRAPH_BUCKETS_PER_ROW``). The class or ``pos_weight`` weights are moved to the
    GPU once, before any capture.
    """

    def __init__(
        self, examples: int, label_weights: Optional[torch.Tensor], multilabel: bool, bucket: Optional[int] = None
    ):
        super().__init__(pad_token_id=0, max_examples=examples, bucket=bucket or 0)
        self.label_weights = label_weights
        self.multilabel = multilabel

    def padded_length(self, tokens: int) -> int:
        if not self.bucket:
            self.bucket = max(
                MIN_GRAPH_BUCKET_TOKENS, 1 << max(0, -(-tokens // GRAPH_BUCKETS_PER_ROW) - 1).bit_length()
            )
        return super().padded_length(tokens)

    def _key(self, inputs: dict[str, Any], length: int) -> tuple[int, int]:
        return length, len(inputs["bounds"]) - 1

    def accepts(self, inputs: dict[str, Any]) -> bool:
        return "bounds" in inputs and 0 < len(inputs["bounds"]) - 1 <= self.max_examples

    def _inputs(self, inputs: dict[str, Any], length: int, num_items_in_batch=None) -> dict[str, torch.Tensor]:
        ids, positions = pad_row(inputs, length, self.pad_token_id)
        return {
            "input_ids": ids,
            "position_ids": positions,
            "last_token": inputs["last_token"].cpu(),
            "labels": inputs["labels"].cpu(),
            "flat_cu_seqlens": torch.tensor([*inputs["bounds"], length], dtype=torch.int32),
            "loss_total": loss_total(inputs["labels"], self.label_weights, self.multilabel).cpu()
            if num_items_in_batch is None
            else torch.as_tensor(num_items_in_batch, dtype=torch.float32),
        }

    def _forward_backward(self, model, static: dict[str, torch.Tensor], max_seqlen: int) -> torch.Tensor:
        extra = {"flat_cu_seqlens": static["flat_cu_seqlens"], "flat_max_seqlen": max_seqlen}
        logits = _decoder_logits(model, static["input_ids"], static["position_ids"], static["last_token"], extra)
        weights = self._weights(logits.device)
        loss = classification_loss(logits, static["labels"], weights, self.multilabel, static["loss_total"])
        loss.backward()
        return loss.detach()

    def _weights(self, device) -> Optional[torch.Tensor]:
        if self.label_weights is not None and self.label_weights.device != device:
            self.label_weights = self.label_weights.to(device)  # in the warm-up, before any capture
        return self.label_weights


class FlatClassifierTrainer(HostTokenCount, ClassifierTrainer):
    """HF Trainer on flat rows of classification examples, with :class:`ClassifierTrainer`'s loss, counting its
    tokens on the host (:class:`HostTokenCount`: transformers' count reads one back from the GPU every step).

    ``cuda_graphs``: replay each micro-batch's step as a CUDA graph (:class:`GraphedClassifierSteps`; where
    :func:`src.engine.graphs.graphable` holds, in one process); a capture that fails leaves the rest of the run eager.
    """

    def __init__(self, *args, attention: str, cuda_graphs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.attention = attention
        self.graphs = (
            GraphedClassifierSteps(self.args.per_device_train_batch_size, self.label_weights, self.multilabel)
            if cuda_graphs
            else None
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A CUDA graph replay where :class:`GraphedClassifierSteps` takes the row. Under DDP: the step on the
        unwrapped model (the packed forward calls its parts, not DDP's forward, whose hooks would not fire), then
        one all-reduce of the gradients, as the SFT fast path does."""
        graphs = self.graphs
        if graphs is not None and graphs.failed is None and graphs.accepts(inputs):
            model.train()
            with self.compute_loss_context_manager():
                loss = graphs.step(model, inputs, num_items_in_batch)
            if loss is not None:
                return loss
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return super().training_step(model, inputs, num_items_in_batch)
        module = model.module
        loss = super().training_step(module, inputs, num_items_in_batch)
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.average_gradients([p.grad for p in params])
        return loss

    def forward(self, model, inputs: dict[str, Any]) -> SequenceClassifierOutput:
        logits = flat_logits(
            model, inputs["input_ids"], inputs["position_ids"], inputs["last_token"], self.attention, inputs["bounds"]
        )
        return SequenceClassifierOutput(logits=logits)


def plan_fast_classifier(cfg, model, args, attention: str, lengths: Optional[Sequence[int]] = None):
    """Replan a flat-batch classifier's step as the SFT fast path does
    (:func:`src.engine.budget.plan_micro_batches`), where a memory budget is known (``train.memory_budget_gb``, else
    90% of the GPU): the largest micro-batch that fits, checkpointing as few layers as it needs (none, for short
    texts on a large GPU), fused AdamW, a 4/8-bit base's fp32 weights and adapters in bf16 under bf16 training, and
    its dequantized weights cached in the room left.
    ``lengths``: the training examples' token counts; a micro-batch of n examples is then planned for the largest
    of n in many shuffles of them (:func:`src.engine.budget.largest_micro_batch_tokens`), else for n x
    ``model.max_length``.
    Returns (the TrainingArguments to train with, the plan); without a budget, ``args`` as they are and None.
    """
    import dataclasses

    tokens = (
        None if lengths is None else budget_mod.largest_micro_batch_tokens(lengths, epochs_trained(cfg, len(lengths)))
    )
    budget, micro = budget_mod.plan_step(cfg, model, tokens)
    if budget is None:
        return args, None
    budget_mod.set_checkpointed_layers(model, micro.checkpointed_layers)
    cached, cache_gb = weights.prepare_frozen_weights(
        model,
        cfg.quant.bits,
        bf16=args.bf16,
        dequantize=cfg.train.dequantize_weights,
        room_gb=max(0.0, budget - (micro.est_peak_gpu_mem_gb or 0.0)),
        int8_dtype=torch.bfloat16 if args.bf16 else torch.float32,
    )
    estimated = None if micro.est_peak_gpu_mem_gb is None else micro.est_peak_gpu_mem_gb + cache_gb
    micro = dataclasses.replace(
        micro,
        fused_lora=fuse_lora_layers(model) if cfg.train.fused_lora else 0,
        attention="per-example" if attention == "bounds" else attention,
        dequantized_layers=cached,
        dequantized_gb=cache_gb,
        est_peak_gpu_mem_gb=estimated,
        # as for SFT; and one process: under DDP the step runs eagerly on the unwrapped model (see training_step)
        cuda_graphs=distributed.world_size() == 1
        and graphable(args, attention, micro.gradient_accumulation_steps, cfg.quant.bits, cached, model),
    )
    args = dataclasses.replace(
        args,
        per_device_train_batch_size=micro.micro_batch_size,
        gradient_accumulation_steps=micro.gradient_accumulation_steps,
        activation_checkpointing=False,  # set per layer above
        optim=budget_mod.fast_optimizer(args.optim),
    )
    return distributed.one_gpu_per_process(args), micro


def epochs_trained(cfg, examples: int) -> float:
    """The epochs over ``examples`` a run trains: ``train.max_steps`` optimizer steps where set, else the epochs."""
    if cfg.train.max_steps and cfg.train.max_steps > 0:
        per_step = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
        return cfg.train.max_steps * per_step / max(examples, 1)
    return float(cfg.train.num_train_epochs)


def flat_attention(model) -> Optional[str]:
    """Switch the model's attention to a packed-row kernel and name it: ``varlen`` on a GPU (one flash call per
    row in bf16/fp16; in fp32 it runs per-example sdpa itself), else ``bounds`` (per-example sdpa); for BERT,
    ``bidirectional`` (:func:`flat_encoder_attention`); None where the model cannot be packed (another encoder,
    or an attention other than sdpa)."""
    classifier = base_model(model)
    if classifier.config.model_type in FLAT_ENCODER_TYPES:
        return "bidirectional" if attention_mod.use_encoder_attention(model) else None
    if classifier.config.model_type in ENCODER_TYPES:
        return None
    device = next(classifier.parameters()).device
    if attention_mod.varlen_available(device) and attention_mod.use_varlen_attention(model):
        return "varlen"
    return "bounds" if attention_mod.use_flat_attention(model) else None


# Bidirectional attention: packed where the pooling and head are BertForSequenceClassification's (pooler on the
# first token, dropout, linear head: src.modeling.FLAT_ENCODER_TYPES); the others pool or embed differently and
# stay padded.
ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "modernbert"}
