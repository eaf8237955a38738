"""src.bench's classification workloads (benchmarks/classification.py) on CPU, on 2-layer models.

The numbers mean nothing on a CPU; the code paths are the GPU run's: each seed recipe written out as its tutorial
wrote it, and the project's packed classifier planned from the rows' token counts (at a 1 GiB budget: a CPU run
has none of its own). In-process, on 16 examples: about 10 s.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import classification as cls
from benchmarks import sft as bench
from benchmarks.workloads import WORKLOADS


def test_the_workloads_are_the_seed_recipes():
    seed000 = cls.classifier_config(WORKLOADS["mistral7b-4bit-multilabel"], "unused", "cuda")
    assert (seed000.lora.r, seed000.lora.alpha, seed000.lora.preset, seed000.quant.bits) == (16, 8, "attn", 4)
    assert len(cls.label_names(seed000)) == 6 and seed000.data.pos_weight == "one_minus_share"
    assert (seed000.train.learning_rate, seed000.train.weight_decay, seed000.train.bf16) == (1e-4, 0.01, False)
    seed001 = cls.classifier_config(WORKLOADS["bert-large-4bit-cls"], "unused", "cuda")
    lora = seed001.lora
    assert (lora.r, lora.alpha, lora.bias, lora.preset) == (32, 64, "all", "all_but_head")
    batch = (seed001.train.per_device_train_batch_size, seed001.train.gradient_accumulation_steps)
    assert batch == (8, 8) and seed001.train.optim == "paged_adamw_8bit" and len(cls.label_names(seed001)) == 5
    short = cls.classifier_config(WORKLOADS["w3b-4bit-cls-short"], "unused", "cuda")
    assert short.lora.preset == "all_linear" and short.train.bf16 and short.train.optim == "paged_adamw_8bit"
    assert WORKLOADS["w3b-4bit-cls-short"].lengths == (10, 60)


def test_synthetic_labels_and_seed_000s_pos_weight():
    labels = cls.synthetic_labels(200, 6, multilabel=True)
    assert all(sum(row) >= 1 for row in labels) and {v for row in labels for v in row} == {0.0, 1.0}
    cfg = cls.classifier_config(WORKLOADS["mistral7b-4bit-multilabel"], "unused", "cpu")
    positives = [sum(row[j] for row in labels) for j in range(6)]
    expected = [1 - p / sum(positives) for p in positives]  # 1 - labels.sum(0) / labels.sum()
    assert cls.label_weights(cfg, labels) == pytest.approx(expected)
    classes = cls.synthetic_labels(200, 5, multilabel=False)
    assert set(classes) == set(range(5))
    bert = cls.classifier_config(WORKLOADS["bert-large-4bit-cls"], "unused", "cpu")
    assert cls.label_weights(bert, classes) is None  # seed 001: plain cross-entropy


def test_the_classification_workloads_run_on_cpu(tmp_path):
    runs = []
    for names, extra in (("tiny-cls,tiny-multilabel", []), ("tiny-bert-cls", ["--variants", "length-grouped"])):
        out = tmp_path / f"{names}.json"
        argv = ["--device", "cpu", "--workload", names, "--examples", "16", "--budgets", "1", *extra]
        assert bench.main([*argv, "--model-dir", str(tmp_path / "models"), "--json", str(out)]) == 0
        runs += json.loads(out.read_text())["runs"]
    by_name = {run["workload"]: run for run in runs}
    assert set(by_name) == {"tiny-cls", "tiny-multilabel", "tiny-bert-cls"}
    for run in runs:
        seed, fast, *variants = run["sides"]
        assert (seed["side"], fast["side"]) == ("seed", "fast") and fast["budget_gb"] == 1.0
        for side in run["sides"]:  # every example trained on once, each real token counted once
            assert side["tokens"] == run["dataset_tokens"] and side["tokens_per_s"] > 0
        assert fast["ratio_over_seed"] == pytest.approx(fast["tokens_per_s"] / seed["tokens_per_s"])
        assert seed["est_peak_gpu_mem_gb"] > 0 and seed["settings"]["checkpointed"] == "all"
        # planned for the longest examples together: no micro-batch seen held more
        assert fast["est_peak_gpu_mem_gb"] >= fast["observed_est_peak_gpu_mem_gb"] > 0
        assert fast["max_micro_batch_tokens"] == fast["max_micro_batch_rows_x_len"]  # packed: no padding
    assert by_name["tiny-cls"]["sides"][1]["settings"]["attention"] == "per-example"
    bert_seed, bert_fast, grouped = by_name["tiny-bert-cls"]["sides"]
    assert bert_fast["settings"]["attention"] == "bidirectional"
    assert bert_seed["settings"]["gradient_accumulation_steps"] == 8  # seed 001's 8 x 8 ...
    assert (bert_fast["settings"]["micro_batch_size"], bert_fast["settings"]["gradient_accumulation_steps"]) == (64, 1)
    assert grouped["settings"]["variant"] == "length-grouped" and grouped["settings"]["attention"] == "padded"
    assert grouped["max_micro_batch_rows_x_len"] >= grouped["max_micro_batch_tokens"]
