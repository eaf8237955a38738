"""``quant=fp8`` (src/fp8.py): FP8 weights with a scale per row, both matmuls of a frozen layer in FP8, on a CPU.

The forward and the input's gradient are checked against the same math written out in fp32 (exact but for the bf16
output), and against the unquantized layer within FP8's resolution; the config, the loaded model, the plan and the
refusal on a GPU without FP8 are checked as a user meets them.
"""

from __future__ import annotations

import pytest
import torch

from src import fp8
from tests.conftest import compose_config


def _linear(bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 96, bias=bias)


def test_the_forward_is_the_rounded_rows_times_the_rounded_weight():
    """y = (xq sx)(Wq s)^T + b: what the FP8 GEMM computes, to its bf16 output."""
    linear = _linear()
    layer = fp8.Fp8Linear(linear)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    xq, sx = fp8.quantize_rows(x.reshape(-1, 64))
    expected = (xq.float() * sx) @ layer.dequantized().T + linear.bias
    got = layer(x)
    assert got.shape == (3, 5, 96) and got.dtype == x.dtype
    scale = float(expected.abs().max())  # the bf16 output and its bias add round at this scale
    torch.testing.assert_close(got.reshape(-1, 96), expected, atol=scale / 128, rtol=0)
    error = (got - linear(x)).norm() / linear(x).norm()
    assert 0 < error < 0.06  # FP8 (e4m3: 3 mantissa bits) against the unquantized layer


def test_the_input_gradient_folds_the_row_scales_into_the_gradient():
    """dx = dy W = (dy diag(s)) Wq, the scaled gradient rounded by rows; the weight and bias get none."""
    layer = fp8.Fp8Linear(_linear())
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grad = torch.randn(7, 96, generator=torch.Generator().manual_seed(3))
    (got,) = torch.autograd.grad(layer(x), x, grad)
    gq, sg = fp8.quantize_rows(grad * layer.weight_scale)
    expected = (gq.float() * sg) @ layer.weight.float()
    torch.testing.assert_close(got, expected, atol=float(expected.abs().max()) / 128, rtol=0)
    exact = grad @ _linear().weight
    assert (got - exact).norm() / exact.norm() < 0.06
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


def test_rounding_to_fp8_keeps_each_row_in_range_and_zero_rows_whole():
    x = torch.tensor([[1000.0, -3.0, 0.5], [0.0, 0.0, 0.0], [1e-4, 2e-4, -3e-4]])
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == fp8.FP8 and torch.isfinite(q.float()).all()
    assert q.float().abs().amax(dim=1).tolist() == [448.0, 0.0, 448.0]  # each row's largest maps to e4m3's largest
    torch.testing.assert_close(q.float() * scale, x, rtol=0.07, atol=0)


def test_the_tiny_llama_loads_as_fp8_and_its_lora_trains(tiny_model_dir):
    """quant=fp8 through src.modeling: every linear of the decoder in FP8 (the head stays), peft's LoRA on top
    in fp32, the loss within FP8's resolution of the unquantized base's, and gradients only for the adapters."""
    from src import modeling
    from src.config import validate

    cfg = validate(compose_config(["data=instructions", "quant=fp8"]))
    assert cfg.quant.fp8 and cfg.quant.bits == 8 and modeling.to_bnb_config(cfg.quant) is None
    model = modeling.load_model(cfg.model, cfg.quant, "sft", None, pad_token_id=2)
    layers = fp8.fp8_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down of both layers
    assert type(model.lm_head) is torch.nn.Linear
    plain = modeling.load_model(cfg.model, validate(compose_config(["data=instructions"])).quant, "sft", None, 2)
    model = modeling.apply_lora(model, cfg.lora, "sft")
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    reference = plain(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - reference.item()) / reference.item() < 0.01
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert all(p.grad.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at zero


def test_a_gpu_without_fp8_tensor_cores_is_refused_before_anything_loads(monkeypatch):
    """An A100 (8.0) says which cards can; an Ada card whose torch lacks the row-wise kernel says what torch said; a
    torch without float8 says so; FP8 at other than 8 bits is named. (The card is faked: this machine has none.)"""
    from src import modeling
    from src.config import ConfigError, validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError) as refused:
        validate(compose_config(["quant=fp8"]))
    assert "quant=fp8: NVIDIA A100-SXM4-80GB (compute capability 8.0) has no FP8 tensor cores" in str(refused.value)
    monkeypatch.setattr(fp8, "_rowwise_failure", lambda: "RuntimeError: row-wise scaling needs sm90")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    cfg = validate(compose_config(["quant=fp8"]))  # the config check never touches the GPU (a sweep runs it too)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    with pytest.raises(ConfigError, match=r"cannot multiply FP8 with row-wise scales on NVIDIA L4: RuntimeError"):
        modeling.load_model(cfg.model, cfg.quant, "classification", ["a", "b"], pad_token_id=2)  # before loading
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert validate(compose_config(["quant=fp8"])).quant.fp8  # an H100
    with pytest.raises(ConfigError, match=r"quant.fp8=true with quant.bits=4: FP8 weights are 8 bits"):
        validate(compose_config(["quant=4bit", "quant.fp8=true"]))
    monkeypatch.setattr(fp8, "FP8", None)
    assert "has no float8 matmul" in fp8.fp8_unavailable()


def test_an_adapter_on_an_fp8_layer_starts_as_it_would_on_the_16_bit_layer():
    """peft makes a new adapter in its base layer's dtype: an FP8 layer's compute dtype (the weight's before), so A's
    start is the one the 16-bit layer gets from the same seed, not its e4m3 rounding."""
    from peft import LoraConfig, get_peft_model

    starts = []
    for convert in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
        if convert:
            assert fp8.convert_to_fp8(model, skip=["none"]) == 1
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["0"]))
        starts.append(peft_model.base_model.model[0].lora_A["default"].weight.detach())
    assert starts[1].dtype == torch.float32 and torch.equal(starts[0], starts[1])
    assert starts[1].unique().numel() > 1000  # e4m3 would leave a few dozen values


def test_an_fp8_layer_s_bias_trains_where_lora_bias_asks_it_to():
    """The bias is added outside the FP8 matmul: lora.bias=all gives it a gradient, the input's is unchanged."""
    layer = fp8.Fp8Linear(_linear())
    layer.bias.requires_grad_(True)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    grad = torch.randn(6, 96, generator=torch.Generator().manual_seed(5))
    dx, dbias = torch.autograd.grad(layer(x), [x, layer.bias], grad)
    torch.testing.assert_close(dbias, grad.sum(0))
    assert dx.shape == x.shape and dx.abs().max() > 0


def test_conversion_goes_a_layer_at_a_time_and_moves_the_model_where_asked(tiny_model_dir):
    """convert_to_fp8(device=...): each layer is moved and rounded in turn, then the rest follows (here to the CPU,
    the only device there is: the path a GPU load takes, with no 16-bit model on the GPU first)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert fp8.convert_to_fp8(model, device="cpu") == 14
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, fp8.Fp8Linear) and layer.compute_dtype == torch.bfloat16
    assert layer.weight.dtype == fp8.FP8 and layer.weight.is_contiguous()


def test_dora_and_olora_on_an_fp8_base_are_refused_with_what_to_use():
    from src.config import ConfigError, validate

    with pytest.raises(ConfigError) as refused:
        validate(compose_config(["quant=fp8", "lora.use_dora=true"]))
    assert "lora.use_dora=true with quant=fp8: DoRA takes the base weight's norm" in str(refused.value)
    with pytest.raises(ConfigError, match=r"lora.init=olora with quant=fp8: OLoRA decomposes the base weight"):
        validate(compose_config(["quant=fp8", "lora.init=olora"]))
