"""Fused linear cross-entropy (``train.fused_loss``): a causal LM's loss without its ``tokens x vocab`` logits.

The model's own loss computes the logits of every token in bf16, copies them to fp32 and takes a log-softmax of
that: about 9 bytes a logit (``src.memory.LOSS_LOGITS_FACTOR``), 1.2 GiB for a step of 4,096 tokens over a 32k
vocabulary, and three passes over it. Here the logits are made a chunk of tokens at a time; each chunk's loss and
its gradient (softmax minus one-hot) are computed at once, the gradient goes straight through the head's matmuls,
and the chunk's logits are dropped before the next. The backward then only scales what the forward kept. This is
Liger's and Apple's cut-cross-entropy's algorithm, in plain PyTorch matmuls (so it runs on a CPU, and a CUDA graph
captures it: no host sync).

A LoRA adapter on ``lm_head`` (the seeds' all-linear-plus-head recipe, which TRL's fused head refuses) folds in as
a second, rank-wide matmul: ``logits = h W^T + z B^T`` with ``z = scale * A(dropout(h))``. The gradients go to
``h``, ``z`` (autograd takes it on to A and back to ``h``) and B; the frozen W gets none.

:func:`causal_lm_loss` runs the decoder and this loss in place of the model's forward, for the architectures
whose forward is exactly ``loss_function(lm_head(decoder(...)), labels)`` (:func:`src.modeling.fused_head`);
elsewhere it returns None and the caller takes the model's own loss. How many tokens a chunk holds is
:func:`src.memory.chunk_tokens`, which the plan counts. ``tests/unit/engine/test_fused_loss.py`` checks both
against the model's own loss within 1e-5 in fp32, forward and gradients.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from src.memory import chunk_tokens
from src.modeling import fused_head

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of ``hidden @ weight.T (+ z @ b.T)`` against ``labels``, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, z, b, labels, chunk: int):
        dtype = hidden.dtype
        ctx.b_dtype = None if b is None else b.dtype  # B's gradient goes back in its own dtype, summed in fp32
        weight = weight.to(dtype)
        z = None if z is None else z.to(dtype)
        b = None if b is None else b.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_z = torch.empty_like(z) if z is not None and ctx.needs_input_grad[2] else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if ctx.needs_input_grad[3] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            h, y = hidden[part], labels[part]
            logits = h @ weight.T
            if z is not None:
                logits = logits + z[part] @ b.T
            logits = logits.float()
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)
            total = total + ((lse - logits.gather(1, target)[:, 0]) * valid).sum()
            # d(sum of the chunk's losses)/d(logits): softmax minus one-hot, zero on ignored tokens
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, target, -torch.ones_like(lse)[:, None])
            grad.mul_(valid[:, None])
            grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[part] = grad @ weight
            if grad_z is not None:
                grad_z[part] = grad @ b
            if grad_b is not None:
                grad_b.addmm_(grad.T.float(), z[part].float())
        ctx.save_for_backward(grad_hidden, grad_z, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_z, grad_b = ctx.saved_tensors
        scale = grad_total.float()  # a 0-dim fp32 tensor: a bf16 gradient times it is computed in fp32, rounded once
        return (
            None if grad_hidden is None else grad_hidden * scale,
            None,
            None if grad_z is None else grad_z * scale,
            None if grad_b is None else (grad_b * scale).to(ctx.b_dtype),
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    z: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """The summed cross-entropy (ignoring ``labels`` of -100) of the logits ``hidden @ weight.T + z @ b.T``
    (``z``, ``b``: a LoRA head's rank-wide input and B, or None), without holding more than ``chunk`` tokens'
    logits. ``hidden`` ``[tokens, hidden]``, ``labels`` ``[tokens]``. The matmuls run in autocast's dtype under
    autocast (as the model's own head would), else in ``hidden``'s; the loss is summed in fp32."""
    if torch.is_autocast_enabled(hidden.device.type):  # the Function casts the rest to hidden's dtype
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    chunk = chunk or chunk_tokens(weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, z, b, labels, chunk)


def _head_terms(head, adapter: Optional[str], hidden: torch.Tensor):
    """The head's (W, z, B): its frozen weight, and its LoRA ``adapter``'s rank-wide input and B (None, None
    without one)."""
    base = getattr(head, "base_layer", head)
    if adapter is None:
        return base.weight, None, None
    a = head.lora_A[adapter]
    z = a(head.lora_dropout[adapter](hidden.to(a.weight.dtype))) * head.scaling[adapter]
    return base.weight, z, head.lora_B[adapter].weight


def causal_lm_loss(model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> Optional[torch.Tensor]:
    """The model's own next-token loss on ``inputs`` (``labels`` and the decoder's inputs) through
    :func:`linear_cross_entropy`, or None where :func:`fused_head` does not take the model. As transformers'
    ``ForCausalLMLoss``: the labels shifted by one, the sum over the labeled tokens divided by
    ``num_items_in_batch`` (None: their count).

    It calls the decoder and the head directly, not the model's forward: where a trainer's mixed precision wraps
    that forward in autocast (accelerate does), the caller must enter the same autocast around this call
    (:meth:`src.engine.trainer.FlatTrainer.fused_causal_lm_loss`)."""
    found = fused_head(model)
    if found is None:
        return None
    decoder, head, adapter = found
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    inputs.pop("num_items_in_batch", None)
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    weight, z, b = _head_terms(head, adapter, hidden)
    total = linear_cross_entropy(hidden, weight, shifted, z, b)
    if num_items_in_batch is None:
        num_items_in_batch = (shifted != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
