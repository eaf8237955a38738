"""GPU tier (``pytest -m gpu``, on a CUDA machine; CI has none): kernels that only run on CUDA.

Tolerances: bf16. Two attention kernels accumulate in different orders, so logits agree to about
bf16's resolution at their scale (atol 3e-2 on logits of order 1) and LoRA gradients to 3% of each
tensor's largest entry. A token that attends across examples moves its logits by far more
(the last check of the test shows that it can fail).
"""

from __future__ import annotations

import types

import pytest
import torch

from src.engine import attention as fast_attention
from src.engine import graphs as fast_graphs
from src.engine import trainer as fast_trainer
from src.engine import weights as fast_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _model(attention: str, head_dim: int, kv_heads: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=8 * head_dim,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=kv_heads,
        vocab_size=512,
        attn_implementation="sdpa",
    )
    model = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16)
    assert {"varlen": fast_attention.use_varlen_attention, "per-example": fast_attention.use_flat_attention}[attention](
        model
    )
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn_like(param) * 0.1
    return model


def _packed(lengths, seed=0):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    generator = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(3, 500, (n,), generator=generator).tolist()} for n in lengths]
    batch = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)(rows)
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _trainer(attention: str):
    """A FlatTrainer with only what compute_loss reads: the attention and one argument (one process)."""
    trainer = fast_trainer.FlatTrainer.__new__(fast_trainer.FlatTrainer)
    trainer.attention = attention
    trainer.args = types.SimpleNamespace(average_tokens_across_devices=False)
    return trainer


def _run(model, attention: str, batch):
    trainer = _trainer(attention)
    model.zero_grad()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True, num_items_in_batch=100)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return outputs.logits.detach().float(), grads  # detached: a live autograd graph would spoil a later capture


@pytest.mark.parametrize("head_dim,kv_heads", [(100, 8), (128, 2)])  # OpenLLaMA-3B's odd head size; GQA
def test_varlen_attention_matches_per_example_attention(head_dim, kv_heads):
    assert fast_attention.varlen_available(torch.device("cuda"))
    batch = _packed([37, 200, 5, 64, 130])
    logits_ref, grads_ref = _run(_model("per-example", head_dim, kv_heads), "per-example", batch)
    logits, grads = _run(_model("varlen", head_dim, kv_heads), "varlen", batch)
    torch.testing.assert_close(logits, logits_ref, atol=3e-2, rtol=0)
    for name, grad in grads_ref.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=3e-2 * grad.abs().max().item(), rtol=0)
    # The check can fail: the same row as one causal sequence lets examples attend to each other.
    causal = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1], device="cuda")[None]}
    leaky, _ = _run(_model("varlen", head_dim, kv_heads), "varlen", causal)
    assert (leaky[0, 37:] - logits_ref[0, 37:]).abs().max() > 0.1


def test_cached_dequantized_weights_match_bitsandbytes_on_cuda():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(3200, 8640, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(8640, 3200) * 0.02})
    layer = layer.cuda()
    x = torch.randn(2, 300, 3200, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    reference = layer(x)
    (grad_ref,) = torch.autograd.grad(reference.square().sum(), x)
    holder = torch.nn.Sequential(layer)
    assert fast_weights.cache_dequantized_weights(holder) == (1, pytest.approx(3200 * 8640 * 2 / 2**30))
    cached = layer(x)
    (grad,) = torch.autograd.grad(cached.square().sum(), x)
    torch.testing.assert_close(cached, reference, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad, grad_ref, atol=2e-2 * grad_ref.abs().max().item(), rtol=0)


def test_cached_int8_weights_against_llm_int8_on_cuda():
    """The cached 8-bit weight is bitsandbytes' dequantized one; LLM.int8's forward also rounds the activations to
    int8 (outliers above 6.0 kept in fp16). Measured: the outputs agree to a few % of their scale, the input
    gradients (bitsandbytes' backward uses the dequantized weight too) to bf16 resolution."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(3200, 8640, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict({"weight": torch.randn(8640, 3200) * 0.02})
    layer = layer.cuda()
    x = torch.randn(2, 300, 3200, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    reference = layer(x)
    (grad_ref,) = torch.autograd.grad(reference.float().square().sum(), x)
    holder = torch.nn.Sequential(layer)
    assert fast_weights.cache_dequantized_weights(holder) == (1, pytest.approx(3200 * 8640 * 2 / 2**30))
    cached = layer(x)
    (grad,) = torch.autograd.grad(cached.float().square().sum(), x)
    scale = reference.float().abs().max().item()
    assert (cached.float() - reference.float()).abs().max().item() < 0.05 * scale
    assert (cached.float() - reference.float()).abs().mean().item() < 0.01 * scale
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=0.05 * grad_ref.float().abs().max().item(), rtol=0)


def test_cuda_graph_steps_match_eager_steps():
    """Replays (a new length captures, the same length replays on new data) give the eager loss and gradients."""
    model = _model("varlen", head_dim=100, kv_heads=8)  # LoRA dropout 0: the same computation both ways
    graphs = fast_graphs.GraphedSteps(pad_token_id=2, max_examples=5, bucket=128)
    batches = [  # 436 and 400 tokens: one 512-token graph, captured then replayed; 50 tokens: a 128-token graph
        _packed([37, 200, 5, 64, 130], seed=0),
        _packed([100, 90, 80, 70, 60], seed=1),
        _packed([20, 30], seed=2),
        _packed([64, 64, 64, 64, 64, 36], seed=3),  # six examples: more than the graphs take
    ]
    for batch in batches[:3]:
        num_items = (batch["labels"][:, 1:] != -100).sum()
        logits, grads_ref = _run(model, "varlen", batch)
        loss_ref = _trainer("varlen").compute_loss(model, batch, num_items_in_batch=num_items).detach().float()
        model.zero_grad(set_to_none=True)
        assert graphs.accepts(batch)
        _graphed_matches(model, graphs, batch, num_items, loss_ref, grads_ref, steps=1)
    assert sorted(graphs.graphs) == [128, 512]
    assert not graphs.accepts(batches[3])


def test_fused_lora_layers_replayed_as_cuda_graphs_match_peft_s_eager_step():
    """train.fused_lora (src/engine/lora.py) on CUDA in bf16: the graphed step of the fused layers gives the loss and
    LoRA gradients of peft's own layers run eagerly, to bf16 rounding (the scale now multiplies A(x), not the
    output)."""
    from src.engine.lora import fuse_lora_layers

    model = _model("varlen", head_dim=100, kv_heads=8)
    graphs = fast_graphs.GraphedSteps(pad_token_id=2, max_examples=5, bucket=128)
    batch = _packed([37, 200, 5, 64, 130], seed=0)
    num_items = (batch["labels"][:, 1:] != -100).sum()
    _, grads_ref = _run(model, "varlen", batch)
    loss_ref = _trainer("varlen").compute_loss(model, batch, num_items_in_batch=num_items).detach().float()
    model.zero_grad(set_to_none=True)
    assert fuse_lora_layers(model) == 2 * 3
    _graphed_matches(model, graphs, batch, num_items, loss_ref, grads_ref)


def _graphed_matches(model, graphs, batch, num_items, loss_ref, grads_ref, steps: int = 2) -> None:
    """The batch's graphed step, ``steps`` times (2: captured, then replayed), gives ``loss_ref`` and ``grads_ref``
    (``_run``'s, at 100 items) to bf16 rounding."""
    for _ in range(steps):
        loss = graphs.step(model, batch, num_items).float().clone()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, loss_ref, atol=1e-2, rtol=0)
        for name, grad in grads_ref.items():
            torch.testing.assert_close(grads[name] * num_items / 100, grad, atol=3e-2 * grad.abs().max().item(), rtol=0)


def test_fp8_layers_on_cuda_compute_their_math_and_replay_as_cuda_graphs():
    """quant=fp8 (src/fp8.py) on CUDA: a layer's forward and input gradient through torch._scaled_mm equal the same
    math in fp32 to bf16 rounding (row counts not a multiple of 16 included); a decoder converted to FP8 with LoRA on
    top gives the same loss and LoRA gradients graphed (captured, then replayed) as eagerly."""
    from src import fp8

    if fp8.fp8_unavailable():
        pytest.skip(fp8.fp8_unavailable())
    torch.manual_seed(0)
    layer = fp8.Fp8Linear(torch.nn.Linear(256, 384).to("cuda", torch.bfloat16))
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(300, 384, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    xq, sx = fp8.quantize_rows(x.detach())
    expected_y = (xq.float() * sx) @ layer.dequantized().T + layer.bias.float()
    gq, sg = fp8.quantize_rows(grad.float() * layer.weight_scale)
    expected_dx = (gq.float() * sg) @ layer.weight.float()
    for got, want in ((y, expected_y), (dx, expected_dx)):
        torch.testing.assert_close(got.float(), want, atol=float(want.abs().max()) / 64, rtol=0)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=512, attn_implementation="sdpa",
    )  # fmt: skip
    base = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16)
    assert fp8.convert_to_fp8(base) == 2 * 7 and fast_attention.use_varlen_attention(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn_like(param) * 0.1
    batch = _packed([37, 200, 5, 64, 130], seed=0)
    num_items = (batch["labels"][:, 1:] != -100).sum()
    _, grads_ref = _run(model, "varlen", batch)
    loss_ref = _trainer("varlen").compute_loss(model, batch, num_items_in_batch=num_items).detach().float()
    model.zero_grad(set_to_none=True)
    graphs = fast_graphs.GraphedSteps(pad_token_id=2, max_examples=5, bucket=128)
    _graphed_matches(model, graphs, batch, num_items, loss_ref, grads_ref)


@pytest.mark.parametrize("multilabel", [False, True])
def test_cuda_graph_classifier_steps_match_eager_steps(multilabel):
    """A packed classifier's replayed steps (a new length captures, the same length replays on new rows) give the
    eager packed step's loss and LoRA and head gradients; an epoch's smaller last batch gets a graph of its own. The
    loss's divisor is a graph input: the step's loss total as the Trainer passes it (a GPU tensor; a step of one row:
    the row's own), or else the row's, from its labels."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from src.engine.classification import (
        FlatClassificationCollator,
        GraphedClassifierSteps,
        classification_loss,
        flat_logits,
        loss_total,
    )

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=800,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=512,
        num_labels=4,
        pad_token_id=2,
        attn_implementation="sdpa",
    )
    model = AutoModelForSequenceClassification.from_config(config).to("cuda", torch.bfloat16)
    assert fast_attention.use_varlen_attention(model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn_like(param) * 0.1
    weights = None if multilabel else torch.tensor([0.5, 1.0, 2.0, 1.0])
    graphs = GraphedClassifierSteps(4, weights, multilabel, bucket=64)
    collate = FlatClassificationCollator(multilabel)
    generator = torch.Generator().manual_seed(1)

    def batch(lengths):
        labels = (
            torch.randint(0, 2, (len(lengths), 4), generator=generator).tolist()
            if multilabel
            else torch.randint(0, 4, (len(lengths),), generator=generator).tolist()
        )
        rows = [
            {"input_ids": torch.randint(3, 500, (n,), generator=generator).tolist(), "label": y}
            for n, y in zip(lengths, labels)
        ]
        return collate(rows)

    # 122 and 103 tokens: one 128-token graph, captured then replayed; 18 tokens: 64; 3 examples (an epoch's last
    # batch): a graph of its own. Every step replays before any eager step, as in training: an eager backward first
    # binds the parameters' gradient accumulators to the default stream, and a capture on a side stream then fails.
    batches = [batch([37, 5, 60, 20]), batch([30, 40, 12, 21]), batch([3, 4, 5, 6]), batch([10, 20, 30])]
    replayed = []
    for i, b in enumerate(batches):
        assert graphs.accepts(b)
        total = loss_total(b["labels"].cuda(), weights, multilabel) if i != 1 else None  # 1: the labels' own
        loss = graphs.step(model, b, total)
        assert loss is not None and graphs.failed is None
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        replayed.append((loss.float().clone(), grads))
        model.zero_grad(set_to_none=True)
    assert sorted(graphs.graphs) == [(64, 3), (64, 4), (128, 4)]
    assert not graphs.accepts(batch([1] * 5))  # more examples than the micro-batch
    for b, (loss, grads) in zip(batches, replayed):
        device = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        logits = flat_logits(
            model, device["input_ids"], device["position_ids"], device["last_token"], "varlen", b["bounds"]
        )
        loss_ref = classification_loss(logits, device["labels"], weights, multilabel)
        loss_ref.backward()
        grads_ref = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, loss_ref.detach().float(), atol=1e-2, rtol=0)
        assert set(grads) == set(grads_ref) and any("score" in n for n in grads)
        for name, grad in grads_ref.items():
            torch.testing.assert_close(grads[name], grad, atol=3e-2 * grad.abs().max().item(), rtol=0, msg=name)


def _ddp_graph_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = _model("varlen", head_dim=100, kv_heads=8)  # seeded: the same weights on both ranks
    graphs = fast_graphs.GraphedSteps(pad_token_id=2, max_examples=5, bucket=128, world_size=2)
    graphs.stream = torch.cuda.Stream()  # as FlatTrainer.train: DDP built on the stream the graphs use
    graphs.stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(graphs.stream):
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
        results = _ddp_graph_steps(rank, model, ddp, graphs)
    torch.save({"results": results, "lengths": sorted(graphs.graphs), "failed": graphs.failed}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _ddp_graph_steps(rank: int, model, ddp, graphs) -> list[dict]:
    import torch.distributed as dist

    from src.distributed import average_gradients

    results = []
    for step, lengths in enumerate([[37, 200, 5, 64, 130], [100, 90, 80, 70, 60]]):  # capture, then replay
        batch = _packed(lengths[rank:] + lengths[:rank], seed=10 * step + rank)  # each rank its own row
        local = (batch["labels"][:, 1:] != -100).sum()
        num_items = local.clone()
        dist.all_reduce(num_items)  # as the Trainer counts under DDP: every rank's tokens
        bounds = fast_attention.seq_bounds(batch["position_ids"])
        cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
        max_len = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        model.zero_grad(set_to_none=True)
        outputs = ddp(**batch, flat_cu_seqlens=cu, flat_max_seqlen=max_len, use_cache=False,
                      num_items_in_batch=num_items)  # fmt: skip
        loss_ref = outputs.loss * 2  # as Trainer.compute_loss scales it under DDP
        loss_ref.backward()
        del outputs
        grads_ref = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        loss = graphs.step(model, batch, num_items)
        assert loss is not None, graphs.failed
        loss = loss.float().clone()
        average_gradients([p.grad for p in model.parameters() if p.requires_grad])
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        results.append({"loss_ref": loss_ref.detach().float().cpu(), "loss": loss.cpu(),
                        "grads_ref": {n: g.cpu() for n, g in grads_ref.items()},
                        "grads": {n: g.cpu() for n, g in grads.items()}})  # fmt: skip
    return results


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_graph_steps_under_ddp_match_ddp(tmp_path):
    """Two ranks, each its own rows: a replay on the unwrapped model plus ``average_gradients`` gives DDP's loss
    (x world size, as the Trainer scales it) and DDP's averaged gradients, at capture and at a later replay."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_graph_worker, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for got in ranks:
        assert got["failed"] is None and got["lengths"] == [512]
        for step in got["results"]:
            torch.testing.assert_close(step["loss"], step["loss_ref"], atol=1e-2, rtol=0)
            for name, grad in step["grads_ref"].items():
                assert grad.abs().max() > 0, name
                torch.testing.assert_close(step["grads"][name], grad, atol=3e-2 * grad.abs().max().item(), rtol=0)
    for name, grad in ranks[0]["results"][1]["grads"].items():  # averaged: the ranks hold the same gradients
        torch.testing.assert_close(ranks[1]["results"][1]["grads"][name], grad)


def _gpu_pack():
    """The tiny model in bf16 on the GPU with varlen attention, and a pack of two adapters of different ranks and
    targets (dropout 0: eager and replayed steps compute the same), their B drawn so that every slot has a delta."""
    from src import modeling
    from src.config import validate
    from src.packs import model as pack_model
    from tests.conftest import compose_config
    from tests.unit.packs.test_engine import draw_bank

    cfgs = []
    for lora in (["lora=all_linear", "lora.r=4"], ["lora=attn_qv", "lora.r=8", "lora.alpha=32"]):
        raw = compose_config(["data=instructions", "lora.dropout=0.0", *lora])
        raw["output_dir"] = "unused"
        cfgs.append(validate(raw, for_training=True))
    tokenizer = modeling.load_tokenizer(cfgs[0].model)
    model = modeling.load_model(cfgs[0].model, cfgs[0].quant, "sft", None, tokenizer.pad_token_id, False)
    model = model.to("cuda", torch.bfloat16)
    assert fast_attention.use_varlen_attention(model)
    pack = pack_model.build_pack(model, [c.lora for c in cfgs], "sft", [0, 0])
    pack.bank.compute_dtype = torch.bfloat16
    for adapter in pack.adapters:
        pack.join(adapter)
    draw_bank(pack)
    return pack


def _slot_row(slot: int, lengths: list[int], seed: int):
    from src.packs import engine

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (1, sum(lengths)), generator=generator)
    labels = ids.clone()
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    bounds = tuple(int(sum(lengths[:i])) for i in range(len(lengths) + 1))
    for start in bounds[:-1]:
        labels[0, start] = -100
    return engine.SlotRow(slot, ids, positions, labels, bounds, int((labels != -100).sum()))


def test_pack_joint_steps_replayed_as_cuda_graphs_match_eager_joint_steps():
    """The pack's SFT joint step as a CUDA graph gives the eager step's losses and adds the eager step's gradient to
    the bank's, for every slot: the first shape's first step (eager, then captured), its replays on new rows, and a
    later shape's first step (captured, then replayed at once, with no eager warm-up)."""
    from src.packs import engine
    from src.packs.graphs import JointGraphs
    from src.packs.model import attention_inputs

    pack = _gpu_pack()
    bank = pack.bank
    graphs = JointGraphs(pack.model, bank, pad_token_id=0, max_examples=3)
    autocast = lambda: torch.autocast("cuda", torch.bfloat16)  # noqa: E731  the trainers' compute context

    def eager(rows, length, counts):
        joint = engine.joint_inputs(rows, length, 0)
        extra = attention_inputs("varlen", joint["bounds"], "cuda")
        ids, positions = joint["input_ids"].cuda(), joint["position_ids"].cuda()
        bank.weights.grad.zero_()
        with engine.active(engine.joint_step(bank, [0, 1], length)):
            with autocast():
                logits = pack.model(input_ids=ids, position_ids=positions, use_cache=False, **extra).logits
            losses = engine.slot_losses(logits, joint["shift_labels"], counts)
            losses.sum().backward()
        return losses.detach().float(), bank.weights.grad.clone()

    bank.weights.grad = torch.zeros_like(bank.weights)
    steps = [  # (slot 0's examples, slot 1's): 128-token rows twice (warmed up and captured, then replayed), then
        # 64-token rows (captured and replayed)
        ([40, 50, 20], [90, 30]),
        ([100, 10], [25, 25, 60]),
        ([30, 20], [50]),
    ]
    for seed, (first, second) in enumerate(steps):
        rows = [_slot_row(0, first, seed), _slot_row(1, second, seed + 10)]
        length = engine.padded_length(rows, 64)
        counts = torch.tensor([float(r.count) for r in rows], device="cuda")
        losses_ref, grad_ref = eager(rows, length, counts)
        bank.weights.grad.zero_()
        losses = graphs.step(rows, length, counts, autocast)
        assert losses is not None, graphs.failed
        torch.testing.assert_close(losses.float(), losses_ref, atol=1e-2, rtol=0)
        for slot in range(2):
            scale = grad_ref[slot].abs().max().item()
            assert scale > 0
            torch.testing.assert_close(bank.weights.grad[slot], grad_ref[slot], atol=3e-2 * scale, rtol=0)
    assert graphs.failed is None and len(graphs.graphs) == 2 and graphs.replays == 2
    # a replay accumulates: two replays of one row without zeroing give twice its gradient
    rows = [_slot_row(0, [30, 20], 2), _slot_row(1, [50], 12)]
    counts = torch.tensor([float(r.count) for r in rows], device="cuda")
    bank.weights.grad.zero_()
    graphs.step(rows, 64, counts, autocast)
    once = bank.weights.grad.clone()
    graphs.step(rows, 64, counts, autocast)
    torch.testing.assert_close(bank.weights.grad, 2 * once, atol=1e-6, rtol=1e-5)
    assert graphs.replays == 4
