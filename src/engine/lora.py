"""The fused LoRA layer (``train.fused_lora``): a LoRA linear's add-on folded into one matmul's epilogue.

peft computes a LoRA linear as ``result + lora_B(lora_A(dropout(x))) * scaling``: after the base matmul and the two
rank-wide ones, two more passes over the ``tokens x out`` output (the scale, then the add), and in the backward the
scale's pass again. Here the scale goes on the rank-wide ``h = A(dropout(x))`` (``tokens x r``: a few hundred
times smaller for r=8) and the add into the second matmul, ``torch.addmm(result, h * scaling, B^T)``, whose
``beta = 1`` accumulates onto the base output in the GEMM itself; its gradient with respect to ``result`` is the
incoming gradient, no kernel. Per LoRA linear that is two fewer full-width kernels forward and one fewer backward, as
Unsloth's ``matmul_lora`` does it; the autograd graph stays PyTorch's own, so activation checkpointing, CUDA graphs,
``torch.compile`` and DDP see ordinary ops.

The layers it takes are plain LoRA linears (peft's ``Linear`` and its bitsandbytes 4/8-bit twins, rsLoRA included)
with one active adapter: no DoRA or other variant, no LoRA bias, not merged, no per-example adapter names. Any other
call runs peft's own forward. In exact arithmetic it is the same function; in fp32 the outputs and gradients match
peft's within 1e-5, dropout included (the same mask, drawn by the same call):
``tests/unit/engine/test_fused_lora.py``. The trial pack's grouped LoRA matmul folds its add the same way
(:func:`src.packs.engine.bank_lora_forward`: ``torch.baddbmm``).
"""

from __future__ import annotations

import types
from typing import Any

import torch


def _fusable(layer, x: torch.Tensor, kwargs: dict[str, Any]):
    """The active adapter's name where the fused forward applies to this call, else None."""
    if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    adapter = active[0]
    if adapter in getattr(layer, "lora_variant", {}) or layer.lora_B[adapter].bias is not None:
        return None
    return adapter


def fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA linear's forward, its add-on as ``addmm(result, scale * A(dropout(x)), B^T)``."""
    adapter = _fusable(self, x, kwargs)
    if adapter is None:
        return self._unfused_forward(x, *args, **kwargs)
    kwargs.pop("adapter_names", None)
    result = self.base_layer(x, *args, **kwargs)
    a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    inputs = self.lora_dropout[adapter](x.to(a.dtype))
    hidden = inputs.reshape(-1, inputs.shape[-1]) @ a.T * self.scaling[adapter]
    flat = result.reshape(-1, result.shape[-1])
    device = flat.device.type
    if torch.is_autocast_enabled(device) and flat.dtype != torch.get_autocast_dtype(device):
        # addmm would round an fp32 base output to the autocast dtype; peft's add keeps it fp32
        return (flat + hidden @ b.T).view(result.shape).to(result.dtype)
    if not torch.is_autocast_enabled(device):  # addmm needs one dtype; under autocast it casts itself
        flat = flat.to(hidden.dtype)
    return torch.addmm(flat, hidden, b.T).view(result.shape).to(result.dtype)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every plain LoRA linear of ``model`` the fused forward (:func:`fused_lora_forward`); the count."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        # bitsandbytes' Linear4bit and Linear8bitLt are torch Linears too; conv and embedding layers are not
        if not isinstance(module, LoraLayer) or not isinstance(module.get_base_layer(), torch.nn.Linear):
            continue
        if "_unfused_forward" in module.__dict__:
            continue
        module._unfused_forward = module.forward
        module.forward = types.MethodType(fused_lora_forward, module)
        count += 1
    return count
