"""The classification fast path (src/engine/classification.py) against the padded path, on CPU in fp32.

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
from src.engine import attention as fast_attention
from src.engine.classification import (
    FlatClassificationCollator,
    GraphedClassifierSteps,
    classification_loss,
    flat_attention,
    flat_logits,
    loss_total,
)
from tests.conftest import SMALL_ENCODER, compose_config, train_run

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
    attention = flat_attention(packed_model)
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

    batch = FlatClassificationCollator(multilabel)(features)
    assert batch["input_ids"].shape == (1, sum(lengths))  # no padding
    logits = flat_logits(packed_model, batch["input_ids"], batch["position_ids"], batch["last_token"], attention)
    loss = classification_loss(logits, batch["labels"], weight_tensor, multilabel)
    loss.backward()

    torch.testing.assert_close(logits, padded_logits, atol=TOL, rtol=TOL)
    torch.testing.assert_close(loss, padded_loss, atol=TOL, rtol=TOL)
    expected, got = _grads(padded_model), _grads(packed_model)
    assert set(got) == set(expected) and any("lora_A" in n for n in got) and any("score" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=TOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("num_labels", "multilabel", "weights"), [(5, False, [0.5, 1.0, 2.0, 1.0, 0.25]), (4, True, None)]
)
def test_a_graphed_classifier_step_pads_its_row_with_an_example_nothing_sees(
    tiny_model_dir, num_labels, multilabel, weights
):
    """The row a CUDA graph replays (GraphedClassifierSteps._inputs: padded up to the bucket with one more example,
    never pooled) and the graph's own forward, loss and backward (run eagerly here: on CPU varlen attention runs per
    example from the same offsets) give the eager packed step's loss and LoRA and head gradients."""
    tokenizer = modeling.load_tokenizer(validate(compose_config([])).model)
    model = _model(tiny_model_dir, num_labels, multilabel)
    assert fast_attention.use_varlen_attention(model)
    generator = torch.Generator().manual_seed(2)
    if multilabel:
        labels = torch.randint(0, 2, (len(TEXTS), num_labels), generator=generator).tolist()
    else:
        labels = torch.randint(0, num_labels, (len(TEXTS),), generator=generator).tolist()
    batch = FlatClassificationCollator(multilabel)(
        [{"input_ids": tokenizer(t)["input_ids"], "label": y} for t, y in zip(TEXTS, labels)]
    )
    weight_tensor = None if weights is None else torch.tensor(weights)

    logits = flat_logits(model, batch["input_ids"], batch["position_ids"], batch["last_token"], "varlen")
    loss = classification_loss(logits, batch["labels"], weight_tensor, multilabel)
    loss.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    graphs = GraphedClassifierSteps(len(TEXTS), weight_tensor, multilabel, bucket=32)
    tokens = batch["input_ids"].shape[1]
    length = graphs.padded_length(tokens)
    assert length % 32 == 0 and length > tokens and graphs.accepts(batch)
    short = FlatClassificationCollator(multilabel)([{"input_ids": [5, 6], "label": labels[0]}] * 2)
    assert graphs.accepts(short) and graphs._key(short, 32) != graphs._key(batch, 32)  # its own graph
    too_many = [{"input_ids": [5, 6], "label": labels[0]}] * (len(TEXTS) + 1)
    assert not graphs.accepts(FlatClassificationCollator(multilabel)(too_many))  # more than the micro-batch
    host = graphs._inputs(batch, length)
    assert host["input_ids"].shape == host["position_ids"].shape == (1, length)
    assert host["flat_cu_seqlens"].tolist() == [*batch["bounds"], length]  # one pad example at the end
    assert host["position_ids"][0, tokens:].tolist() == list(range(length - tokens))
    graphed_loss = graphs._forward_backward(model, host, length)
    torch.testing.assert_close(graphed_loss, loss.detach(), atol=TOL, rtol=TOL)
    got = _grads(model)
    assert set(got) == set(expected) and any("score" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=TOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("num_labels", "multilabel", "weights"),
    [(5, False, [0.5, 1.0, 2.0, 1.0, 0.25]), (5, False, None), (4, True, [2.0, 0.5, 1.0, 3.0])],
    ids=["class-weights", "multiclass", "pos-weight"],
)
def test_a_graphed_classifier_step_divides_by_the_whole_steps_loss_total(
    tiny_model_dir, num_labels, multilabel, weights
):
    """Two rows of one optimizer step, each through the graph's forward and backward (eagerly here) with the step's
    ``num_items_in_batch`` (ClassifierTrainer's: the sum of both rows' loss_total), add up to one row of all their
    examples: its loss (for class weights, sum(w_i * l_i) / sum(w_i) over the step) and gradients."""
    tokenizer = modeling.load_tokenizer(validate(compose_config([])).model)
    model = _model(tiny_model_dir, num_labels, multilabel)
    assert fast_attention.use_varlen_attention(model)
    generator = torch.Generator().manual_seed(3)
    if multilabel:
        labels = torch.randint(0, 2, (len(TEXTS), num_labels), generator=generator).tolist()
    else:
        labels = torch.randint(0, num_labels, (len(TEXTS),), generator=generator).tolist()
    features = [{"input_ids": tokenizer(t)["input_ids"], "label": y} for t, y in zip(TEXTS, labels)]
    collate = FlatClassificationCollator(multilabel)
    weight_tensor = None if weights is None else torch.tensor(weights)

    whole = collate(features)
    logits = flat_logits(model, whole["input_ids"], whole["position_ids"], whole["last_token"], "varlen")
    loss = classification_loss(logits, whole["labels"], weight_tensor, multilabel)
    loss.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    rows = [collate(features[:2]), collate(features[2:])]
    total = sum(loss_total(row["labels"], weight_tensor, multilabel) for row in rows)
    graphs = GraphedClassifierSteps(len(TEXTS), weight_tensor, multilabel, bucket=32)
    losses = []
    for row in rows:
        length = graphs.padded_length(row["input_ids"].shape[1])
        losses.append(graphs._forward_backward(model, graphs._inputs(row, length, total), length))
    torch.testing.assert_close(sum(losses), loss.detach(), atol=TOL, rtol=TOL)
    got = _grads(model)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=TOL, rtol=1e-4, msg=name)


def test_an_example_never_attends_to_another_in_its_row(tiny_model_dir):
    """Changing the first example of a row leaves the logits of the others as they were."""
    tokenizer = modeling.load_tokenizer(validate(compose_config([])).model)
    model = _model(tiny_model_dir, 3, False)
    attention = flat_attention(model)
    collate = FlatClassificationCollator(False)

    def logits(texts):
        batch = collate([{"input_ids": tokenizer(t)["input_ids"], "label": 0} for t in texts])
        with torch.no_grad():
            return flat_logits(model, batch["input_ids"], batch["position_ids"], batch["last_token"], attention)

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


def _bert(num_labels: int, multilabel: bool, dropout: float = 0.0):
    """A 2-layer BERT classifier with seed 001's LoRA (every linear layer but the head, pooler too; biases train)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=200,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
        problem_type="multi_label_classification" if multilabel else "single_label_classification",
    )
    lora = validate(compose_config(["lora=all_but_head", "lora.dropout=0.0", "lora.bias=all"])).lora
    model = modeling.apply_lora(BertForSequenceClassification(config), lora, "classification")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model


def _bert_features(labels: list) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    lengths = [3, 41, 7, 1, 25, 12]  # [CLS]-only up to 41 tokens in one row
    return [
        {"input_ids": torch.randint(5, 200, (n,), generator=generator).tolist(), "label": y}
        for n, y in zip(lengths, labels)
    ]


@pytest.mark.parametrize(("num_labels", "multilabel", "weights"), [(5, False, None), (3, True, [2.0, 0.5, 1.0])])
def test_packed_and_padded_bert_agree_on_logits_loss_and_lora_gradients(num_labels, multilabel, weights):
    """BERT packed: bidirectional attention within each example, pooled at its own [CLS] through the pooler."""
    padded_model = _bert(num_labels, multilabel)
    packed_model = copy.deepcopy(padded_model)
    attention = flat_attention(packed_model)
    assert attention == "bidirectional"
    generator = torch.Generator().manual_seed(1)
    if multilabel:
        labels = torch.randint(0, 2, (6, num_labels), generator=generator).tolist()
    else:
        labels = torch.randint(0, num_labels, (6,), generator=generator).tolist()
    features = _bert_features(labels)
    weight_tensor = None if weights is None else torch.tensor(weights)

    ids = [torch.tensor(f["input_ids"]) for f in features]
    input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)
    target = torch.tensor(labels, dtype=torch.float32 if multilabel else torch.long)
    padded_logits = padded_model(input_ids=input_ids, attention_mask=mask).logits
    padded_loss = classification_loss(padded_logits, target, weight_tensor, multilabel)
    padded_loss.backward()

    batch = FlatClassificationCollator(multilabel)(features)
    assert batch["input_ids"].shape == (1, int(mask.sum()))  # no padding
    logits = flat_logits(
        packed_model, batch["input_ids"], batch["position_ids"], batch["last_token"], attention, batch["bounds"]
    )
    loss = classification_loss(logits, batch["labels"], weight_tensor, multilabel)
    loss.backward()

    torch.testing.assert_close(logits, padded_logits, atol=TOL, rtol=TOL)
    torch.testing.assert_close(loss, padded_loss, atol=TOL, rtol=TOL)
    expected, got = _grads(padded_model), _grads(packed_model)
    assert set(got) == set(expected)
    assert any("pooler.dense.lora_A" in n for n in got) and any("classifier" in n for n in got)
    assert any(n.endswith("attention.self.query.base_layer.bias") for n in got)  # bias=all: every bias trains
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=TOL, rtol=1e-4, msg=name)


def test_a_bert_example_never_attends_to_another_and_keeps_its_attention_dropout():
    model = _bert(3, False, dropout=0.1)
    attention = flat_attention(model)
    collate = FlatClassificationCollator(False)
    features = _bert_features([0] * 6)

    def logits(rows):
        batch = collate(rows)
        return flat_logits(model, batch["input_ids"], batch["position_ids"], batch["last_token"], attention)

    model.eval()
    with torch.no_grad():
        first = logits(features)
        other = logits([{"input_ids": list(range(10, 40)), "label": 0}, *features[1:]])
    torch.testing.assert_close(first[1:], other[1:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(first[0], other[0])
    model.train()  # BERT's dropout (attention probabilities too) applies in training, as on the padded path
    torch.manual_seed(3)
    with torch.no_grad():
        trained = [logits(features), logits(features)]
    assert not torch.allclose(trained[0], trained[1]) and not torch.allclose(trained[0], first)
    attention_only = copy.deepcopy(model)  # with the attention-probability dropout alone, two passes still differ
    for name, module in attention_only.named_modules():
        if isinstance(module, torch.nn.Dropout) and not name.endswith("attention.self.dropout"):
            module.p = 0.0
    batch = collate(features)
    with torch.no_grad():
        twice = [
            flat_logits(attention_only, batch["input_ids"], batch["position_ids"], batch["last_token"], attention)
            for _ in range(2)
        ]
    assert not torch.allclose(twice[0], twice[1])


def test_the_packed_classifier_plans_for_its_rows_tokens(tiny_model_dir):
    """With a budget, a micro-batch of n examples is planned for the largest of n in shuffles of the rows (never
    above the n longest together), not for n x model.max_length tokens."""
    import dataclasses

    from src import memory as P
    from src.engine import budget as fast_budget
    from src.engine.classification import epochs_trained, plan_fast_classifier
    from src.training import training_arguments

    cfg = validate(compose_config(["train.memory_budget_gb=8", "model.max_length=512"]))
    model = _model(tiny_model_dir, 3, False)
    args = training_arguments(cfg.train, "unused", "classification", cfg.model.max_length)
    lengths = [5, 60, 12, 33, 7, 60, 2, 18, 40, 9, 11]
    per_step = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    args, micro = plan_fast_classifier(cfg, model, args, flat_attention(model), lengths)
    assert (micro.micro_batch_size, micro.gradient_accumulation_steps, micro.checkpointed_layers) == (per_step, 1, 0)
    sized = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, optim=fast_budget.fast_optimizer(cfg.train.optim))
    )
    tokens = fast_budget.largest_micro_batch_tokens(lengths, epochs_trained(cfg, len(lengths)))(per_step)
    assert tokens <= sum(sorted(lengths, reverse=True)[:per_step])
    assert micro.est_peak_gpu_mem_gb == P.plan(sized, tokens_per_micro_batch=tokens).est_peak_gpu_mem_gb
    _, unsized = plan_fast_classifier(cfg, _model(tiny_model_dir, 3, False), args, flat_attention(model))
    assert unsized.est_peak_gpu_mem_gb == P.plan(sized).est_peak_gpu_mem_gb > micro.est_peak_gpu_mem_gb


def test_a_sweeps_memory_cap_reaches_a_packed_bert_as_its_budget(random_checkpoint):
    """BERT plans its own micro-batches as the decoders do: a sweep's feasibility check hands it the free memory as
    train.memory_budget_gb instead of shrinking its batch (which the packed classifier would plan back up)."""
    from src.sweeps.configs import FeasibilityConf
    from src.sweeps.feasibility import check_feasibility

    bert = random_checkpoint("bert", **SMALL_ENCODER)
    raw = compose_config(["model=bert_large", f"model.name_or_path={bert}", "data=driver_intents"])
    budgeted, note = check_feasibility(validate(raw), FeasibilityConf("shrink", 0.5))
    assert budgeted.resolved()["train"]["memory_budget_gb"] == 0.5 and budgeted.train.memory_budget_gb == 0.5
    assert budgeted.train.per_device_train_batch_size == raw["train"]["per_device_train_batch_size"]


@pytest.mark.parametrize("data", ["topics", "instructions"])
def test_the_flat_trainers_count_tokens_on_the_host_and_read_them_back_only_when_they_log(tmp_path, mlflow_store, data):
    """The flat classifier (and the SFT fast path) count each micro-batch's tokens on the host, and gather them
    from the ranks only when they log: transformers' own count gathers and reads one back from the device every
    micro-batch, a host sync per step. Both count the same tokens."""
    from transformers import Trainer

    from src import fit, modeling
    from src.config import validate
    from src.data import load_data
    from src.engine.graphs import HostTokenCount

    cfg = validate(
        compose_config(
            [f"data={data}", "train.max_steps=4", "train.logging_steps=2", "train.eval_strategy=no"]
            + ["data.subsample=48", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2"]
        )
    )
    data_ = load_data(cfg.data)
    tokenizer = modeling.load_tokenizer(cfg.model)
    counts = {}
    for own in (True, False):
        model = modeling.load_model(cfg.model, cfg.quant, data_.task, data_.labels, tokenizer.pad_token_id)
        model = modeling.apply_lora(model, cfg.lora, data_.task)
        trainer, _, _ = fit.build_trainer(cfg, model, tokenizer, data_, str(tmp_path / f"out-{own}"))
        assert isinstance(trainer, HostTokenCount)
        if not own:  # transformers' count, for the same rows
            trainer._track_num_input_tokens = Trainer._track_num_input_tokens.__get__(trainer)
        gathers, gather = [], trainer.accelerator.gather

        def counting_gather(tensor, gathers=gathers, gather=gather):
            gathers.append(tensor)
            return gather(tensor)

        trainer.accelerator.gather = counting_gather
        trainer.train()
        counts[own] = (trainer.state.num_input_tokens_seen, len(gathers), trainer.state.global_step)
    (tokens, own_gathers, steps), (their_tokens, their_gathers, _) = counts[True], counts[False]
    assert steps == 4 and tokens == their_tokens > 0
    assert own_gathers <= 3 < steps <= their_gathers  # two logging steps and the end, against one a micro-batch
