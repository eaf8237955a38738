"""The pack engine (:mod:`src.packs.engine`): the slot bank, its batched LoRA matmuls, its per-slot AdamW, and
the isolation of one trial's faults from the others'."""

from __future__ import annotations

import contextlib

import pytest
import torch

from src.config import validate
from src.packs import engine
from tests.conftest import compose_config


def _tiny_pack(*loras: list[str], dropout: float, join: bool = True):
    """The tiny model with one adapter per ``loras`` (their overrides) as a pack, on per-example attention; with
    ``join``, every trial in its slot."""
    from src import modeling
    from src.engine.attention import use_flat_attention
    from src.packs import model as pack_model

    cfgs = []
    for lora in loras:
        raw = compose_config(["data=instructions", f"lora.dropout={dropout}", *lora])
        raw["output_dir"] = "unused"
        cfgs.append(validate(raw, for_training=True))
    tokenizer = modeling.load_tokenizer(cfgs[0].model)
    model = modeling.load_model(cfgs[0].model, cfgs[0].quant, "sft", None, tokenizer.pad_token_id, False)
    pack = pack_model.build_pack(model, [c.lora for c in cfgs], "sft", [0] * len(cfgs))
    use_flat_attention(pack.model)
    for adapter in pack.adapters if join else ():
        pack.join(adapter)  # each takes its slot, in order
    return pack


@torch.no_grad()
def draw_bank(pack, seed: int = 3) -> None:
    """Random weights in every slot's own ranks (B starts at zero: every slot gets a delta to compute), zeros past
    them, as the bank holds a smaller rank."""
    torch.manual_seed(seed)
    bank = pack.bank
    bank.weights.normal_(0, 0.02)
    for slot in range(bank.slots):
        for entry in bank.layers.values():
            a, b = bank._views(bank.weights[slot], entry)
            rank = bank.ranks[slot][entry.index]
            a[rank:] = 0
            b[:, rank:] = 0


def _row(slot: int, tokens: int, vocab_bad: int | None = None) -> engine.SlotRow:
    ids = torch.randint(5, 500, (1, tokens))
    labels = ids.clone()
    labels[0, 0] = -100
    if vocab_bad is not None:
        labels[0, 5] = vocab_bad
    half = tokens // 2
    positions = torch.cat([torch.arange(half), torch.arange(tokens - half)]).unsqueeze(0)
    return engine.SlotRow(slot, ids, positions, labels, (0, half, tokens), tokens - 2)


def _submission(row: engine.SlotRow, stepping: bool = True, lr: float = 1e-2):
    return engine.Submission(row, stepping, (lr, 0.9, 0.999, 1e-8, 0.01, 1.0), contextlib.nullcontext)


def test_the_batched_matmuls_give_the_loop_s_outputs_and_gradients(monkeypatch):
    """The GPU's form of a joint step (two ``bmm`` a layer over the padded slots, scale between them) and the
    loop over slots at each slot's own rank agree: losses and every slot's gradient."""
    from src.packs.model import attention_inputs

    pack = _tiny_pack(["lora=all_linear", "lora.r=4"], ["lora=attn_qv", "lora.r=8", "lora.alpha=32"], dropout=0.0)
    draw_bank(pack)
    rows = [_row(0, 14), _row(1, 9)]
    length = engine.padded_length(rows)
    joint = engine.joint_inputs(rows, length, 0)
    results = []
    for grouped in (True, False):
        monkeypatch.setitem(engine.GROUPED, "cpu", grouped)
        pack.bank.weights.grad = None
        with engine.active(engine.joint_step(pack.bank, [0, 1], length)):
            extra = attention_inputs("per-example", joint["bounds"], "cpu")
            logits = pack.model(
                input_ids=joint["input_ids"], position_ids=joint["position_ids"], use_cache=False, **extra
            ).logits
            losses = engine.slot_losses(logits, joint["shift_labels"], torch.tensor([12.0, 7.0]))
            losses.sum().backward()
        results.append((losses.detach(), pack.bank.weights.grad.clone()))
    (grouped_losses, grouped_grad), (loop_losses, loop_grad) = results
    torch.testing.assert_close(grouped_losses, loop_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped_grad, loop_grad, rtol=1e-4, atol=1e-6)
    assert grouped_grad[0].abs().max() > 0 and grouped_grad[1].abs().max() > 0


def test_slot_adamw_steps_each_slot_as_torch_adamw_steps_a_run_alone():
    """Three slots, each its own learning rate, betas, epsilon, weight decay and clipping; slot 1 skips the second
    step (its window goes on) and slot 2 clips nothing: each slot ends as ``torch.optim.AdamW`` after
    ``clip_grad_norm_`` leaves the same tensor."""

    class Bank:
        slots = 3
        weights = torch.nn.Parameter(torch.randn(3, 40))

    bank = Bank()
    optimizer = engine.SlotAdamW(bank)
    hyper = torch.tensor(
        [[1e-2, 0.9, 0.999, 1e-8, 0.01, 1.0], [3e-2, 0.8, 0.99, 1e-6, 0.0, 0.5], [5e-3, 0.95, 0.9, 1e-8, 0.1, 0.0]]
    )
    alone = [torch.nn.Parameter(bank.weights[i].detach().clone()) for i in range(3)]
    optims = [
        torch.optim.AdamW(
            [p], lr=float(h[0]), betas=(float(h[1]), float(h[2])), eps=float(h[3]), weight_decay=float(h[4])
        )
        for p, h in zip(alone, hyper)
    ]
    grads = [torch.randn(3, 40) * 3 for _ in range(2)]
    masks = [torch.tensor([[True], [True], [True]]), torch.tensor([[True], [False], [True]])]
    for grad, mask in zip(grads, masks):
        bank.weights.grad = grad.clone() if bank.weights.grad is None else bank.weights.grad + grad
        norms = optimizer.step(mask, hyper)
        for i in range(3):
            alone[i].grad = grad[i].clone() if alone[i].grad is None else alone[i].grad + grad[i]
            if not mask[i]:
                continue
            norm = torch.nn.utils.clip_grad_norm_([alone[i]], float(hyper[i, 5]) or float("inf"))
            torch.testing.assert_close(norms[i], norm)
            optims[i].step()
            alone[i].grad = None
    for i in range(3):
        torch.testing.assert_close(bank.weights[i], alone[i], rtol=1e-6, atol=1e-7)
    assert bank.weights.grad[1].abs().max() > 0 and bank.weights.grad[0].abs().max() == 0  # slot 1's window goes on


def test_the_pack_counts_the_padding_its_joint_steps_computed():
    """Rows of 14 and 9 tokens padded to one length of 15 (the longest and one pad token; no multiple on a CPU),
    then two rows of 12: 14 + 9 + 12 + 12 of 2 x 15 + 2 x 13 tokens were the trials' own. The pack's line says it."""
    pack = _tiny_pack(["lora=attn_qv", "lora.r=4"], ["lora=attn_qv", "lora.r=8"], dropout=0.0)
    assert pack.padding_share() == 0.0
    pack._joint_step({"t0": _submission(_row(0, 14)), "t1": _submission(_row(1, 9))})
    assert pack.padding_share() == pytest.approx(1 - 23 / 30)
    pack._joint_step({"t0": _submission(_row(0, 12)), "t1": _submission(_row(1, 12))})
    assert pack.padding_share() == pytest.approx(1 - 47 / 56)
    assert f"{1 - 47 / 56:.1%} of their tokens padding" in pack.summary()


def test_one_trial_s_nan_weights_leave_the_others_finite(monkeypatch):
    """NaN in slot 1's bank row, forward and backward: slot 0's loss and gradient stay finite, in both forms of the
    grouped matmul."""
    pack = _tiny_pack(["lora=all_linear", "lora.r=4"], ["lora=attn_qv", "lora.r=8"], dropout=0.1)
    with torch.no_grad():
        pack.bank.weights[1].fill_(float("nan"))
    for grouped in (True, False):
        monkeypatch.setitem(engine.GROUPED, "cpu", grouped)
        pack.bank.weights.grad = None
        result = pack._joint_step({"t0": _submission(_row(0, 12), lr=0.0), "t1": _submission(_row(1, 12), lr=0.0)})
        loss0, norm0 = result["t0"]
        assert torch.isfinite(loss0) and torch.isnan(result["t1"][0])
        assert torch.isfinite(norm0) and norm0 > 0
        assert torch.isfinite(pack.bank.weights[0]).all()


def test_a_joint_step_that_fails_on_one_trial_s_row_fails_that_trial_alone():
    """One trial's row breaks the joint step (here its labels are out of the vocabulary): each row then runs alone,
    so the trial whose own step fails gets the error and the other its loss, norm and step."""
    pack = _tiny_pack(["lora=attn_qv", "lora.r=4"], ["lora=attn_qv", "lora.r=8"], dropout=0.0)
    vocab = pack.model.get_base_model().config.vocab_size
    before = pack.bank.weights.detach().clone()
    results = pack._run_step({"t0": _submission(_row(0, 12)), "t1": _submission(_row(1, 12, vocab_bad=vocab + 7))})
    assert isinstance(results["t1"], Exception) and not isinstance(results["t0"], Exception), results
    loss, norm = results["t0"]
    assert torch.isfinite(loss) and norm > 0
    assert not torch.equal(pack.bank.weights[0], before[0])  # t0 stepped
    assert torch.equal(pack.bank.weights[1], before[1])  # t1 did not


def test_a_slot_loads_and_stores_its_peft_adapter_exactly():
    """The bank's copy of each adapter is peft's, padded with zeros to the layer's largest rank, and goes back
    unchanged; a slot holds no weight where its adapter has none."""
    from src.packs.model import adapter_parameters

    pack = _tiny_pack(["lora=attn_qv", "lora.r=2"], ["lora=all_linear", "lora.r=8"], dropout=0.0)
    original = {n: p.detach().clone() for n, p in adapter_parameters(pack.model, "t0")}
    with torch.no_grad():
        for _, p in adapter_parameters(pack.model, "t0"):
            p.zero_()
    pack.bank.store(0)
    for name, p in adapter_parameters(pack.model, "t0"):
        torch.testing.assert_close(p, original[name], rtol=0, atol=0)
    assert pack.counts("t0")[0] == sum(v.numel() for v in original.values())
    assert not all(pack.bank.targeted[0]) and all(pack.bank.targeted[1])
    assert pytest.approx(pack.bank.scales[1].max().item()) == 16 / 8


def test_checkpointed_layers_recompute_the_adapters_in_the_backward():
    """With every decoder layer checkpointed, the backward recomputes each layer's forward, adapters included: the
    slots' gradients are those of the step without checkpointing."""
    from src.engine.budget import decoder_layers, set_checkpointed_layers

    pack = _tiny_pack(["lora=all_linear", "lora.r=4"], ["lora=attn_qv", "lora.r=8"], dropout=0.0)
    pack.model.train()  # checkpointing applies in training mode only
    torch.manual_seed(5)
    with torch.no_grad():
        pack.bank.weights.normal_(0, 0.02)  # B starts at zero, and A's gradient with it
    rows = [_row(0, 14), _row(1, 9)]
    length = engine.padded_length(rows)
    counts = torch.tensor([12.0, 7.0])
    grads = []
    for layers in (0, len(decoder_layers(pack.model))):
        set_checkpointed_layers(pack.model, layers)
        pack.bank.weights.grad = None
        pack._forward_backward(rows, length, counts, contextlib.nullcontext)
        grads.append(pack.bank.weights.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_slot_adamw_leaves_a_slot_that_does_not_step_exactly_as_it_was():
    """A slot outside the step (empty: its settings all zero, as the pack leaves them) keeps its weights, moments and
    gradient bit for bit: no 0 / 0 from its zero epsilon."""

    class Bank:
        slots = 2
        weights = torch.nn.Parameter(torch.randn(2, 16))

    bank = Bank()
    optimizer = engine.SlotAdamW(bank)
    bank.weights.grad = torch.randn(2, 16)
    before, grad = bank.weights.detach().clone(), bank.weights.grad.clone()
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.01, 1.0], [0.0] * 6])
    optimizer.step(torch.tensor([[True], [False]]), hyper)
    assert torch.equal(bank.weights[1], before[1]) and torch.equal(bank.weights.grad[1], grad[1])
    assert torch.equal(optimizer.exp_avg[1], torch.zeros(16)) and optimizer.steps[1].item() == 0
    assert not torch.equal(bank.weights[0], before[0]) and torch.equal(bank.weights.grad[0], torch.zeros(16))


@pytest.mark.parametrize("second", ["joins", "fails before joining"])
def test_the_first_joint_step_waits_for_every_trial_that_started_with_it(second):
    """The first wave of trials starts together: a trial ready first does not train alone while another still sets
    up. Its step waits until the other joins (then one joint step holds both) or ends without joining (then it
    steps alone)."""
    import threading
    import time

    pack = _tiny_pack(["lora=attn_qv"], ["lora=attn_qv", "lora.r=4"], dropout=0.0, join=False)
    pack.join("t0")
    done = []
    first = threading.Thread(target=lambda: done.append(pack.step("t0", _submission(_row(0, 12)))))
    first.start()
    time.sleep(1.0)
    assert not done and pack.steps == 0  # t1 has neither joined nor ended: t0 waits
    if second == "joins":
        pack.join("t1")
        pack.step("t1", _submission(_row(1, 9)))
    else:
        pack.leave("t1")
    first.join(timeout=60)
    assert done and not first.is_alive()
    assert (pack.steps, pack.trial_steps) == ((1, 2) if second == "joins" else (1, 1))
