"""FP8 base weights (``quant=fp8``): an 8-bit base whose matmuls run on FP8 tensor cores (Ada and Hopper GPUs).

The seeds' 8-bit base is bitsandbytes' LLM.int8: it rounds the activations to int8 too and finds their outlier
columns on the host in every layer, which makes it the slowest base to train on. ``quant=fp8`` stores each frozen
linear layer's weight as ``float8_e4m3fn`` with one fp32 scale per output row (``W ~ diag(s) Wq``, ``s = max|row| /
448``): one byte a weight, as LLM.int8. Training then runs both of a frozen layer's matmuls in FP8:

- forward, ``y = x W^T``: ``x`` is rounded to FP8 a row (token) at a time with its own scale, and
  ``torch._scaled_mm(xq, Wq^T, scale_a=sx, scale_b=s)`` gives ``y`` in bf16 (on a CPU, fp32 for an fp32 input);
- backward, ``dx = dy W``: the weight's row scales fold into the gradient (``dy diag(s) Wq``), which is rounded to
  FP8 by rows the same way, and the same ``Wq`` (transposed into the layout the FP8 GEMM reads, one layer at a time)
  gives ``dx``. The weight gets no gradient (it is frozen) and no activation is kept for it.

The LoRA adapters, norms, attention, embeddings and the output head stay in bf16 (the head is not converted, as
bitsandbytes leaves it). Rounding ``x`` and ``dy`` to e4m3 (3 mantissa bits) is what FP8 training recipes do
(torchao's row-wise float8, Transformer Engine); the loss differs from a bf16 base's by about FP8's resolution
(``tests/unit/test_fp8.py`` bounds it on a tiny model).

On a CUDA card before compute capability 8.9 there are no FP8 tensor cores: :func:`fp8_unavailable` says so and the
config check refuses ``quant=fp8`` before any model loads. On a CPU the same code runs through PyTorch's CPU FP8
matmul (slowly: a test and smoke path).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
MIN_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0
OUT_DTYPE = torch.bfloat16  # row-wise scaled FP8 matmuls give bf16 on CUDA (on a CPU, fp32 where the input is)
ALIGNMENT = 16  # the FP8 GEMM's dimensions are multiples of 16


def fp8_unavailable(probe: bool = False) -> Optional[str]:
    """Why ``quant=fp8`` cannot train here, or None: a torch without FP8 matmuls, a GPU without FP8 tensor cores
    (compute capability below 8.9), or (``probe``: where the process is about to load the model on the GPU anyway,
    not in the config check, which a sweep's own process runs too) a torch build without the row-wise scaled FP8
    matmul on this card, tried once on a 16 x 16 product (torch's row-wise kernel came first for Hopper)."""
    if FP8 is None or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8 matmul (torch._scaled_mm)"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        if (major, minor) < MIN_CAPABILITY:
            return (
                f"{name} (compute capability {major}.{minor}) has no FP8 tensor cores; FP8 needs 8.9 (Ada, L4, "
                "L40S) or 9.0 (Hopper, H100, H200) and up. On this card use quant=4bit or quant=8bit"
            )
        failure = _rowwise_failure() if probe else None
        if failure is not None:
            return f"torch {torch.__version__} cannot multiply FP8 with row-wise scales on {name}: {failure}"
    return None


@functools.cache
def _rowwise_failure() -> Optional[str]:
    """The error of one small row-wise scaled FP8 matmul on the current GPU, or None where it runs."""
    try:
        a = torch.ones(16, 16, device="cuda").to(FP8)
        scales = torch.ones(16, 1, device="cuda")
        torch._scaled_mm(a, a.t(), scale_a=scales, scale_b=scales.t().contiguous(), out_dtype=OUT_DTYPE)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001  whatever the build says, the user reads it
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D) as FP8 with one fp32 scale per row: ``(q, s)`` with ``x ~ q * s`` (``s`` is ``[rows, 1]``); an
    all-zero row gets scale 1."""
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale).to(FP8).contiguous(), scale  # row-major: the FP8 GEMM's first operand must be


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The FP8 matmul's output: bf16 on a GPU (row-wise scaling gives no other); on a CPU an fp32 input's fp32, so
    that a CPU run's results do not hang on where bf16 rounding falls (a trial alone and in a pack agree)."""
    return torch.float32 if x.device.type == "cpu" and x.dtype == torch.float32 else OUT_DTYPE


class _Fp8Matmul(torch.autograd.Function):
    """``x @ W^T`` with ``W = diag(scale) Wq`` frozen: both the forward and the input's gradient in FP8."""

    @staticmethod
    def forward(ctx, x, weight, scale):
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        xq, sx = quantize_rows(rows)
        y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=scale, out_dtype=_out_dtype(x))
        ctx.save_for_backward(weight, scale)
        ctx.dtype = x.dtype
        return y.to(x.dtype).view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight, scale = ctx.saved_tensors
        shape = grad.shape
        gq, sg = quantize_rows(grad.reshape(-1, shape[-1]).float() * scale)  # dy diag(s): the rows' scales folded in
        wq = weight.t().contiguous().t()  # [out, in] with out contiguous: the layout the FP8 GEMM reads (K = out)
        ones = torch.ones(1, weight.shape[1], dtype=torch.float32, device=weight.device)
        dx = torch._scaled_mm(gq, wq, scale_a=sg, scale_b=ones, out_dtype=_out_dtype(grad))
        return dx.to(ctx.dtype).view(*shape[:-1], weight.shape[1]), None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen ``nn.Linear`` whose weight is FP8 with row scales (:mod:`src.fp8`). A ``Linear`` still, so peft wraps
    it with LoRA as it wraps any linear layer. ``compute_dtype`` (the weight's dtype before) is what peft makes a new
    adapter in, as for bitsandbytes' layers: without it peft would cast the adapter's start to FP8 (an A of a few
    dozen distinct values). The bias, if any, is added outside the FP8 matmul, so ``lora.bias=all`` trains it."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        q, scale = quantize_rows(linear.weight.detach())
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]: scale_b of the forward
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8Matmul.apply(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the layer multiplies by, in fp32: ``diag(s) Wq``."""
        return self.weight.float() * self.weight_scale.t()


def convert_to_fp8(
    model: torch.nn.Module, skip: Optional[list[str]] = None, device: Optional[torch.device | int] = None
) -> int:
    """Replace ``model``'s linear layers by :class:`Fp8Linear` (in place), except the output head, those named in
    ``skip`` (a classifier's head) and those whose sizes the FP8 GEMM cannot take (not multiples of 16); the
    number converted. One layer at a time: with ``device`` (a model loaded on the CPU), each layer goes to the device
    and is rounded there, its 16-bit weight dropped before the next, and the rest of the model follows at the end, so
    the device never holds more than the FP8 model and one 16-bit layer."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = list(skip) if skip else get_keys_to_not_convert(model)
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear
        and should_convert_module(name, keep)
        and module.in_features % ALIGNMENT == 0
        and module.out_features % ALIGNMENT == 0
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if device is not None:
            linear = linear.to(device)
        setattr(parent, child, Fp8Linear(linear))
        del linear
    if device is not None:
        model.to(device)
    return len(names)


def fp8_layers(model: torch.nn.Module) -> list[Fp8Linear]:
    return [m for m in model.modules() if isinstance(m, Fp8Linear)]
