"""``train.fused_loss`` (src/engine/loss.py) computes the model's own loss and gradients, without its full logits.

fp32 on a CPU, within 1e-5: the loss, the gradient of the head's input, of the LoRA weights of every layer (the
head's A and B included) and, in training, the adapters after a few optimizer steps.
"""

from __future__ import annotations

import pytest
import torch

from src.engine import loss as fused
from src.modeling import fused_head
from tests.unit.engine.test_flat import _collate, _examples, _tiny_lora_model, _train_sft

ATOL = 1e-5


def _reference(hidden, weight, labels, z=None, b=None):
    logits = hidden @ weight.T + (0 if z is None else z @ b.T)
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_linear_cross_entropy_gives_the_summed_loss_and_its_gradients(lora, chunk):
    """Chunks that do and do not divide the tokens, one that holds them all; ignored labels among them."""
    generator = torch.Generator().manual_seed(0)
    tokens, width, vocab, rank = 20, 16, 50, 4
    hidden = torch.randn(tokens, width, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, width, generator=generator)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[[0, 5, 6, 19]] = -100
    z = torch.randn(tokens, rank, generator=generator, requires_grad=True) if lora else None
    b = torch.randn(vocab, rank, generator=generator, requires_grad=True) if lora else None
    inputs = [t for t in (hidden, z, b) if t is not None]

    count = int((labels != -100).sum())  # compared as the model's loss is: the mean over the labeled tokens
    expected = _reference(hidden, weight, labels, z, b) / count
    expected_grads = torch.autograd.grad(expected * 0.37, inputs)
    got = fused.linear_cross_entropy(hidden, weight, labels, z, b, chunk=chunk) / count
    got_grads = torch.autograd.grad(got * 0.37, inputs)  # the backward scales what the forward kept
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    for g, e in zip(got_grads, expected_grads):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def test_chunks_hold_a_bounded_number_of_logits():
    from src.memory import FUSED_LOSS_CHUNK_LOGITS, chunk_tokens

    assert chunk_tokens(32000) == 2048  # OpenLLaMA's and Llama 2's vocabulary
    assert chunk_tokens(151936) == 256  # Qwen2.5's: at least one multiple
    assert chunk_tokens(32000) * 32000 <= FUSED_LOSS_CHUNK_LOGITS


@pytest.mark.parametrize(
    "targets,dropout", [(("q_proj", "v_proj"), 0.0), (("q_proj", "v_proj", "lm_head"), 0.0), (("lm_head",), 0.1)]
)
def test_causal_lm_loss_is_the_model_s_own_loss_with_its_gradients(tiny_model_dir, targets, dropout):
    """A packed row of three examples through the tiny Llama with LoRA (on the head too, with dropout there: the
    same mask is drawn, the dropout being the forward's last random op in both)."""
    model = _tiny_lora_model(tiny_model_dir, "sdpa", targets=targets)
    if dropout:
        for module in model.modules():
            if hasattr(module, "lora_dropout"):
                module.lora_dropout["default"] = torch.nn.Dropout(dropout)
    model.train()
    batch = _collate(_examples([9, 14, 6]), padding_free=True)
    num_items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    params = [p for p in model.parameters() if p.requires_grad]
    assert fused_head(model) is not None

    torch.manual_seed(3)
    own = model(**batch, use_cache=False, num_items_in_batch=num_items).loss
    own_grads = torch.autograd.grad(own, params)
    torch.manual_seed(3)
    got = fused.causal_lm_loss(model, batch, num_items)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, own, atol=ATOL, rtol=0)
    for g, e in zip(got_grads, own_grads):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    assert any(e.abs().max() > 0 for e in own_grads)


def test_under_a_trainer_s_bf16_mixed_precision_the_fused_loss_is_the_model_s_own(tiny_model_dir, request):
    """A bf16 base with fp32 adapters (peft's default), LoRA on the head: accelerate puts the model's own forward
    under bf16 autocast; the trainer's fused loss enters the same autocast (without it the head's fp32 LoRA input
    meets its bf16 weight). Equal within bf16 rounding, loss and gradients."""
    import types

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from src.engine.trainer import FlatTrainer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    AcceleratorState._reset_state(reset_partial_state=True)  # a singleton: an earlier test's Trainer set it
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    prepared = accelerator.prepare(model)
    prepared.train()
    batch = _collate(_examples([9, 14, 6]), padding_free=True)
    num_items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    params = [p for p in model.parameters() if p.requires_grad]

    own = prepared(**batch, use_cache=False, num_items_in_batch=num_items).loss
    own_grads = torch.autograd.grad(own, params)
    trainer = types.SimpleNamespace(accelerator=accelerator)
    got = FlatTrainer.fused_causal_lm_loss(trainer, prepared, batch, num_items)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got.float(), own.float(), atol=0, rtol=1e-5)  # without the autocast: 4e-4 off
    for g, e in zip(got_grads, own_grads):
        scale = e.abs().max()
        assert scale > 0 and g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=0.05 * float(scale), rtol=0)


def test_heads_the_fused_loss_would_get_wrong_are_left_to_the_model(tiny_model_dir):
    """A DoRA head, a head whose own weight trains, and an architecture outside the list: None, and the caller
    takes the model's own loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], use_dora=True))
    assert fused_head(dora) is None

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert fused_head(plain) is None  # every weight trains (full fine-tuning): the fused loss gives W none
    plain.get_output_embeddings().weight.requires_grad_(False)
    assert fused_head(plain) is not None
    plain.config.model_type = "gemma2"  # soft-caps its logits
    assert fused_head(plain) is None
    batch = _collate(_examples([5, 7]), padding_free=True)
    assert fused.causal_lm_loss(plain, batch) is None


@pytest.mark.slow  # about 20 s: two short training runs
def test_a_fast_run_with_the_fused_loss_learns_what_it_learns_without(tmp_path, mlflow_store):
    """Four optimizer steps of the tiny model, LoRA on the head included: the same loss curve and adapters."""
    overrides = ["lora.target_modules=[attn_qv,lm_head]"]
    own, _, own_losses = _train_sft(tmp_path, overrides, "own")
    got, _, got_losses = _train_sft(tmp_path, [*overrides, "train.fused_loss=true"], "fused")
    assert got.fused_loss and not own.fused_loss
    assert len(got_losses) == 4 and got_losses == pytest.approx(own_losses, rel=1e-5)
    own_weights = dict(own.model.named_parameters())
    for name, param in got.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, own_weights[name], atol=ATOL, rtol=0)
    assert own_losses[-1] != pytest.approx(own_losses[0], rel=1e-3)  # it trained: the curve moved


def test_the_graphed_step_s_forward_and_backward_takes_the_fused_loss_where_set(tiny_model_dir):
    """GraphedSteps._forward_backward (what a CUDA graph captures; run here eagerly on a CPU): the model's own loss
    by default, the fused loss once the trainer sets it, with the same loss and LoRA gradients."""
    from src.engine import graphs as fast_graphs

    model = _tiny_lora_model(tiny_model_dir, "sdpa", targets=("q_proj", "v_proj", "lm_head"))
    model.train()
    graphs = fast_graphs.GraphedSteps(pad_token_id=2, max_examples=4, bucket=16)
    batch = _collate(_examples([5, 7, 3]), padding_free=True)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    static = graphs._inputs(batch, 16, num_items)
    params = [p for p in model.parameters() if p.requires_grad]
    results, taken = [], []

    def fused_loss(m, inputs, n):
        value = fused.causal_lm_loss(m, inputs, n)
        taken.append(value is not None)
        return value

    for loss in (None, fused_loss):
        graphs.loss = loss
        for p in params:
            p.grad = None
        value = graphs._forward_backward(model, static, 16)
        results.append((value, [p.grad.clone() for p in params]))
    (own, own_grads), (got, got_grads) = results
    assert taken == [True]  # the second step's loss was the fused one
    torch.testing.assert_close(got, own, atol=ATOL, rtol=0)
    for g, e in zip(got_grads, own_grads):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    assert any(e.abs().max() > 0 for e in own_grads)
