"""Converters and LoRA target resolution on real architectures built from their configs."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional

import pytest
import torch
from transformers import set_seed

from src import modeling
from src.config import LoraConfig, QuantConfig, validate
from tests.conftest import OPENLLAMA_3B, compose_config, tiny_model_config

LORA = LoraConfig(preset="attn_qv", r=8, alpha=16, dropout=0.0, bias="none", target_modules=None, modules_to_save=None)
QUANT_16 = QuantConfig(bits=16, quant_type="nf4", double_quant=False, compute_dtype="float32")


def _meta(model_cls, config):
    with torch.device("meta"):
        return model_cls(config)


def openllama3b():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _meta(LlamaForCausalLM, LlamaConfig(**OPENLLAMA_3B))


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        (LORA, 2_662_400),
        (replace(LORA, r=16), 5_324_800),
        (replace(LORA, target_modules=["all_linear", "lm_head"]), 12_994_560),
        # DoRA: one magnitude per output feature of each adapted layer, 26 layers of q and v (3,200 outputs each)
        (replace(LORA, use_dora=True), 2_662_400 + 26 * 2 * 3_200),
        (replace(LORA, use_rslora=True, init="gaussian"), 2_662_400),
    ],
    ids=["qv-r8", "qv-r16", "all_linear+lm_head-r8", "qv-r8-dora", "qv-r8-rslora-gaussian"],
)
def test_seed_table_trainable_counts_are_exact(lora, expected):
    model = modeling.apply_lora(openllama3b(), lora, "sft")
    trainable, total = modeling.count_params(model)
    assert trainable == expected
    assert total == 3_426_473_600 + expected


@pytest.mark.parametrize(("use_rslora", "scale"), [(False, 16 / 64), (True, 16 / 8)], ids=["lora", "rslora"])
def test_rslora_scales_by_alpha_over_the_root_of_the_rank(use_rslora, scale):
    model = modeling.apply_lora(openllama3b(), replace(LORA, r=64, use_rslora=use_rslora), "sft")
    scalings = {layer.scaling["default"] for layer in model.modules() if hasattr(layer, "lora_A")}
    assert scalings == {scale}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_base_changing_init_saves_a_plain_lora_that_the_original_base_reproduces(tiny_model_dir, tmp_path, init):
    """PiSSA and OLoRA train on a base they changed: the saved adapter, converted by peft against the adapter as it
    started, gives the trained model's outputs on the original base, which is what inference loads."""
    from peft import PeftModel

    cfg, ids = tiny_model_config(tiny_model_dir), torch.tensor([[1, 5, 9, 14, 3]])
    lora = replace(LORA, init=init)
    model = modeling.apply_lora(modeling.load_model(cfg, QUANT_16, "sft", None, pad_token_id=2), lora, "sft")
    modeling.save_initial_adapter(model, lora, tmp_path)
    with torch.no_grad():  # a training step's worth of change to every adapter weight
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
        trained = model(ids).logits
    modeling.save_adapter(model, lora, tmp_path / "adapter")
    base = modeling.load_model(cfg, QUANT_16, "sft", None, pad_token_id=2, training=False)
    with torch.no_grad():
        original = base(ids).logits
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
    assert not torch.allclose(trained, original, atol=1e-3)  # the adapter changed the outputs
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 2 * LORA.r


def test_bnb_config_matches_the_quant_preset():
    q4 = modeling.to_bnb_config(QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16"))
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16
    q8 = modeling.to_bnb_config(QuantConfig(bits=8, quant_type="nf4", double_quant=False, compute_dtype="bfloat16"))
    assert q8.load_in_8bit and not q8.load_in_4bit
    assert (
        modeling.to_bnb_config(QuantConfig(bits=16, quant_type="nf4", double_quant=False, compute_dtype="bfloat16"))
        is None
    )


def _targets(model, preset: str) -> list[str]:
    pattern = modeling.resolve_target_modules(model, replace(LORA, preset=preset))
    return sorted(n for n, _ in model.named_modules() if re.fullmatch(pattern, n))


def test_presets_on_llama_find_the_named_projections():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=100,
            num_labels=3,
        )
    )
    leaves = {p: sorted({n.split(".")[-1] for n in _targets(model, p)}) for p in modeling.LORA_PRESETS}
    assert leaves["attn_qv"] == ["q_proj", "v_proj"]
    assert leaves["attn"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert leaves["mlp"] == ["down_proj", "gate_proj", "up_proj"]
    assert leaves["all_linear"] == sorted(leaves["attn"] + leaves["mlp"])
    assert len(_targets(model, "all_linear")) == 2 * 7
    assert "score" not in leaves["all_linear"]  # the output head is excluded, as in peft's all-linear


def test_presets_on_phi3_use_the_fused_projections():
    from transformers import Phi3Config, Phi3ForCausalLM

    model = _meta(
        Phi3ForCausalLM,
        Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=32064),
    )
    leaves = {p: sorted({n.split(".")[-1] for n in _targets(model, p)}) for p in modeling.LORA_PRESETS}
    assert leaves["attn_qv"] == ["qkv_proj"]
    assert leaves["attn"] == ["o_proj", "qkv_proj"]
    assert leaves["mlp"] == ["down_proj", "gate_up_proj"]
    assert leaves["all_linear"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_presets_on_bert_tell_attention_output_from_mlp_output():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    )
    assert _targets(model, "attn_qv") == [
        f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")
    ]
    mlp = _targets(model, "mlp")
    assert mlp == [f"bert.encoder.layer.{i}.{n}" for i in (0, 1) for n in ("intermediate.dense", "output.dense")]
    attn = _targets(model, "attn")
    assert "bert.encoder.layer.0.attention.output.dense" in attn
    assert not set(attn) & set(mlp)
    all_linear = _targets(model, "all_linear")
    assert len(all_linear) == 12 and "bert.pooler.dense" not in all_linear and "classifier" not in all_linear


def test_explicit_targets_may_mix_presets_and_names_and_must_exist():
    model = openllama3b()
    pattern = modeling.resolve_target_modules(model, replace(LORA, target_modules=["attn_qv", "lm_head"]))
    matched = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    assert "lm_head" in matched and len(matched) == 26 * 2 + 1
    assert modeling.resolve_target_modules(model, replace(LORA, target_modules=["q_proj"])) == ["q_proj"]
    with pytest.raises(ValueError, match=r"'qproj' matches no linear layer"):
        modeling.resolve_target_modules(model, replace(LORA, target_modules=["qproj"]))


def test_four_bit_weights_count_their_real_size(tiny_model_dir):
    model_cfg = tiny_model_config(tiny_model_dir)
    counts = {}
    for bits in (16, 4, 8):
        quant = QuantConfig(bits=bits, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
        model = modeling.load_model(model_cfg, quant, "classification", ["a", "b"], pad_token_id=2)
        counts[bits] = modeling.count_params(modeling.apply_lora(model, LORA, "classification"))
    assert counts[4] == counts[16] == counts[8]
    trainable, total = counts[16]
    # q and v adapters in both layers (q: 128->128, v: 128->64) plus the 2-class score head (128 x 2).
    assert trainable == 2 * (8 * (128 + 128) + 8 * (128 + 64)) + 128 * 2


@pytest.mark.parametrize("task", ["classification", "sft"])
def test_four_bit_training_keeps_its_gradients_after_an_evaluation(tiny_model_dir, monkeypatch, task):
    """bitsandbytes repacks 4-bit weights for a CPU kernel without backward at the first no-grad eval forward, on
    CPUs with AVX512-BF16: forced here, so every CPU checks it. The adapters' gradients must not change."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    quant = QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="float32")
    labels = ["a", "b"] if task == "classification" else None
    model = modeling.load_model(tiny_model_config(tiny_model_dir), quant, task, labels, pad_token_id=2)
    model = modeling.apply_lora(model, LORA, task)
    batch = {"input_ids": torch.tensor([[1, 40, 41, 42, 43, 44]]), "labels": torch.tensor([1])}
    if task == "sft":
        batch["labels"] = batch["input_ids"]

    def adapter_grads() -> dict[str, Optional[torch.Tensor]]:
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        # lora_B's: lora_A's are 0 while B is 0
        return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n}

    before = adapter_grads()
    model.eval()
    with torch.no_grad():
        model(**batch)
    after = adapter_grads()
    assert set(after) == set(before) and len(before) == 4
    for name, grad in before.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert after[name] is not None, f"{name}: no gradient after an evaluation"
        torch.testing.assert_close(after[name], grad, msg=f"{name}: its gradient changed after an evaluation")


def test_building_the_tiny_model_says_so_once_before_it_starts(tmp_path, monkeypatch, capsys):
    """The first use builds the model (about a minute on a slow CPU): one line says so before the wait."""
    from src import tiny

    out_dir = tmp_path / "tiny-llama"
    monkeypatch.setitem(tiny.BUILTINS, "tiny-llama", out_dir)
    said_before_build: list[str] = []

    def build(into):
        said_before_build.append(capsys.readouterr().err)
        (into / "RECIPE_VERSION").write_text(str(tiny.RECIPE_VERSION))
        return into

    monkeypatch.setattr(tiny, "build", build)
    assert tiny.resolve_builtin("builtin:tiny-llama") == str(out_dir)
    assert len(said_before_build) == 1
    assert said_before_build[0].count("\n") == 1
    assert said_before_build[0].startswith(f"building the embedded tiny model once, into {out_dir}")
    assert tiny.resolve_builtin("builtin:tiny-llama") == str(out_dir)  # built: quiet, and not built again
    assert capsys.readouterr().err == "" and len(said_before_build) == 1


UNCACHED = "nobody-here/not-a-cached-model"


@pytest.mark.parametrize("offline_env", [False, True], ids=["no-network", "HF_HUB_OFFLINE"])
def test_an_uncached_hub_model_without_the_hub_fails_in_seconds_in_one_line(monkeypatch, offline_env):
    """No retries for a minute and no traceback: the tokenizer and the model loads stop at once, naming the model
    and the way out (the hub client retried a dead connection for 83 s)."""
    import time

    from huggingface_hub import constants

    from src.hub import ModelUnavailable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_env)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    cfg = replace(tiny_model_config(Path("unused")), name_or_path=UNCACHED)
    loads = [
        lambda: modeling.load_tokenizer(cfg),
        lambda: modeling.load_model(cfg, QuantConfig(16, "nf4", False, "float32"), "classification", ["a", "b"], 0),
    ]
    for load in loads:
        start = time.monotonic()
        with pytest.raises(ModelUnavailable) as raised:
            load()
        assert time.monotonic() - start < 10
        message = str(raised.value)
        assert "\n" not in message and f"model.name_or_path={UNCACHED}" in message
        assert "model.name_or_path=/path/to/dir" in message
        assert ("HF_HUB_OFFLINE is set" if offline_env else "http://127.0.0.1:9) cannot be reached") in message


def test_a_hub_that_answers_lets_the_download_go_on(monkeypatch):
    """Any HTTP answer means the hub is there: the model's own load then downloads it (no false 'offline')."""
    import http.server
    import threading

    from huggingface_hub import constants

    from src.hub import model_source_problem

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert model_source_problem(UNCACHED, None, may_download=True) is None
        assert "not in the local hub cache" in model_source_problem(UNCACHED, None, may_download=False)
        assert model_source_problem("builtin:tiny-llama", None, may_download=False) is None
    finally:
        server.shutdown()


TEXTS = [
    "the football match went to extra time",
    "garlic",
    "a new phone with a faster chip and a bigger battery was announced today",
    "bake the bread",
]


@pytest.fixture(scope="module")
def classifier():
    cfg = validate(compose_config([]))
    tokenizer = modeling.load_tokenizer(cfg.model)
    set_seed(0)
    model = modeling.load_model(cfg.model, cfg.quant, "classification", ["a", "b", "c"], tokenizer.pad_token_id)
    return tokenizer, modeling.apply_lora(model, cfg.lora, "classification").eval()


def test_decoder_classifier_takes_a_padded_batch_of_four_without_a_pad_token(tiny_model_dir, classifier):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_model_dir).pad_token is None  # Llama-style: no pad token
    assert json.loads((tiny_model_dir / "config.json").read_text())["pad_token_id"] is None
    tokenizer, model = classifier
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_an_example_alone_and_inside_a_padded_batch_gets_the_same_logits(classifier, side):
    tokenizer, model = classifier
    previous, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        with torch.no_grad():
            batch = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
            alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in TEXTS])
    finally:
        tokenizer.padding_side = previous
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)
