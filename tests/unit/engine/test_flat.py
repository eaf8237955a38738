"""The fast SFT path (src/engine/) computes what the plain path computes.

Tolerances: float32 on CPU. Packed and padded batches run the same matmuls on differently
shaped tensors, so results agree to rounding: per-token losses and logits within atol 1e-5,
LoRA gradients within atol 1e-5 (relative to gradients of order 1e-2..1). Short training runs
compare the per-step loss curves within rtol 1e-4: a few optimizer steps amplify rounding a
little, and any real difference (a token attending across examples, a lost label, a different
batch) moves the loss by far more.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from src.config import validate
from src.engine import attention as fast_attention
from src.engine import budget as fast_budget
from src.engine import graphs as fast_graphs
from src.engine import trainer as fast_trainer
from src.engine import weights as fast_weights
from tests.conftest import compose_config, tiny_model_config

ATOL = 1e-5


def _tiny_lora_model(tiny_model_dir, attn: str, targets=("q_proj", "v_proj", "lm_head")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    impl = "sdpa" if attn == fast_attention.FLAT_ATTENTION else attn
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=impl)
    if attn == fast_attention.FLAT_ATTENTION:
        assert fast_attention.use_flat_attention(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at init: make the adapters change the output, so their gradients are all live
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model


def _examples(lengths, prompt_len=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 300, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return out


def _collate(examples, padding_free: bool):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=2, padding_free=padding_free)(examples)


def _with_bounds(batch):
    """A packed batch with its examples' bounds, as FlatTrainer passes them (other attentions ignore them)."""
    if "position_ids" not in batch:
        return batch
    return {**batch, "flat_seq_bounds": fast_attention.seq_bounds(batch["position_ids"])}


def _per_token_losses(model, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Loss of every labelled token, one tensor per example, and the logits."""
    inputs = {k: v for k, v in _with_bounds(batch).items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none", ignore_index=-100
    ).view(logits.shape[0], -1)
    per_example = []
    if "position_ids" in batch:  # one packed row: split it where positions restart
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for a, b in zip(starts[:-1], starts[1:]):
            per_example.append(losses[0, a : b - 1][batch["labels"][0, a + 1 : b] != -100])
    else:
        for row in range(losses.shape[0]):
            per_example.append(losses[row][batch["labels"][row, 1:] != -100])
    return per_example, logits


def _lora_grads(model, batch, num_items: int) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = model(**_with_bounds(batch), use_cache=False, num_items_in_batch=num_items)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attn", ["sdpa", "eager", fast_attention.FLAT_ATTENTION])
def test_packed_batch_matches_padded_batch_per_token_and_in_lora_gradients(tiny_model_dir, attn):
    model = _tiny_lora_model(tiny_model_dir, attn)
    examples = _examples([9, 17, 5, 12])
    padded, packed = _collate(examples, padding_free=False), _collate(examples, padding_free=True)
    assert packed["input_ids"].shape == (1, 9 + 17 + 5 + 12) and "attention_mask" not in packed
    assert padded["input_ids"].shape == (4, 17)

    padded_losses, _ = _per_token_losses(model, padded)
    packed_losses, _ = _per_token_losses(model, packed)
    assert [len(t) for t in packed_losses] == [n - 3 for n in (9, 17, 5, 12)]  # labels kept, none across examples
    for a, b in zip(padded_losses, packed_losses):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)

    num_items = sum(n - 3 for n in (9, 17, 5, 12))
    grads_padded = _lora_grads(model, padded, num_items)
    grads_packed = _lora_grads(model, packed, num_items)
    assert any("lm_head" in n for n in grads_packed) and len(grads_packed) == 2 * 2 * 2 + 2  # q, v x 2 layers + head
    for name, grad in grads_padded.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_packed[name], grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", fast_attention.FLAT_ATTENTION])
def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir, attn):
    model = _tiny_lora_model(tiny_model_dir, attn)
    a, b, c = _examples([11, 8, 6], seed=3)
    a_changed = _examples([14], seed=4)[0]  # other tokens and another length

    with torch.no_grad():
        _, logits = _per_token_losses(model, _collate([a, b, c], padding_free=True))
        _, logits_changed = _per_token_losses(model, _collate([a_changed, b, c], padding_free=True))
        _, logits_alone = _per_token_losses(model, _collate([b], padding_free=True))
    b_logits = logits[0, 11 : 11 + 8]
    torch.testing.assert_close(logits_changed[0, 14 : 14 + 8], b_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_alone[0], b_logits, atol=ATOL, rtol=0)
    # The check can fail: without position_ids the row is one causal sequence and b sees a.
    with torch.no_grad():
        packed = _collate([a, b, c], padding_free=True)
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0, 11 : 11 + 8]
        # With a KV cache transformers does not look for packed rows: the trainer passes use_cache=False.
        cached = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0, 11 : 11 + 8]
    assert (leaky - b_logits).abs().max() > 1e-3
    assert (cached - b_logits).abs().max() > 1e-3


def test_plan_micro_batches_keeps_the_step_and_checkpoints_only_what_memory_needs():
    def estimate(size, ckpt):  # GiB: 2 of weights, 1 per example without checkpointing, 0.25 with
        return 2.0 + size * (0.25 if ckpt else 1.0)

    roomy = fast_budget.plan_micro_batches(8, 10, 12.0, estimate)
    assert (roomy.micro_batch_size, roomy.gradient_accumulation_steps, roomy.checkpointed_layers) == (8, 1, 0)
    # 8 examples: 10 GiB without checkpointing, 4 with all 10 layers: 0.6 GiB saved per checkpointed layer.
    tight = fast_budget.plan_micro_batches(8, 10, 7.0, estimate)
    assert (tight.micro_batch_size, tight.gradient_accumulation_steps, tight.checkpointed_layers) == (8, 1, 5)
    assert tight.est_peak_gpu_mem_gb == pytest.approx(7.0)
    # Too tight for 8 even fully checkpointed (4 GiB): 4 examples fit with 8 of 10 layers checkpointed.
    split = fast_budget.plan_micro_batches(8, 10, 3.6, estimate)
    assert (split.micro_batch_size, split.gradient_accumulation_steps, split.checkpointed_layers) == (4, 2, 8)
    assert fast_budget.plan_micro_batches(8, 10, None, estimate).micro_batch_size == 8
    with pytest.raises(fast_budget.MemoryBudgetError, match="memory_budget_gb=2.1"):
        fast_budget.plan_micro_batches(8, 10, 2.1, estimate)


def test_fast_path_is_the_default_and_can_be_switched_off():
    assert validate(compose_config([])).train.fast_path is True
    assert validate(compose_config(["train=gpu"])).train.fast_path is True
    assert validate(compose_config(["train.fast_path=false"])).train.fast_path is False
    with pytest.raises(Exception, match="memory_budget_gb"):
        validate(compose_config(["train.memory_budget_gb=0"]))


def _train_sft(tmp_path, overrides, name):
    """Train briefly through src.fit.build_trainer; return the trainer and the batches it saw."""
    from transformers import set_seed

    from src import fit, modeling
    from src.data import load_data

    raw = compose_config(
        [
            "data=instructions",
            "data.subsample=32",
            "data.eval_subsample=8",
            "lora.dropout=0.0",  # dropout draws differ between layouts; the rest must match to rounding
            "train.max_steps=4",
            "train.logging_steps=1",
            "train.eval_strategy=no",
            "train.per_device_train_batch_size=8",
            *overrides,
        ]
    )
    raw["output_dir"] = str(tmp_path / name)
    cfg = validate(raw)
    data = load_data(cfg.data)
    set_seed(cfg.train.seed)
    tokenizer = modeling.load_tokenizer(cfg.model)
    model = modeling.load_model(cfg.model, cfg.quant, "sft", None, tokenizer.pad_token_id)
    model = modeling.apply_lora(model, cfg.lora, "sft")
    trainer, _, _ = fit.build_trainer(cfg, model, tokenizer, data, raw["output_dir"])
    seen: list[list[tuple[int, ...]]] = []  # per micro-batch: the examples' token ids
    collate = trainer.data_collator

    def recording(examples):
        seen.append(sorted(tuple(e["input_ids"]) for e in examples))
        return collate(examples)

    trainer.data_collator = recording
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return trainer, seen, losses


@pytest.mark.slow  # about 40 s: three short training runs
def test_fast_and_plain_paths_see_the_same_data_and_learn_the_same(tmp_path, mlflow_store):
    from trl import SFTTrainer

    plain, plain_seen, plain_losses = _train_sft(tmp_path, ["train.fast_path=false"], "plain")
    fast, fast_seen, fast_losses = _train_sft(tmp_path, [], "fast")
    assert type(plain) is SFTTrainer and isinstance(fast, fast_trainer.FlatTrainer)
    for column in ("input_ids", "labels"):  # tokenize_sft prepares the rows exactly as TRL does
        assert fast.train_dataset[column] == plain.train_dataset[column]
    assert fast_seen[:4] == plain_seen[:4]  # the same examples in every step (and the same order)
    assert len(plain_losses) == len(fast_losses) == 4
    assert fast_losses == pytest.approx(plain_losses, rel=1e-4)
    assert plain_losses[-1] != pytest.approx(plain_losses[0], rel=1e-3)  # it trained: the curve moved

    # A budget under 8 examples fully checkpointed, between 4 with and without: the step is split in
    # two micro-batches of 4 and one of the two layers is checkpointed. Learning does not change.
    # The fast path plans for PLAN_MARGIN of the budget it is given.
    estimate, _ = fast_budget.plan_estimator(validate(compose_config(["data=instructions"])))
    planned = (estimate(4, False) + estimate(4, True)) / 2
    assert estimate(8, True) > planned
    budget = planned / fast_budget.PLAN_MARGIN
    split, split_seen, split_losses = _train_sft(tmp_path, [f"train.memory_budget_gb={budget}"], "split")
    assert (split.args.per_device_train_batch_size, split.args.gradient_accumulation_steps) == (4, 2)
    assert [layer.gradient_checkpointing for layer in fast_budget.decoder_layers(split.model)] == [True, False]
    merged = [sorted(split_seen[i] + split_seen[i + 1]) for i in range(0, 8, 2)]
    assert merged == plain_seen[:4]
    assert split_losses == pytest.approx(plain_losses, rel=1e-4)


def test_lora_on_lm_head_trains_on_the_fast_path(tmp_path, mlflow_store):
    overrides = ["lora.target_modules=[attn_qv,lm_head]", "train.max_steps=2"]
    fast, _, _ = _train_sft(tmp_path, overrides, "fast")
    head_b = [p for n, p in fast.model.named_parameters() if "lm_head.lora_B" in n]
    assert head_b and head_b[0].abs().max() > 0  # zero at init: only a gradient moves it


def _four_bit_lora_model(tiny_model_dir, bits: int = 4):
    from src import modeling
    from src.config import LoraConfig, QuantConfig

    model_cfg = tiny_model_config(tiny_model_dir)
    quant = QuantConfig(bits=bits, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    model = modeling.load_model(model_cfg, quant, "sft", None, pad_token_id=2)
    lora = LoraConfig(
        preset="all_linear",
        r=4,
        alpha=8,
        dropout=0.0,
        bias="none",
        target_modules=["all_linear", "lm_head"],
        modules_to_save=None,
    )
    model = modeling.apply_lora(model, lora, "sft")
    fast_weights.cast_frozen_to_bf16(model)
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = (torch.randn(param.shape, generator=generator) * 0.1).to(param.dtype)
    return model


def test_cached_dequantized_weights_give_the_four_bit_forward_and_gradients(tiny_model_dir):
    model = _four_bit_lora_model(tiny_model_dir)
    batch = _collate(_examples([9, 17, 5, 12]), padding_free=True)
    num_items = sum(n - 3 for n in (9, 17, 5, 12))
    logits_4bit = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    grads_4bit = _lora_grads(model, batch, num_items)
    quantized = fast_weights.quantized_layers(model, 4)
    assert len(quantized) == 2 * 7  # every linear of both blocks; lm_head stays unquantized

    layers, gib = fast_weights.cache_dequantized_weights(
        model, budget_gb=fast_weights.dequantized_weights_gb(model) / 2
    )
    assert 0 < layers < len(quantized) and 0 < gib <= fast_weights.dequantized_weights_gb(model) / 2
    layers, gib = fast_weights.cache_dequantized_weights(model)
    assert layers == len(quantized) and gib == pytest.approx(fast_weights.dequantized_weights_gb(model))
    assert all(m.dequantized_weight.dtype == torch.bfloat16 for m in quantized)
    assert "dequantized_weight" not in "".join(model.state_dict())  # not saved with the model

    logits_cached = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    grads_cached = _lora_grads(model, batch, num_items)
    # bf16 on both sides, the same weights: equal up to rounding. On a CPU with AVX512-BF16, bitsandbytes' 4-bit
    # forward runs its own packed kernel (it repacks the weight at the first no-grad forward), which rounds
    # differently from dequantize-then-matmul: logits agree to 2 bf16 steps at their largest value (0.125 at
    # 8.75 here; measured 0.078) and LoRA gradients to 8% of each tensor's largest entry (measured 2.0% to 4.7%
    # from run to run: its threads do not always add in one order). A wrong weight is off by its whole size.
    ulp = 2.0 ** (math.floor(math.log2(logits_4bit.abs().max().item())) - 7)
    torch.testing.assert_close(logits_cached, logits_4bit, atol=2 * ulp, rtol=0)
    for name, grad in grads_4bit.items():
        torch.testing.assert_close(grads_cached[name], grad, atol=8e-2 * grad.abs().max().item(), rtol=0)
    # The check can fail: a weight dequantized with another quant state gives other logits (0.75 away here).
    with torch.no_grad():
        quantized[0].dequantized_weight.mul_(1.5)
        shifted = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    assert (shifted - logits_4bit).abs().max() > 2 * ulp


def test_cached_dequantized_weights_give_the_eight_bit_forward_and_gradients(tiny_model_dir):
    """On CPU bitsandbytes' int8 layer multiplies by its dequantized weight: the cache must give the same values.
    (On CUDA, LLM.int8 also rounds the activations; tests/gpu/test_gpu.py measures that difference.)"""
    model = _four_bit_lora_model(tiny_model_dir, bits=8)
    batch = _collate(_examples([9, 17, 5, 12]), padding_free=True)
    num_items = sum(n - 3 for n in (9, 17, 5, 12))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits_8bit = model(**inputs, use_cache=False).logits
    grads_8bit = _lora_grads(model, batch, num_items)
    int8 = fast_weights.quantized_layers(model, 8)
    assert len(int8) == 2 * 7 and not fast_weights.quantized_layers(model, 4)
    layers, gib = fast_weights.cache_dequantized_weights(model, int8_dtype=torch.bfloat16)
    assert layers == len(int8) and gib == pytest.approx(fast_weights.dequantized_weights_gb(model))
    assert all(m.dequantized_weight.dtype == torch.bfloat16 for m in int8)
    assert all(m.weight.dtype == torch.int8 for m in int8)  # the 8-bit weights stay: saving sees them
    assert "dequantized_weight" not in "".join(model.state_dict())
    logits_cached = model(**inputs, use_cache=False).logits
    grads_cached = _lora_grads(model, batch, num_items)
    # The same weights; bitsandbytes also rounds the activations to int8 (row-wise): measured here, logits of
    # magnitude ~8 differ by <= 0.10 (mean 0.012), the loss by 2e-5 relative, LoRA gradients by <= 4% of their max.
    torch.testing.assert_close(logits_cached, logits_8bit, atol=0.2, rtol=0)
    assert (logits_cached - logits_8bit).abs().mean() < 0.03
    for name, grad in grads_8bit.items():
        torch.testing.assert_close(grads_cached[name], grad, atol=0.08 * grad.abs().max().item(), rtol=0)
    loss_cached = torch.cat(_per_token_losses(model, batch)[0]).mean()
    for module in int8:  # back to bitsandbytes' own forward
        del module.forward
    loss_bnb = torch.cat(_per_token_losses(model, batch)[0]).mean()
    assert abs(loss_cached - loss_bnb) < 1e-3 * loss_bnb
    with torch.no_grad():  # the check can fail: another weight gives other logits
        for module in int8:
            module.forward = types.MethodType(fast_weights._dequantized_forward, module)
        int8[0].dequantized_weight.mul_(2.0)
        shifted = model(**inputs, use_cache=False).logits
    # Twice the tolerance above (measured 0.8 to 1.3 from run to run: bitsandbytes' CPU threads round differently).
    assert (shifted - logits_8bit).abs().max() > 0.4


@pytest.mark.slow  # torch.compile on CPU, ~40 s; the fast path's other numerics stay
def test_compiled_decoder_layers_compute_the_eager_losses_and_gradients(tiny_model_dir):
    model = _tiny_lora_model(tiny_model_dir, fast_attention.FLAT_ATTENTION)
    batches = [
        _collate(_examples(lengths, seed=seed), padding_free=True)
        for seed, lengths in enumerate([[9, 17, 5, 12], [7, 30], [4, 4, 4, 11, 20]])
    ]
    eager = [(_per_token_losses(model, b)[0], _lora_grads(model, b, 10)) for b in batches]
    assert fast_trainer.compile_decoder_layers(model) == 2
    for batch, (losses, grads) in zip(batches, eager):  # three lengths: dynamic shapes, no recompile per step
        compiled_losses, _ = _per_token_losses(model, batch)
        for a, b in zip(losses, compiled_losses):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
        compiled_grads = _lora_grads(model, batch, 10)
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, atol=ATOL, rtol=0)


def test_graphed_steps_pad_a_packed_row_with_one_ignored_example(tiny_model_dir):
    """The padding a CUDA graph needs (GraphedSteps._inputs) changes no real token's loss; checked on CPU, where
    varlen attention runs per example from the same offsets."""
    graphs = fast_graphs.GraphedSteps(pad_token_id=2, max_examples=4, bucket=16)
    batch = _collate(_examples([5, 7, 3]), padding_free=True)  # 15 tokens
    assert graphs.accepts(batch) and graphs.padded_length(15) == 16 and graphs.padded_length(16) == 32
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    host = graphs._inputs(batch, 16, num_items)
    assert host["flat_cu_seqlens"].tolist() == [0, 5, 12, 15, 16, 16]  # the pad example, then an empty one
    assert host["input_ids"][0, 15] == 2 and host["labels"][0, 15] == -100 and host["position_ids"][0, 15] == 0
    assert not graphs.accepts(_collate(_examples([4] * 5), padding_free=True))  # more examples than captured
    assert not graphs.accepts(_collate(_examples([4, 6]), padding_free=False))  # a padded batch

    model = _tiny_lora_model(tiny_model_dir, "sdpa")
    assert fast_attention.use_varlen_attention(model)
    with torch.no_grad():
        reference = model(**_with_bounds(batch), use_cache=False, num_items_in_batch=num_items)
        padded = model(**host, flat_max_seqlen=16, use_cache=False)
    torch.testing.assert_close(padded.loss, reference.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(padded.logits[:, :15], reference.logits, atol=ATOL, rtol=0)
