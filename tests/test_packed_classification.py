"""The classification fast path (src/fast/classification.py) against the padded path, on CPU in fp32.

Both sides run the same LoRA model on the same examples: padded (right padding, the model pools the last non-pad
token, HF's own forward) and packed (one row, per-example attention, each example pooled at its last token). The
per-example logits, the loss and every LoRA gradient agree within 1e-5. Dropout is 0: the two sides draw their
dropout masks over tensors of different shapes, so with dropout they agree only in distribution.
"""

from __future__ import annotations

import copy

import mlflow
import pytest
import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from src import modeling
from src.config import validate
from src.fast.classification import (
    PackedClassificationCollator,
    classification_loss,
    packed_logits,
    packing_attention,
)
from tests.conftest import compose_config, train_run

TOL = 1e-5
# Texts of very different lengths in one row: 2 to about 60 tokens.
TEXTS = [
    "goal",
    "the striker scored a late goal in the match and the referee looked on",
    "a new laptop",
    " ".join(["garlic pasta from the oven with spices and a dessert from the bakery"] * 5),
    "the drummer",
    "concert",
]


def _model(tiny_model_dir, num_labels: int, multilabel: bool):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir,
        num_labels=num_labels,
        problem_type="multi_label_classification" if multilabel else "single_label_classification",
        dtype=torch.float32,
    )
    lora = validate(compose_config(["lora=all_linear", "lora.dropout=0.0"])).lora
    model = modeling.apply_lora(base, lora, "classification")
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters an effect, so their gradients all flow
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize(
    ("num_labels", "multilabel", "weights"),
    [(2, False, None), (5, False, None), (5, False, [0.5, 1.0, 2.0, 1.0, 0.25]), (4, True, None), (4, True, [2.0] * 4)],
    ids=["binary", "multiclass", "class-weights", "multilabel", "pos-weight"],
)
def test_packed_and_padded_paths_agree_on_logits_loss_and_lora_gradients(
    tiny_model_dir, num_labels, multilabel, weights
):
    tokenizer = modeling.load_tokenizer(validate(compose_config([])).model)  # tiny: no pad token of its own
    assert tokenizer.pad_token == tokenizer.eos_token
    padded_model = _model(tiny_model_dir, num_labels, multilabel)
    padded_model.config.pad_token_id = tokenizer.pad_token_id
    packed_model = copy.deepcopy(padded_model)
    attention = packing_attention(packed_model)
    assert attention == "bounds"  # per-example sdpa on the CPU

    generator = torch.Generator().manual_seed(1)
    if multilabel:
        labels = torch.randint(0, 2, (len(TEXTS), num_labels), generator=generator).tolist()
    else:
        labels = torch.randint(0, num_labels, (len(TEXTS),), generator=generator).tolist()
    features = [{"input_ids": tokenizer(t)["input_ids"], "label": y} for t, y in zip(TEXTS, labels)]
    lengths = [len(f["input_ids"]) for f in features]
    assert min(lengths) <= 3 and max(lengths) >= 50, lengths
    weight_tensor = None if weights is None else torch.tensor(weights)

    padded = DataCollatorWithPadding(tokenizer)([{"input_ids": f["input_ids"]} for f in features])
    padded_logits = padded_model(**padded).logits
    target = torch.tensor(labels, dtype=torch.float32 if multilabel else torch.long)
    padded_loss = classification_loss(padded_logits, target, weight_tensor, multilabel)
    padded_loss.backward()

    batch = PackedClassificationCollator(multilabel)(features)
    assert batch["input_ids"].shape == (1, sum(lengths))  # no padding
    logits = packed_logits(packed_model, batch["input_ids"], batch["position_ids"], batch["last_token"], attention)
    loss = classification_loss(logits, batch["labels"], weight_tensor, multilabel)
    loss.backward()

    torch.testing.assert_close(logits, padded_logits, atol=TOL, rtol=TOL)
    torch.testing.assert_close(loss, padded_loss, atol=TOL, rtol=TOL)
    expected, got = _grads(padded_model), _grads(packed_model)
    assert set(got) == set(expected) and any("lora_A" in n for n in got) and any("score" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=TOL, rtol=1e-4, msg=name)


def test_an_example_never_attends_to_another_in_its_row(tiny_model_dir):
    """Changing the first example of a row leaves the logits of the others as they were."""
    tokenizer = modeling.load_tokenizer(validate(compose_config([])).model)
    model = _model(tiny_model_dir, 3, False)
    attention = packing_attention(model)
    collate = PackedClassificationCollator(False)

    def logits(texts):
        batch = collate([{"input_ids": tokenizer(t)["input_ids"], "label": 0} for t in texts])
        with torch.no_grad():
            return packed_logits(model, batch["input_ids"], batch["position_ids"], batch["last_token"], attention)

    first = logits(TEXTS)
    second = logits(["a different first sentence entirely, longer than the other one", *TEXTS[1:]])
    torch.testing.assert_close(first[1:], second[1:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(first[0], second[0])


@pytest.mark.parametrize("data", ["topics", "topics_multilabel"])
def test_a_short_run_evaluates_the_same_on_both_paths(tmp_path, mlflow_store, data):
    """Two steps, dropout 0: the final eval metrics of the packed run are the padded run's."""
    overrides = [
        f"data={data}",
        "lora.dropout=0.0",
        "train.max_steps=2",
        "train.eval_strategy=no",
        "data.subsample=32",
        "data.eval_subsample=48",
        "tracking.log_adapter=false",
    ]
    metrics = {}
    for fast in (True, False):
        raw = compose_config([*overrides, f"train.fast_path={str(fast).lower()}"])
        raw["output_dir"] = str(tmp_path / f"out-{fast}")
        train_run(raw)
        newest = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["start_time DESC"])
        metrics[fast] = {
            k: v for k, v in newest[0].data.metrics.items() if k.startswith("eval_") and "runtime" not in k
        }
    assert metrics[True].keys() == metrics[False].keys()
    for name, value in metrics[False].items():
        assert metrics[True][name] == pytest.approx(value, abs=1e-4), name


def test_with_a_memory_budget_the_packed_run_is_replanned_and_trains_as_the_padded_one(tmp_path, mlflow_store):
    """A budget (a GPU's by default) replans the packed step: no checkpointing where it fits, the 4-bit base's
    dequantized weights cached (bitsandbytes' own values). The losses stay the padded path's."""
    overrides = [
        "quant=4bit",
        "quant.compute_dtype=float32",
        "lora.dropout=0.0",
        "train.max_steps=3",
        "train.logging_steps=1",
        "train.eval_strategy=no",
        "data.subsample=48",
        "data.eval_subsample=16",
        "tracking.log_adapter=false",
    ]
    losses, metrics = {}, {}
    for fast in (True, False):
        extra = ["train.memory_budget_gb=4"] if fast else ["train.fast_path=false"]
        raw = compose_config([*overrides, *extra])
        raw["output_dir"] = str(tmp_path / f"out-{fast}")
        train_run(raw)
        newest = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["start_time DESC"])[0]
        history = mlflow.MlflowClient().get_metric_history(newest.info.run_id, "train_loss")
        losses[fast] = [m.value for m in sorted(history, key=lambda m: m.step)]
        metrics[fast] = newest.data.metrics
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert "fast_path_est_peak_gpu_mem_gb" in metrics[True] and "fast_path_est_peak_gpu_mem_gb" not in metrics[False]
