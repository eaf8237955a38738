"""The classification loss (cross-entropy with class weights, BCE with ``pos_weight``) and the plain path's trainer,
normalised over the whole optimizer step; the flat-batch classifier (:mod:`src.engine.classification`) builds on both.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import Trainer
from transformers.modeling_outputs import SequenceClassifierOutput


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    multilabel: bool,
    total: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross-entropy (class weights) or BCE (``pos_weight``), in fp32: the padded and flat paths' loss.

    ``total``: the summed loss is divided by it (:func:`loss_total` of a whole optimizer step's examples, of which
    these are a part); None: the mean over these examples, as torch reduces it.
    """
    logits = logits.float()
    if weights is not None:
        weights = weights.to(logits.device)
    reduction = "mean" if total is None else "sum"
    if multilabel:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels.float(), pos_weight=weights, reduction=reduction
        )
    else:
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=weights, reduction=reduction)
    return loss if total is None else loss / total.to(loss.device)


def loss_total(labels: torch.Tensor, weights: Optional[torch.Tensor], multilabel: bool) -> torch.Tensor:
    """The divisor of :func:`classification_loss`'s mean over ``labels``, as an fp32 tensor on their device: BCE's
    element count (``pos_weight`` weighs terms, not the divisor), cross-entropy's count of labels other than -100,
    or with class weights the sum of their classes' weights, as torch's weighted mean divides. Computed on the
    device without reading anything back (no host sync in a step)."""
    if multilabel:
        return torch.full((), labels.numel(), dtype=torch.float32, device=labels.device)
    kept = labels != -100
    if weights is None:
        return kept.sum(dtype=torch.float32)
    return (weights.to(labels.device, torch.float32)[labels.clamp(min=0)] * kept).sum()


class ClassifierTrainer(Trainer):
    """HF Trainer whose loss is :func:`classification_loss` (its documented ``compute_loss`` hook), normalised over
    the whole optimizer step, so that gradient accumulation is neutral: micro-batches of 4 accumulated 4 times give
    the loss, gradient and update of one batch of 16.

    A micro-batch's loss is its summed loss over the step's :func:`loss_total` (every micro-batch's, and under DDP
    every rank's), which the Trainer passes as ``num_items_in_batch`` (:meth:`_get_num_items_in_batch`). So a
    class-weighted step is ``sum(w_i * l_i) / sum(w_i)`` over all its examples, as one large batch's weighted mean
    is; a mean per micro-batch divided by the accumulation steps would weigh a micro-batch of rare classes as much
    as one of common ones, and an epoch's short last micro-batch as much as a full one. The logged ``loss`` (the
    sum of the step's micro-batch losses) is then the step's per-example mean.

    ``forward``: the logits of a batch (the padded path's model forward; the flat path overrides it).
    """

    def __init__(self, *args, label_weights: Optional[list[float]], multilabel: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_weights = None if label_weights is None else torch.tensor(label_weights, dtype=torch.float32)
        self.multilabel = multilabel
        # The loss is normalised by num_items_in_batch where the Trainer gives it, so the Trainer must not divide it
        # again by the accumulation steps; where it gives none, it does (a micro-batch's mean / the steps).
        self.model_accepts_loss_kwargs = True

    def _get_num_items_in_batch(self, batch_samples: list, device) -> Optional[torch.Tensor]:
        """The step's loss divisor: the sum of its micro-batches' :func:`loss_total` (the Trainer's own counts
        labels: not a weighted mean's divisor), summed over the ranks
        where the Trainer averages over them (``average_tokens_across_devices``), as it does its count."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        totals = [loss_total(b["labels"], self._weights(b["labels"].device), self.multilabel) for b in batch_samples]
        total = sum(t.to(device) for t in totals)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def _weights(self, device) -> Optional[torch.Tensor]:
        """The class or ``pos_weight`` weights on ``device``, moved there once: a copy from host memory at every step
        would wait for the GPU's queue to drain."""
        if self.label_weights is not None and self.label_weights.device != torch.device(device):
            self.label_weights = self.label_weights.to(device)
        return self.label_weights

    def forward(self, model, inputs: dict[str, Any]) -> SequenceClassifierOutput:
        return model(**{k: v for k, v in inputs.items() if k != "labels"})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = self.forward(model, inputs)
        weights = self._weights(outputs.logits.device)
        loss = classification_loss(outputs.logits, inputs["labels"], weights, self.multilabel, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: the divisor counts every rank's examples and DDP averages the gradients over
            # the ranks, so each rank's loss is scaled back up by their number.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
