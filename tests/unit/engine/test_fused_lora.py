"""``train.fused_lora`` (src/engine/lora.py): each LoRA linear as ``addmm(base output, scale * A(dropout(x)), B^T)``
computes what peft's own forward computes, outputs and gradients within 1e-5 in fp32."""

from __future__ import annotations

import pytest
import torch

from src.engine.lora import fuse_lora_layers
from tests.unit.engine.test_flat import _collate, _examples, _tiny_lora_model, _train_sft

ATOL = 1e-5


def _lora_linear(dropout: float, rslora: bool = False, bias: bool = False, dora: bool = False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"], use_rslora=rslora, use_dora=dora)
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at init: make the add-on count
            param.data = torch.randn(param.shape) * 0.1
    return model


def _output_and_grads(model, x: torch.Tensor, seed: int):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return out.detach(), grads


@pytest.mark.parametrize("dropout,rslora", [(0.0, False), (0.1, False), (0.0, True)])
def test_a_fused_lora_linear_gives_peft_s_output_and_gradients(dropout, rslora):
    """Input, A and B gradients too; with dropout, the same mask (drawn by the same call, before A)."""
    model = _lora_linear(dropout, rslora)
    model.train()
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    own, own_grads = _output_and_grads(model, x, seed=3)
    assert fuse_lora_layers(model) == 1
    got, got_grads = _output_and_grads(model, x, seed=3)
    torch.testing.assert_close(got, own, atol=ATOL, rtol=0)
    for g, e in zip(got_grads, own_grads):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    if dropout:  # the mask mattered: another draw gives another output
        other, _ = _output_and_grads(model, x, seed=4)
        assert (other - got).abs().max() > 1e-3


def test_calls_the_fused_forward_does_not_take_run_peft_s_own():
    """A disabled adapter, a merged one, DoRA and a LoRA bias: peft's forward, with its result."""
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(2))
    for kind in ("dora", "bias"):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules=["0"], use_dora=kind == "dora", lora_bias=kind == "bias")
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 40)), config)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape) * 0.1
        own = model(x)
        fuse_lora_layers(model)
        torch.testing.assert_close(model(x), own, atol=ATOL, rtol=0)
    model = _lora_linear(0.0)
    fuse_lora_layers(model)
    layer = model.base_model.model[0]
    with model.disable_adapter():
        torch.testing.assert_close(model(x), layer.base_layer(x), atol=0, rtol=0)
    adapted = model(x)
    assert (adapted - layer.base_layer(x)).abs().max() > 1e-3
    layer.merge()
    torch.testing.assert_close(model(x), adapted, atol=ATOL, rtol=0)


def test_the_tiny_llama_s_loss_and_lora_gradients_are_peft_s(tiny_model_dir):
    """Every targeted linear of the tiny Llama (attention and the head) fused, on a packed row of three examples."""
    model = _tiny_lora_model(tiny_model_dir, "sdpa", targets=("q_proj", "v_proj", "down_proj", "lm_head"))
    model.train()
    batch = _collate(_examples([9, 14, 6]), padding_free=True)
    params = [p for p in model.parameters() if p.requires_grad]
    own = model(**batch, use_cache=False).loss
    own_grads = torch.autograd.grad(own, params)
    assert fuse_lora_layers(model) == 2 * 3 + 1  # q, v, down in each of 2 layers, and the head
    assert fuse_lora_layers(model) == 0  # once only
    got = model(**batch, use_cache=False).loss
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, own, atol=ATOL, rtol=0)
    for g, e in zip(got_grads, own_grads):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    assert all(e.abs().max() > 0 for e in own_grads)


def test_under_bf16_autocast_the_fused_layer_is_peft_s_within_bf16_rounding():
    """fp32 adapters on a bf16 base under autocast (a 16-bit base's mixed precision): the add-on's matmuls run in
    bf16 either way; the output and gradients agree to bf16 rounding."""
    model = _lora_linear(0.0)
    model.base_model.model[0].base_layer.to(torch.bfloat16)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(5), dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own, own_grads = _output_and_grads(model, x, seed=0)
        fuse_lora_layers(model)
        got, got_grads = _output_and_grads(model, x, seed=0)
    assert got.dtype == own.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), own.float(), atol=0.02 * float(own.abs().max()), rtol=0)
    for g, e in zip(got_grads, own_grads):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), atol=0.02 * float(e.abs().max()), rtol=0)


@pytest.mark.slow  # about 15 s: two short training runs
def test_a_fast_run_with_fused_lora_learns_what_it_learns_without(tmp_path, mlflow_store):
    """Four optimizer steps of the tiny model through src.fit's fast path: the same loss curve and adapters."""
    overrides = ["lora.target_modules=[attn_qv,lm_head]"]
    own, _, own_losses = _train_sft(tmp_path, overrides, "own")
    got, _, got_losses = _train_sft(tmp_path, [*overrides, "train.fused_lora=true"], "fused")

    def fused(model):
        return sum("_unfused_forward" in m.__dict__ for m in model.modules())

    assert fused(got.model) == 2 * 2 + 1 and fused(own.model) == 0  # q and v of 2 layers, and the head
    assert len(got_losses) == 4 and got_losses == pytest.approx(own_losses, rel=1e-5)
    own_weights = dict(own.model.named_parameters())
    for name, param in got.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, own_weights[name], atol=ATOL, rtol=0)
    assert own_losses[-1] != pytest.approx(own_losses[0], rel=1e-3)


def test_under_autocast_an_fp32_base_output_stays_fp32():
    """A base whose output autocast leaves in fp32 (an FP8 layer on an fp32 input): addmm would round it to bf16;
    the fused forward adds as peft does instead, so the two agree far below bf16's resolution of the output."""
    from peft import LoraConfig, get_peft_model

    from src.fp8 import convert_to_fp8

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96))
    convert_to_fp8(model, skip=["none"])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape) * 0.01
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = model(x)
        fuse_lora_layers(model)
        got = model(x)
    assert own.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got, own, atol=float(own.abs().max()) / 2000, rtol=0)
