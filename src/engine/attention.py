"""Attention over flat rows: transformers' block-causal mask, sdpa per example, or varlen flash attention.

Registered with transformers' ``AttentionInterface`` under :data:`FLAT_ATTENTION` (sdpa per example),
:data:`VARLEN_ATTENTION` (one flash call per flat row, CUDA in bf16/fp16) and, for bidirectional encoders,
:data:`ENCODER_ATTENTION` (:func:`flat_encoder_attention`); :func:`mask_attention_gb` is what the block mask costs
where sdpa falls back to its math kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from src.modeling import base_model

FLAT_ATTENTION = "sdpa_flat"

# sdpa's math kernel (a boolean mask and a head size that is not a multiple of 8) keeps about this
# many bytes per head x query x key per layer for the backward: fitted on W3B 4-bit flat rows, the mask
# attention's peak against per-example attention's (benchmarks/results/BENCH_RESULTS.md, run 2).
MATH_ATTENTION_BYTES = 4.3


def flat_sdpa_attention(module, query, key, value, attention_mask, flat_seq_bounds=None, **kwargs):
    """sdpa, run causally on each example of a flat row when ``flat_seq_bounds`` is given.

    transformers' own packed-row path builds a block-causal boolean mask, which rules out sdpa's
    flash kernel and, for head sizes that are not a multiple of 8 (OpenLLaMA-3B's 100), its
    memory-efficient kernel too: the math kernel then keeps a ``heads x T x T`` fp32 matrix per
    layer. One causal call per example runs the flash kernel with no mask. Without bounds (padded
    batches, generation) this is transformers' sdpa, mask and all.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if flat_seq_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = flat_seq_bounds
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a  # empty examples pad the offsets of a CUDA graph's row
    ]
    return torch.cat(outputs, dim=1), None


def use_flat_attention(model) -> bool:
    """Switch an sdpa model to :func:`flat_sdpa_attention` (masks as for sdpa); False if it is not sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = base_model(model)
    if base.config._attn_implementation not in ("sdpa", FLAT_ATTENTION):
        return False
    AttentionInterface.register(FLAT_ATTENTION, flat_sdpa_attention)
    AttentionMaskInterface.register(FLAT_ATTENTION, sdpa_mask)
    base.set_attn_implementation(FLAT_ATTENTION)
    return True


def mask_attention_gb(model, tokens: int, checkpointed_layers: int) -> float:
    """Extra peak memory of transformers' block-mask attention over a flat row of ``tokens``, in GiB.

    Zero where sdpa's memory-efficient kernel takes the mask (head size a multiple of 8); else the
    math kernel's attention matrices of every layer not checkpointed, plus one being recomputed.
    """
    config = base_model(model).config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim % 8 == 0:
        return 0.0
    layers = config.num_hidden_layers - checkpointed_layers + (1 if checkpointed_layers else 0)
    return layers * heads * tokens**2 * MATH_ATTENTION_BYTES / 2**30


def seq_bounds(position_ids: torch.Tensor) -> tuple[int, ...]:
    """Start of every example in a flat row (where positions restart at 0), and the row's end."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return (*starts, position_ids.shape[1])


VARLEN_ATTENTION = "sdpa_varlen"

HALF_DTYPES = (torch.bfloat16, torch.float16)  # the flash kernel's


def _varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn`` (flash, one call per flat row) or None where absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and _varlen_attn() is not None


def flat_varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    flat_cu_seqlens=None,
    flat_max_seqlen=None,
    flat_seq_bounds=None,
    **kwargs,
):
    """Causal flash attention over every example of a flat row in one call (``varlen_attn``).

    Needs ``flat_cu_seqlens`` (int32 offsets of the examples, on the device) and
    ``flat_max_seqlen``, which :class:`FlatTrainer` passes with every flat row. Head sizes
    that are not a multiple of 8 (OpenLLaMA-3B's 100) are zero-padded to one: zero query/key
    columns add nothing to the scores, zero value columns are cut from the output, and the softmax
    scale stays ``module.scaling``. Without the offsets (padded batches, generation), off CUDA or
    in fp32 (the flash kernel takes bf16/fp16 only), this is :func:`flat_sdpa_attention`.
    """
    if flat_cu_seqlens is None or not varlen_available(query.device) or query.dtype not in HALF_DTYPES:
        bounds = flat_seq_bounds if flat_cu_seqlens is None else tuple(flat_cu_seqlens.tolist())
        return flat_sdpa_attention(module, query, key, value, attention_mask, flat_seq_bounds=bounds, **kwargs)
    return _varlen_call(module, query, key, value, flat_cu_seqlens, flat_max_seqlen)


@torch.compiler.disable  # a compiled decoder layer calls the kernel as it is, shapes and all
def _varlen_call(module, query, key, value, cu_seqlens, max_seqlen, causal: bool = True, scale=None):
    import inspect

    varlen_attn = _varlen_attn()
    head_dim = query.shape[-1]
    pad = -head_dim % 8
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [1, H, T, D] -> [T, H, D]
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, pad)) for t in (q, k, v))
    params = inspect.signature(varlen_attn).parameters
    extra: dict[str, Any] = {"scale": module.scaling if scale is None else scale}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "window_size" in params:
        extra["window_size"] = (-1, 0) if causal else (-1, -1)
    else:  # torch 2.10/2.11
        extra["is_causal"] = causal
    out = varlen_attn(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **extra
    )
    if pad:
        out = out[..., :head_dim]
    return out.unsqueeze(0), None  # [1, T, H, D], as transformers' attention functions return it


def use_varlen_attention(model) -> bool:
    """Switch an sdpa model to :func:`flat_varlen_attention`; False if it is not sdpa.

    Padded batches (evaluation, generation) still get sdpa's masks; rows without padding get none
    (flat rows carry ``flat_cu_seqlens``, a single row is causal).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = base_model(model)
    if base.config._attn_implementation not in ("sdpa", FLAT_ATTENTION, VARLEN_ATTENTION):
        return False

    def varlen_mask(*args, **kwargs):
        # Rows without a padding mask need none: flat rows carry their offsets, single rows are causal.
        # (transformers would build a block mask for flat rows, with host syncs a CUDA graph cannot hold.)
        if kwargs.get("attention_mask") is None:
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(VARLEN_ATTENTION, flat_varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    base.set_attn_implementation(VARLEN_ATTENTION)
    return True


ENCODER_ATTENTION = "sdpa_flat_encoder"


@dataclass(frozen=True)
class EncoderRow:
    """A flat row of a bidirectional encoder's examples, and how to lay it out as a padded batch for attention.

    ``gather`` picks, for each of ``examples x longest`` padded slots, its token of the row (or the row's end,
    where a zero stands in for padding); ``scatter`` picks each token of the row back out of the padded slots;
    ``key_mask`` ([examples, 1, 1, longest]) is True at the slots that hold a token. ``cu_seqlens`` and
    ``max_seqlen`` are the offsets the varlen flash kernel takes.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    key_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    examples: int

    @classmethod
    def from_bounds(cls, bounds: tuple[int, ...], device: torch.device) -> EncoderRow:
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        longest, tokens = max(lengths), bounds[-1]
        slots = torch.arange(longest)
        starts, sizes = torch.tensor(bounds[:-1]), torch.tensor(lengths)
        valid = slots[None, :] < sizes[:, None]  # [examples, longest]
        gather = torch.where(valid, starts[:, None] + slots[None, :], torch.tensor(tokens))
        scatter = valid.flatten().nonzero().flatten()  # slot of each token, in row order
        return cls(
            gather=gather.flatten().to(device, non_blocking=True),
            scatter=scatter.to(device, non_blocking=True),
            key_mask=valid[:, None, None, :].to(device, non_blocking=True),
            cu_seqlens=torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True),
            max_seqlen=longest,
            examples=len(lengths),
        )

    def attend(self, query, key, value, dropout: float, scale: Optional[float]) -> torch.Tensor:
        """sdpa over the row's examples as one padded batch (padded keys masked): [1, H, T, D] -> [1, T, H, D]."""

        def padded(t: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [examples, H, longest, D]
            rows = torch.cat([t[0].transpose(0, 1), t.new_zeros(1, *t.shape[1:2], t.shape[-1])])  # [T + 1, H, D]
            return rows[self.gather].view(self.examples, self.max_seqlen, *rows.shape[1:]).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            padded(query), padded(key), padded(value), attn_mask=self.key_mask, dropout_p=dropout, scale=scale
        )
        out = out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[-1])  # [examples x longest, H, D]
        return out[self.scatter].unsqueeze(0)


def flat_encoder_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, flat_row=None, **kwargs
):
    """Bidirectional attention within each example of a flat row (``flat_row``, an :class:`EncoderRow`).

    Without dropout on CUDA in bf16/fp16: one non-causal varlen flash call (no padding at all). With attention
    dropout (BERT's 0.1 in training; the flash varlen kernel has none), or on the CPU: sdpa over the row's
    examples laid out as a padded batch for the attention alone, so the dropout is the padded path's; the
    linear layers still run on the packed tokens only. Without ``flat_row`` (padded batches): transformers' sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if flat_row is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout == 0.0 and varlen_available(query.device) and query.dtype in HALF_DTYPES:
        return _varlen_call(module, query, key, value, flat_row.cu_seqlens, flat_row.max_seqlen, False, scaling)
    return flat_row.attend(query, key, value, dropout, scaling), None


def use_encoder_attention(model) -> bool:
    """Switch an sdpa encoder to :func:`flat_encoder_attention` (padded batches keep sdpa's masks); False if it is
    not sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = base_model(model)
    if base.config._attn_implementation not in ("sdpa", ENCODER_ATTENTION):
        return False
    AttentionInterface.register(ENCODER_ATTENTION, flat_encoder_attention)
    AttentionMaskInterface.register(ENCODER_ATTENTION, sdpa_mask)
    base.set_attn_implementation(ENCODER_ATTENTION)
    return True
