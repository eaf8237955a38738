"""src.memory and python -m src.plan: exact parameter counts from a config-only model, and the peak-memory estimate.

The OpenLLaMA-3B architecture is written as a bare config.json (no weights) and built on the
meta device, so these run in seconds on CPU.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from src import memory as M
from src import plan as cli
from src.config import CONF_DIR, compose, validate
from tests.conftest import OPENLLAMA_3B, SMALL_ENCODER, run_module

ROOT = CONF_DIR.parent
OPENLLAMA_3B_PARAMS = 3_426_473_600


@pytest.fixture(scope="module")
def openllama_dir(random_checkpoint):
    path = random_checkpoint("llama", **OPENLLAMA_3B)
    assert [p.name for p in path.iterdir()] == ["config.json"]
    return path


def plan_for(overrides: list[str]) -> M.MemoryPlan:
    return M.plan(validate(compose(overrides)))


def openllama(path, *overrides: str) -> list[str]:
    return ["model=openllama3b", f"model.name_or_path={path}", "data=red_dot", *overrides]


@pytest.fixture(scope="module")
def qlora_attn_qv(openllama_dir) -> M.MemoryPlan:
    """The seeds' QLoRA recipe (train=gpu: batch 8, checkpointing, paged 8-bit AdamW) with attn_qv r=8."""
    return plan_for(openllama(openllama_dir, "quant=4bit", "lora=attn_qv", "train=gpu"))


def test_counts_attn_qv_r8(qlora_attn_qv):
    assert qlora_attn_qv.trainable_params == 2_662_400
    assert qlora_attn_qv.total_params == OPENLLAMA_3B_PARAMS + 2_662_400
    assert qlora_attn_qv.lora_resolved_targets == "q_proj,v_proj"


def test_counts_attn_qv_r16(openllama_dir):
    assert plan_for(openllama(openllama_dir, "lora=attn_qv", "lora.r=16")).trainable_params == 5_324_800


def test_counts_all_linear_with_lm_head_8bit(openllama_dir):
    overrides = openllama(openllama_dir, "quant=8bit", "lora=all_linear", "lora.target_modules=[all_linear,lm_head]")
    result = plan_for(overrides)
    assert result.trainable_params == 12_994_560
    assert result.quant_bits == 8


def test_plan_matches_the_estimate_function(qlora_attn_qv):
    shape = qlora_attn_qv.model_shape
    assert shape.quantizable_params == OPENLLAMA_3B_PARAMS - 2 * 32000 * 3200 - 53 * 3200  # embed, head, norms
    # train=gpu on SFT data: batch 8, seq 512, on the fast path (the default), which trains the 4-bit base with its
    # weights in bf16: a 2-byte residual stream (src.plan.activation_widths).
    est = _estimate(shape, fused_lm_head=qlora_attn_qv.fused_lm_head, widths=M.Widths(residual=2, matmul=2))
    assert qlora_attn_qv.est_peak_gpu_mem_gb == pytest.approx(est, abs=1e-3)
    assert qlora_attn_qv.est_mem_breakdown_gb.total == pytest.approx(est, abs=5e-3)
    assert qlora_attn_qv.est_gpu_mem_needed_gb > qlora_attn_qv.est_peak_gpu_mem_gb


# Peak torch.cuda.max_memory_allocated (GiB) of 4 training steps on an H100, OpenLLaMA-3B shape with random
# weights, seq 512, lora r=8 dropout 0.05, bf16, paged_adamw_8bit (transformers 5.23, peft 0.21, trl 1.16,
# bitsandbytes 0.50); SFT through TRL's fused LM head, or (unfused) the model's own loss as the fast path
# takes it: (bits, task, lora in_features, trainable, batch, checkpointing, fused, measured).
ATTN_QV, ALL_LINEAR = 26 * 2 * 3200, 26 * (6 * 3200 + 8640)
H100_PEAKS = [
    (4, "sft", ALL_LINEAR, 12_712_960, 8, True, True, 5.001),
    (4, "sft", ALL_LINEAR, 12_712_960, 4, False, True, 14.775),
    (4, "sft", ATTN_QV, 2_662_400, 16, True, True, 7.058),
    (16, "sft", ATTN_QV, 2_662_400, 4, False, True, 12.867),
    (16, "sft", ATTN_QV, 2_662_400, 16, True, True, 9.123),
    (8, "sft", ATTN_QV, 2_662_400, 8, True, True, 16.213),
    (4, "sft", ATTN_QV, 2_662_400, 8, True, False, 5.365),
    (4, "sft", ATTN_QV, 2_662_400, 16, True, False, 8.148),
    (4, "sft", ATTN_QV, 2_662_400, 4, False, False, 12.055),
    (16, "sft", ATTN_QV, 2_662_400, 4, False, False, 13.425),
    (4, "classification", ATTN_QV, 2_668_800, 16, True, True, 6.685),
]


@pytest.mark.parametrize(("bits", "task", "lora_in", "trainable", "batch", "ckpt", "fused", "measured"), H100_PEAKS)
def test_estimate_reproduces_h100_measurements(
    qlora_attn_qv, bits, task, lora_in, trainable, batch, ckpt, fused, measured
):
    shape = qlora_attn_qv.model_shape
    if task != "sft":  # a 2-label score head instead of the LM head
        shape = dataclasses.replace(shape, num_params=shape.num_params - 32000 * 3200 + 2 * 3200)
    est = M.estimate_peak_memory_gb(
        shape,
        M.LoraShape(in_features=lora_in, dropout=True),
        trainable,
        batch_size=batch,
        seq_len=512,
        bits=bits,
        double_quant=True,
        weight_dtype_bytes=2,
        widths=M.Widths(residual=2 if bits == 16 else 4, matmul=2),
        optim="paged_adamw_8bit",
        activation_checkpointing=ckpt,
        causal_lm=task == "sft",
        fused_lm_head=fused,
    )
    assert est == pytest.approx(measured, rel=0.05)


def _estimate(shape: M.ModelShape, **changes) -> float:
    kwargs = dict(
        batch_size=8,
        seq_len=512,
        bits=4,
        double_quant=True,
        weight_dtype_bytes=2,
        widths=M.Widths(residual=4, matmul=2),
        optim="paged_adamw_8bit",
        activation_checkpointing=True,
        causal_lm=True,
        fused_lm_head=True,
    )
    kwargs.update(changes)
    return M.estimate_peak_memory_gb(shape, M.LoraShape(in_features=ATTN_QV, dropout=True), 2_662_400, **kwargs)


def test_estimate_is_monotonic_in_batch_and_sequence(qlora_attn_qv):
    shape = qlora_attn_qv.model_shape
    for ckpt in (True, False):
        by_batch = [_estimate(shape, batch_size=b, activation_checkpointing=ckpt) for b in (1, 2, 4, 8, 16, 32)]
        by_seq = [_estimate(shape, seq_len=s, activation_checkpointing=ckpt) for s in (128, 256, 512, 1024, 2048)]
        assert by_batch == sorted(set(by_batch))
        assert by_seq == sorted(set(by_seq))


def test_estimate_smaller_with_4bit_and_with_checkpointing(qlora_attn_qv):
    shape = qlora_attn_qv.model_shape
    half = M.Widths(residual=2, matmul=2)
    for batch in (1, 8, 16):
        assert _estimate(shape, batch_size=batch) < _estimate(shape, batch_size=batch, bits=16, widths=half)
        assert _estimate(shape, batch_size=batch) < _estimate(shape, batch_size=batch, bits=8)
        for bits in (4, 8, 16):
            assert _estimate(shape, batch_size=batch, bits=bits) < _estimate(
                shape, batch_size=batch, bits=bits, activation_checkpointing=False
            )
    weights = {
        bits: M.memory_breakdown_gb(
            shape,
            M.LoraShape(ATTN_QV, True),
            0,
            batch_size=1,
            seq_len=8,
            bits=bits,
            double_quant=True,
            weight_dtype_bytes=2,
            widths=half,
            optim="sgd",
            activation_checkpointing=True,
            causal_lm=True,
        ).weights
        for bits in (4, 8, 16)
    }
    assert weights[4] < weights[8] < weights[16]
    assert weights[16] == pytest.approx(OPENLLAMA_3B_PARAMS * 2 / 2**30)
    # A k-bit base trains with an fp32 residual stream (peft upcasts norms and embeddings), so at large
    # batches QLoRA's activations outgrow the 4 GiB its weights save: measured on the H100 too.
    assert _estimate(shape, batch_size=64) > _estimate(shape, batch_size=64, bits=16, widths=half)


def test_materialized_logits_cost_batch_seq_vocab(qlora_attn_qv):
    shape = qlora_attn_qv.model_shape
    for ckpt, factor in ((False, M.LOSS_LOGITS_FACTOR), (True, M.LOSS_LOGITS_FACTOR_CKPT)):
        unfused = _estimate(shape, fused_lm_head=False, activation_checkpointing=ckpt)
        logits = unfused - _estimate(shape, activation_checkpointing=ckpt)
        assert logits == pytest.approx(8 * 512 * 32000 * M.LOGITS_BYTES * factor / 2**30)


def test_the_fused_loss_holds_one_chunk_of_logits_whatever_the_tokens(qlora_attn_qv):
    """train.fused_loss: 2,048 tokens' logits of a 32k vocabulary at a time, so a step of 4,096 tokens or of 16,384
    holds the same; under the materialized loss they grow with the tokens."""
    shape = qlora_attn_qv.model_shape
    chunk = 2048 * 32000 * M.FUSED_LOSS_BYTES_PER_LOGIT / 2**30
    for batch in (8, 32):  # no checkpointing, as on the fast path: the materialized loss is 9 bytes a logit
        fused = _estimate(shape, batch_size=batch, fused_lm_head=False, fused_loss=True, activation_checkpointing=False)
        assert fused - _estimate(shape, batch_size=batch, activation_checkpointing=False) == pytest.approx(chunk)
        assert fused < _estimate(shape, batch_size=batch, fused_lm_head=False, activation_checkpointing=False)
    assert _estimate(shape, batch_size=1, seq_len=100, fused_loss=True, fused_lm_head=False) == pytest.approx(
        _estimate(shape, batch_size=1, seq_len=100) + 100 * 32000 * M.FUSED_LOSS_BYTES_PER_LOGIT / 2**30
    )


def test_optimizer_state_bytes():
    assert M.optimizer_state_bytes("adamw_torch") == 8
    assert M.optimizer_state_bytes("paged_adamw_8bit") == 2
    assert M.optimizer_state_bytes("adamw_bnb_8bit") == 2
    assert M.optimizer_state_bytes("paged_adamw_32bit") == 8
    assert M.optimizer_state_bytes("sgd") == 0


def test_missing_config_dir_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert cli.main(["model=openllama3b", f"model.name_or_path={missing}", "data=red_dot"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "config.json" in err

    assert cli.main(["model=openllama3b", f"model.name_or_path={tmp_path}", "data=red_dot"]) == 2
    assert f"{tmp_path} has no config.json" in capsys.readouterr().err


def test_uncached_hub_id_asks_for_a_local_dir(capsys):
    assert cli.main(["model=openllama3b", "model.name_or_path=nobody-here/not-a-cached-model", "data=red_dot"]) == 2
    err = capsys.readouterr().err
    assert "nobody-here/not-a-cached-model" in err and "never downloads" in err and "config.json" in err


def test_invalid_config_lists_problems(capsys):
    assert cli.main(["lora.r=0", "train.learning_rate=-1"]) == 2
    err = capsys.readouterr().err
    assert "lora.r" in err and "train.learning_rate" in err


@pytest.mark.parametrize(
    ("overrides", "num_labels", "warned"),
    [
        ([], 2, True),  # bundled topics: labels come from the data
        (["data.labels=[a,b,c]"], 3, False),
        (["data=topics_multilabel"], 4, False),
    ],
)
def test_classification_on_tiny_counts_like_the_loaded_model(overrides, num_labels, warned):
    from src import modeling

    cfg = validate(compose(["model=tiny", *overrides]))
    result = M.plan(cfg)
    assert result.architecture == "LlamaForSequenceClassification"
    assert result.num_labels == num_labels
    assert bool(result.warnings) == warned
    # LoRA on q (128->128) and v (128->64) in 2 layers at r=8, plus the trained score head.
    assert result.trainable_params == 2 * (8 * (128 + 128) + 8 * (128 + 64)) + 128 * num_labels

    tokenizer = modeling.load_tokenizer(cfg.model)
    model = modeling.load_model(
        cfg.model, cfg.quant, cfg.data.task, [str(i) for i in range(num_labels)], tokenizer.pad_token_id
    )
    model = modeling.apply_lora(model, cfg.lora, cfg.data.task)
    assert (result.trainable_params, result.total_params) == modeling.count_params(model)


def test_the_command_line_reads_a_local_label_set(capsys):
    """plan() reads no data (sweeps call it per job); the command reads the bundled topics' 3 labels."""
    assert cli.main(["model=tiny"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_labels"] == 3 and result["warnings"] == []
    assert result["trainable_params"] == 2 * (8 * (128 + 128) + 8 * (128 + 64)) + 128 * 3


def test_sweep_config_plans_its_base_config(tmp_path):
    (tmp_path / "seed_table.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - config\n  - override /lora: all_linear\n  - _self_\n"
        f"hydra:\n  searchpath: [file://{ROOT / 'conf'}]\n  mode: MULTIRUN\n"
        "  sweeper:\n    params:\n      lora.r: 4,8\n"
        "lora:\n  r: 4\n"
    )
    result = M.plan(validate(compose([], config_dir=tmp_path, config_name="seed_table")))
    assert (result.lora_preset, result.lora_r) == ("all_linear", 4)
    # all 7 linear layers of 2 blocks at r=4, plus the score head
    per_block = sum(
        4 * (i + o) for i, o in [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256), (128, 256), (256, 128)]
    )
    assert result.trainable_params == 2 * per_block + 128 * 2


def test_fast_path_sft_under_a_quantized_base_has_a_bf16_residual_stream(openllama_dir):
    from src.memory import activation_widths

    def widths(*overrides):
        return activation_widths(validate(compose(openllama(openllama_dir, *overrides))))

    assert widths("quant=4bit", "train=gpu") == M.Widths(residual=2, matmul=2)  # fast path: weights cast to bf16
    assert widths("quant=8bit", "train=gpu") == M.Widths(residual=2, matmul=2)
    assert widths("quant=4bit", "train=gpu", "train.fast_path=false") == M.Widths(residual=4, matmul=2)  # seeds'
    assert widths("quant=none", "train=gpu") == M.Widths(residual=2, matmul=2)  # model.dtype bf16


def test_a_packed_decoder_classifier_has_a_bf16_residual_stream_and_an_encoder_does_not(
    openllama_dir, random_checkpoint
):
    from src.memory import activation_widths

    def widths(*overrides):
        return activation_widths(validate(compose([*overrides, "data=topics", "quant=4bit", "train=gpu"])))

    decoder = ["model=openllama3b", f"model.name_or_path={openllama_dir}"]
    assert widths(*decoder) == M.Widths(residual=2, matmul=2)  # packed: its frozen weights cast to bf16
    assert widths(*decoder, "train.fast_path=false") == M.Widths(residual=4, matmul=2)  # padded: fp32 norms
    bert = random_checkpoint("bert", **SMALL_ENCODER)
    # BERT packs too, but autocast runs its LayerNorm (the end of every residual add) in fp32
    assert widths("model=bert_large", f"model.name_or_path={bert}") == M.Widths(residual=4, matmul=2)


def test_a_packed_micro_batch_is_planned_for_its_tokens(openllama_dir):
    cfg = validate(compose(openllama(openllama_dir, "data=topics", "quant=4bit", "train=gpu")))
    padded = M.plan(cfg)  # 8 x model.max_length (512) tokens
    packed = M.plan(cfg, tokens_per_micro_batch=8 * 66)  # 8 sentences of SST-2's ~66 tokens
    one_row = M.plan(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_length=8 * 66)))
    activations = {k: r.est_mem_breakdown_gb.activations for k, r in (("padded", padded), ("packed", packed))}
    assert packed.tokens_per_micro_batch == 528 and padded.tokens_per_micro_batch is None
    # the same as 8 rows of 66 tokens: activations scale with the tokens, the rest stays
    assert packed.est_mem_breakdown_gb.activations == pytest.approx(
        one_row.est_mem_breakdown_gb.activations / 8, rel=1e-3
    )
    assert activations["packed"] == pytest.approx(activations["padded"] * 528 / 4096, rel=1e-3)
    for part in ("weights", "trainable_states"):
        assert getattr(packed.est_mem_breakdown_gb, part) == getattr(padded.est_mem_breakdown_gb, part)
    assert packed.trainable_params == padded.trainable_params


def test_which_configs_plan_their_own_micro_batches(openllama_dir, random_checkpoint, tmp_path):
    checkpoints = {name: random_checkpoint(name, **SMALL_ENCODER) for name in ("bert", "roberta")}

    def packs(*overrides):
        return M.plans_own_micro_batches(validate(compose([*overrides, "train=gpu"])))

    decoder = ["model=openllama3b", f"model.name_or_path={openllama_dir}"]
    assert packs(*decoder, "data=red_dot") and packs(*decoder, "data=topics")
    assert not packs(*decoder, "data=topics", "train.fast_path=false")
    assert packs("model=bert_large", f"model.name_or_path={checkpoints['bert']}", "data=topics")
    assert not packs("model=bert_large", f"model.name_or_path={checkpoints['roberta']}", "data=topics")  # stays padded
    assert not packs("model=bert_large", f"model.name_or_path={tmp_path / 'absent'}", "data=topics")  # unreadable


def test_a_micro_batch_is_planned_for_the_largest_of_many_shuffles_never_above_its_longest_examples():
    import numpy as np

    from src.engine.budget import largest_micro_batch_tokens

    lengths = [5, 60, 12, 33, 7, 60, 2]
    tokens = largest_micro_batch_tokens(lengths)
    assert [tokens(n) for n in (1, 7, 50)] == [60, 179, 179]  # the longest; all of them
    assert all(tokens(n) <= top for n, top in ((2, 120), (3, 153)))  # never above the n longest together
    # seed 001's shape: 2,048 spoken commands of 6-24 tokens, 64 a step. The 64 longest hold 1,536 tokens; a
    # shuffled micro-batch holds ~960, and none of 20 other shuffled epochs holds more than the plan's.
    rng = np.random.default_rng(1)
    commands = rng.integers(6, 25, 2048)
    planned = largest_micro_batch_tokens(commands.tolist())(64)
    assert 15 * 64 < planned < 0.8 * 1536
    for _ in range(20):
        assert commands[rng.permutation(2048)].reshape(-1, 64).sum(1).max() <= planned
    # a run of 10 epochs is planned over 10 times as many shuffles: never for fewer tokens
    assert largest_micro_batch_tokens(commands.tolist(), epochs=10)(64) >= planned


def test_a_pack_plans_the_base_once_and_every_trial_s_adapter(openllama_dir, capsys):
    """``src.plan --pack``: W3B 4-bit with q,v r=8 and all linear r=16 as one pack: the base's weights once, and two
    bank slots each as large as the larger adapter (with its optimizer states)."""
    common = openllama(openllama_dir, "quant=4bit", "train=gpu")
    trials = ["lora=attn_qv lora.r=8", "lora=all_linear lora.r=16"]
    assert cli.main([*common, *(arg for t in trials for arg in ("--pack", t))]) == 0
    pack = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    solo = [plan_for([*common, *t.split()]) for t in trials]
    shared = [s.est_mem_breakdown_gb.shared for s in solo]
    assert shared[0] == pytest.approx(shared[1])  # the same base
    states = [s.est_mem_breakdown_gb.trainable_states for s in solo]
    expected = sum(s.est_peak_gpu_mem_gb for s in solo) - shared[0] + (max(states) - min(states))
    assert pack["pack_size"] == 2
    assert pack["est_peak_gpu_mem_gb"] == pytest.approx(expected, abs=2e-3)
    assert pack["est_solo_sum_gb"] == pytest.approx(sum(s.est_peak_gpu_mem_gb for s in solo), abs=2e-3)
    assert pack["est_peak_gpu_mem_gb"] < pack["est_solo_sum_gb"] - 1.5  # a 4-bit W3B base is ~2 GiB


def test_a_sweep_with_rows_plans_each_row(openllama_dir, capsys):
    """``src.plan -cd sweeps -cn seed_table`` plans the table's four rows, as its jobs train them, not its base: the
    trainable parameters its header lists, row 4 on the 8-bit base."""
    assert cli.main(["-cd", str(ROOT / "sweeps"), "-cn", "seed_table", f"model.name_or_path={openllama_dir}"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{")]
    assert [r["trainable_params"] for r in rows] == [2_662_400, 5_324_800, 12_994_560, 12_994_560]
    assert [r["quant_bits"] for r in rows] == [4, 4, 4, 8]
    assert [line for line in out if line.startswith("--- row ")] == [
        "--- row 1/4: lora=attn_qv lora.r=8 quant=4bit",
        "--- row 2/4: lora=attn_qv lora.r=16 quant=4bit",
        "--- row 3/4: lora=all_linear lora.target_modules=[all_linear,lm_head] lora.r=8 quant=4bit",
        "--- row 4/4: lora=all_linear lora.target_modules=[all_linear,lm_head] lora.r=8 quant=8bit",
    ]


PLAN_KEYS = [
    "model",
    "architecture",
    "task",
    "num_labels",
    "quant_bits",
    "lora_preset",
    "lora_r",
    "lora_resolved_targets",
    "trainable_params",
    "total_params",
    "base_params",
    "trainable_pct",
    "batch_size",
    "seq_len",
    "tokens_per_micro_batch",
    "optim",
    "activation_checkpointing",
    "fused_lm_head",
    "fused_loss",
    "est_peak_gpu_mem_gb",
    "est_gpu_mem_needed_gb",
    "est_mem_breakdown_gb",
    "model_shape",
    "warnings",
    "quant_fp8",
]


def test_the_json_line_is_the_plan_field_by_field(capsys):
    """The command's last line: every field of plan()'s MemoryPlan under its name, in order, nested ones as objects."""
    assert cli.main(["model=tiny", "data=instructions", "train.fast_path=false"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(line) == PLAN_KEYS
    result = M.plan(validate(compose(["model=tiny", "data=instructions", "train.fast_path=false"])))
    assert line["est_mem_breakdown_gb"] == dataclasses.asdict(result.est_mem_breakdown_gb)
    assert M.ModelShape(**line["model_shape"]) == result.model_shape
    assert (line["trainable_params"], line["fused_lm_head"], line["warnings"]) == (result.trainable_params, True, [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.trainable_params = 0


def test_the_plan_reads_fast_path_from_the_config():
    """train.fast_path (true in conf/train/default.yaml) decides the SFT loss: the model's own, or TRL's fused head."""
    fast, plain = (M.plan(validate(compose(["data=instructions", *more]))) for more in ([], ["train.fast_path=false"]))
    assert (fast.fused_lm_head, plain.fused_lm_head) == (False, True)
    assert fast.est_mem_breakdown_gb.logits > 0 == plain.est_mem_breakdown_gb.logits
    # train.fused_loss: the fast path's chunked loss, where the model's head takes it (the tiny Llama's does)
    fused = M.plan(validate(compose(["data=instructions", "train.fused_loss=true"])))
    assert (fused.fused_lm_head, fused.fused_loss, fast.fused_loss, plain.fused_loss) == (False, True, False, False)
    tokens = fused.batch_size * fused.seq_len
    assert fused.est_mem_breakdown_gb.logits == pytest.approx(M.fused_loss_gb(fused.model_shape, tokens), abs=1e-3)
    assert "fused loss" in cli.format_plan_table(fused)
    # DDP's forward must run (the fused loss bypasses it), and a pack's joint step takes its own loss: not there
    ddp = M.plan(validate(compose(["data=instructions", "train.fused_loss=true", "train.nproc_per_node=2"])))
    assert not ddp.fused_loss and ddp.est_mem_breakdown_gb.logits == fast.est_mem_breakdown_gb.logits
    pack = M.plan_pack([validate(compose(["data=instructions", "train.fused_loss=true"]))] * 2)
    assert not any(t.fused_loss for t in pack.trials)


def test_the_budget_is_resolved_once_with_its_margin(monkeypatch):
    from src.engine import budget

    assert budget.resolve_budget(10.0) == pytest.approx(10.0 * budget.PLAN_MARGIN)
    monkeypatch.setattr(budget, "default_budget_gb", lambda: None)  # no GPU: no budget
    assert budget.resolve_budget(None) is None
    monkeypatch.setattr(budget, "default_budget_gb", lambda: 72.0)  # 90% of an 80 GiB card
    assert budget.resolve_budget(None) == pytest.approx(72.0 * budget.PLAN_MARGIN)


def _tiny_pack_cfgs(budget_gb: float, *loras: list[str]):
    from src import modeling
    from src.packs import model as pack_model

    cfgs = []
    for lora in loras:
        raw = compose(["data=instructions", f"train.memory_budget_gb={budget_gb}", *lora])
        raw["output_dir"] = "unused"
        cfgs.append(validate(raw, for_training=True))
    tokenizer = modeling.load_tokenizer(cfgs[0].model)
    model = modeling.load_model(cfgs[0].model, cfgs[0].quant, "sft", None, tokenizer.pad_token_id, False)
    return cfgs, pack_model.build_pack(model, [c.lora for c in cfgs], "sft", [0] * len(cfgs))


LORAS = (["lora=attn_qv"], ["lora=all_linear", "lora.r=4"], ["lora=attn_qv", "lora.r=16"])


def test_a_pack_plans_one_micro_batch_size_and_no_checkpointing_where_it_fits():
    """Room for the pack's trials with no layer checkpointed: the largest micro-batch size that fits (all trials
    alike), no checkpointing, and the pack's estimate (one base, K slots of the largest adapter, K trials'
    activations) within the margined budget."""
    from src.engine import budget
    from src.packs import model as pack_model

    generous = 1.0
    cfgs, pack = _tiny_pack_cfgs(generous, *LORAS)
    plans, note = pack_model.plan_pack_step(cfgs, pack.model, budget.resolve_budget(generous), slots=2)
    assert {p.checkpointed_layers for p in plans} == {0} and "checkpointing" not in note
    assert len({p.micro_batch_size for p in plans}) == 1
    size = plans[0].micro_batch_size
    breakdowns = [
        M.plan(
            c.with_train(per_device_train_batch_size=size, optim=budget.fast_optimizer(c.train.optim))
        ).est_mem_breakdown_gb
        for c in cfgs
    ]
    estimate = M.pack_estimate_gb(breakdowns, slots=2)
    assert plans[0].est_peak_gpu_mem_gb == pytest.approx(estimate)
    assert estimate <= budget.resolve_budget(generous)
    assert "pack of 3 trial(s) in 2 slot(s)" in note


def test_a_pack_checkpoints_only_where_one_example_a_trial_does_not_fit_and_says_why():
    from src.engine import budget
    from src.packs import model as pack_model

    tight = 0.01
    cfgs, pack = _tiny_pack_cfgs(tight, *LORAS)
    plans, note = pack_model.plan_pack_step(cfgs, pack.model, budget.resolve_budget(tight))
    assert plans[0].micro_batch_size == 1 and plans[0].checkpointed_layers > 0
    assert "activation checkpointing" in note and "even one example a trial needs" in note


def test_a_pack_s_estimate_counts_its_slots_not_its_trials():
    """Six trials in two slots: the bank's two slots of the largest adapter, and the two largest activations."""
    cfgs, _ = _tiny_pack_cfgs(1.0, *LORAS, *LORAS)
    breakdowns = [M.plan(c).est_mem_breakdown_gb for c in cfgs]
    two = M.pack_estimate_gb(breakdowns, slots=2)
    six = M.pack_estimate_gb(breakdowns)
    shared = max(b.shared for b in breakdowns)
    largest = max(b.trainable_states for b in breakdowns)
    working = sorted((b.activations + b.logits for b in breakdowns), reverse=True)
    assert two == pytest.approx(shared + 2 * largest + sum(working[:2]))
    assert six == pytest.approx(shared + 6 * largest + sum(working)) and six > two


def test_cli_counts_qlora_all_linear_with_lm_head(openllama_dir):
    overrides = openllama(openllama_dir, "quant=4bit", "lora=all_linear", "lora.target_modules=[all_linear,lm_head]")
    proc = run_module(["src.plan", *overrides])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["trainable_params"] == 12_994_560
    assert result["base_params"] == OPENLLAMA_3B_PARAMS
    assert result["total_params"] == OPENLLAMA_3B_PARAMS + 12_994_560
    assert result["lora_resolved_targets"] == "down_proj,gate_proj,k_proj,lm_head,o_proj,q_proj,up_proj,v_proj"
    assert result["est_peak_gpu_mem_gb"] > 0
    assert any("lm_head" in w for w in result["warnings"])  # TRL's SFTTrainer refuses an adapter on the head
    assert any(line.startswith("trainable params") and "12,994,560" in line for line in lines[:-1])


def test_a_pack_takes_a_smaller_micro_batch_before_it_checkpoints_a_layer():
    """A budget between the estimates of the full micro-batch and a smaller one, both without checkpointing: the
    pack runs the smaller over more accumulation steps, no layer checkpointed (the run-alone planner would keep the
    full size and checkpoint; on an H100, W3B in a pack of 4 checkpointed 4 of 26 layers and cached 39 of 182
    layers' dequantized weights that way)."""
    from src.engine import budget
    from src.packs import model as pack_model

    cfgs, pack = _tiny_pack_cfgs(1.0, *LORAS)
    steps = cfgs[0].train.per_device_train_batch_size * cfgs[0].train.gradient_accumulation_steps
    assert steps >= 2

    def estimate(size: int) -> float:
        sized = [
            c.with_train(per_device_train_batch_size=size, optim=budget.fast_optimizer(c.train.optim)) for c in cfgs
        ]
        return M.pack_estimate_gb([M.plan(c).est_mem_breakdown_gb for c in sized])

    smaller = max(d for d in range(1, steps) if steps % d == 0)
    between = (estimate(smaller) + estimate(steps)) / 2
    assert estimate(smaller) < between < estimate(steps)
    plans, note = pack_model.plan_pack_step(cfgs, pack.model, between)
    assert {(p.micro_batch_size, p.gradient_accumulation_steps, p.checkpointed_layers) for p in plans} == {
        (smaller, steps // smaller, 0)
    }
    assert "checkpointing" not in note
    assert plan_micro_batches_would_checkpoint(steps, pack, between, cfgs)


def plan_micro_batches_would_checkpoint(steps: int, pack, budget_gb: float, cfgs) -> bool:
    """What the run-alone planner makes of the same budget: the full size, some layers checkpointed."""
    from src.engine import budget
    from src.packs.model import replace_train

    fast = [replace_train(c, optim=budget.fast_optimizer(c.train.optim)) for c in cfgs]

    def estimate(size: int, ckpt: bool) -> float:
        sized = [replace_train(c, per_device_train_batch_size=size, activation_checkpointing=ckpt) for c in fast]
        return M.pack_estimate_gb([M.plan(c).est_mem_breakdown_gb for c in sized])

    alone = budget.plan_micro_batches(steps, len(budget.decoder_layers(pack.model)), budget_gb, estimate)
    return alone.micro_batch_size == steps and alone.checkpointed_layers > 0


def test_an_fp8_base_is_a_byte_a_weight_with_the_rest_at_its_dtype(openllama_dir):
    """quant=fp8 (src/fp8.py) on OpenLLaMA-3B: the 182 decoder linears at a byte a weight plus an fp32 scale per row,
    the embeddings, norms and head at model.dtype (bf16: nothing upcast, unlike bitsandbytes' prepare step), and one
    transposed copy of the largest layer (up/gate/down, 3200 x 8640): 3.41 GiB, under LLM.int8's and the 16-bit
    base's."""

    def weights(quant: str) -> float:
        return plan_for(openllama(openllama_dir, f"quant={quant}", "lora=attn_qv")).est_mem_breakdown_gb.weights

    from src.plan import format_plan_table

    fp8_plan = plan_for(openllama(openllama_dir, "quant=fp8", "lora=attn_qv"))
    assert fp8_plan.quant_fp8 and "quantization         FP8 base" in format_plan_table(fp8_plan)
    shape = fp8_plan.model_shape
    assert (shape.quantizable_params, shape.quantizable_rows) == (3_221_504_000, 865_280)
    rest = OPENLLAMA_3B_PARAMS - shape.quantizable_params
    expected = shape.quantizable_params + 4 * shape.quantizable_rows + 2 * rest + 3200 * 8640
    assert weights("fp8") == pytest.approx(expected / 2**30, abs=1e-3) and round(weights("fp8"), 2) == 3.41
    assert weights("fp8") < weights("8bit") < weights("none")
