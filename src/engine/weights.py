"""The base weights on the fast path: bf16 under a 4/8-bit base, and cached dequantized 4/8-bit weights."""

from __future__ import annotations

import copy
import types
from typing import Optional

import torch


def cast_frozen_to_bf16(model) -> None:
    """bf16 for the float32 weights ``prepare_model_for_kbit_training`` made (norms, embeddings, head) and
    the adapters, as TRL's SFTTrainer does for the adapters of a quantized model.

    With an fp32 residual stream, every 4-bit matmul casts its input to bf16 and its output back, and
    autocast casts every adapter weight on every call: thousands of small kernels a step, which
    bound a small step by the CPU rather than the GPU.
    """
    for param in model.parameters():
        if param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)


def quantized_layers(model, bits: Optional[int] = None) -> list[torch.nn.Module]:
    """bitsandbytes' 4-bit and 8-bit linear layers of ``model`` (``bits``: only those)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    kinds = {4: (bnb.nn.Linear4bit,), 8: (bnb.nn.Linear8bitLt,), None: (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)}
    return [m for m in model.modules() if isinstance(m, kinds[bits])]


def _cache_dtype(module, int8_dtype: torch.dtype) -> torch.dtype:
    return getattr(module, "compute_dtype", None) or (int8_dtype if _is_int8(module) else torch.bfloat16)


def _is_int8(module) -> bool:
    return hasattr(module.weight, "SCB")


def dequantized_weights_gb(model, int8_dtype: torch.dtype = torch.bfloat16) -> float:
    """GiB that :func:`cache_dequantized_weights` would hold for every quantized layer of ``model``."""
    total = 0
    for module in quantized_layers(model):
        total += module.in_features * module.out_features * torch.finfo(_cache_dtype(module, int8_dtype)).bits // 8
    return total / 2**30


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The layer's matmul on its cached dequantized weight (:func:`cache_dequantized_weights`)."""
    weight = self.dequantized_weight
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def _dequantize(module, dtype: torch.dtype) -> Optional[torch.Tensor]:
    import bitsandbytes.functional as bnbf

    if _is_int8(module):
        # The int8 rows and their scales: on the weight until the layer's first forward moves them to its state.
        rows = module.weight.CB if module.weight.CB is not None else module.state.CB
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        if rows is None or scales is None:  # not quantized (yet): nothing to cache
            return None
        return bnbf.int8_vectorwise_dequant(rows, scales).to(dtype)
    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first no-grad forward into a
        # layout that dequantize_4bit does not read: unpack a copy (the layer keeps its own).
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    weight = bnbf.dequantize_4bit(data, state).to(dtype)
    return weight.view(module.out_features, module.in_features)


def cache_dequantized_weights(
    model, budget_gb: Optional[float] = None, int8_dtype: torch.dtype = torch.bfloat16
) -> tuple[int, float]:
    """Keep a dequantized copy of 4-bit and 8-bit base weights, layer by layer while ``budget_gb`` allows.

    Returns the number of layers cached and the GiB they hold.

    bitsandbytes dequantizes every 4-bit weight to the compute dtype in every forward and every
    backward (and in every recompute of a checkpointed layer): for W3B, 3.2e9 weights, ~1,100
    kernel launches and ~8 ms of memory traffic a step. With memory to spare the dequantized
    weight is kept instead (a non-persistent buffer, so checkpoints and adapters are unchanged)
    and the layer runs ``F.linear`` on it: the values are bitsandbytes' own
    (``dequantize_4bit``), so the forward and the input gradients are those of the 4-bit base.

    8-bit (LLM.int8) layers get the weight bitsandbytes' own backward multiplies by
    (``int8_vectorwise_dequant``: the int8 rows times their scales), in ``int8_dtype``. Their
    forward differs from bitsandbytes' CUDA forward in one way: LLM.int8 also quantizes the
    activations row-wise to int8 (keeping outlier columns above its threshold in fp16) and finds
    those columns on the host, a GPU sync in every layer that rules out CUDA graphs. The cached
    forward multiplies the unquantized activations, as bitsandbytes' CPU path does; so the weights
    are the 8-bit base's, the activations are not rounded to 8 bits. ``tests/gpu/test_gpu.py`` measures
    the difference. The quantized weights stay (saving and merging still see them).
    """
    cached, used = 0, 0.0
    for module in quantized_layers(model):
        dtype = _cache_dtype(module, int8_dtype)
        size = module.in_features * module.out_features * torch.finfo(dtype).bits / 8 / 2**30
        if budget_gb is not None and used + size > budget_gb:
            break
        weight = _dequantize(module, dtype)
        if weight is None:
            continue
        module.register_buffer("dequantized_weight", weight, persistent=False)
        module.forward = types.MethodType(_dequantized_forward, module)
        cached, used = cached + 1, used + size
    return cached, used


def prepare_frozen_weights(
    model, bits: int, *, bf16: bool, dequantize: bool, room_gb: Optional[float], int8_dtype: torch.dtype
) -> tuple[int, float]:
    """A fast path's frozen base, set up once before training (SFT, the flat-batch classifier and a pack share it).

    Under a 4/8-bit base: with ``bf16``, its fp32 weights and the adapters cast to bf16 (:func:`cast_frozen_to_bf16`);
    with ``dequantize``, dequantized copies of as many quantized layers as ``room_gb`` holds (None: all of them;
    :func:`cache_dequantized_weights`, int8 layers at ``int8_dtype``). Returns (layers cached, their GiB); a 16-bit
    base is left as it is.
    """
    if bits not in (4, 8):
        return 0, 0.0
    if bf16:
        cast_frozen_to_bf16(model)
    if not dequantize:
        return 0, 0.0
    return cache_dequantized_weights(model, room_gb, int8_dtype)
