"""Trainers for each task, their metrics, and the callback that writes the MLflow metrics.

Classification and multi-label use the HF ``Trainer`` (subclassed only at its documented
``compute_loss`` hook, for class weights, ``pos_weight`` and a loss normalised over the whole accumulated
step: :class:`src.engine.classification.ClassifierTrainer`); SFT uses TRL's ``SFTTrainer``
with prompt/completion data, so the loss is on the response only and EOS is appended.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, Optional, Union

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from src import console, tracking
from src.config import per_label_metrics
from src.data import TaskData
from src.training_args import training_arguments as training_arguments  # src.fit builds its Trainer's here

# HF's per-step "loss" is our "train_loss" curve; its end-of-training average is "train_loss_mean".
HF_TO_MLFLOW = {
    "loss": "train_loss",
    "train_loss": "train_loss_mean",
    "train_runtime": "train_runtime_s",
    "train_tokens_per_second": "train_tokens_per_s",  # TokenRate's, not HF's
}
NOT_METRICS = {
    "epoch",
    "total_flos",
    "train_samples_per_second",
    "train_steps_per_second",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "eval_runtime",
    "num_input_tokens_seen",
}


# Past this many classes the confusion matrix is logged as data only: drawing its cells took over 11 minutes
# for 10,000 classes, and a picture that size cannot be read anyway.
MAX_CLASSES_PLOTTED = 50
# Past this many classes (or labels) per-class F1 goes to classification_report.json only, not one MLflow metric
# each per evaluation (10,000 classes made 10,000 metrics a run); the objective's own class is still logged.
MAX_CLASS_METRICS = 100


def final_evaluation(trainer) -> dict[str, float]:
    """The run's final evaluation: the one the Trainer ran at the last step, when it ran one there on the
    model as it ends; else a new one. The Trainer evaluates at the end of an epoch or at ``eval_steps``, often
    the last step; evaluating again gave the same numbers for the cost of another pass over the eval split
    (and a second report to a pruner). With ``load_best_model_at_end`` the model that ends is the best
    checkpoint, so it is evaluated again."""
    state = trainer.state
    if not trainer.args.load_best_model_at_end:
        for entry in reversed(state.log_history):
            if "eval_loss" in entry or any(k.startswith("eval_") and k != "eval_runtime" for k in entry):
                if entry.get("step") == state.global_step:
                    return {k: v for k, v in entry.items() if k != "step"}
                break
    return trainer.evaluate()


class ClassificationMetrics:
    """compute_metrics for single- and multi-label tasks; keeps the last report and confusion matrix.

    Every average is over all of the run's classes (or label columns), as classification_report.json is: a class
    with no eval row and no prediction scores 0 in the macro F1, rather than vanishing from it (a 999:1 split
    whose eval holds no minority row read eval_f1_macro 1.0 against the report's 0.5).
    """

    def __init__(self, task: str, labels: list[str], threshold: float, keep: tuple[str, ...] = ()):
        self.task, self.labels, self.threshold = task, labels, threshold
        self.metric_names = per_label_metrics(task, labels)
        self.keep = {name.removeprefix("eval_") for name in keep}  # per-class metrics logged at any class count
        self.last_report: dict[str, Any] = {}
        # [true, pred] (dense), or past MAX_CLASSES_PLOTTED classes the non-zero cells {"true", "pred", "count"}
        # (a dense matrix of 10,000 classes is 800 MB); per label [[tn, fp], [fn, tp]] if multilabel
        self.last_confusion: Optional[Union[np.ndarray, dict[str, np.ndarray]]] = None

    def _per_class(self, scores) -> dict[str, float]:
        named = {self.metric_names[n].removeprefix("eval_"): f for n, f in zip(self.labels, scores)}
        if len(self.labels) <= MAX_CLASS_METRICS:
            return named
        return {k: v for k, v in named.items() if k in self.keep}

    def __call__(self, eval_pred) -> dict[str, float]:
        from sklearn import metrics as skm

        logits, y_true = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        names = self.labels
        every = list(range(len(names)))  # the run's whole label set, not the classes this eval split holds
        if self.task == "multilabel":
            y_pred = (1 / (1 + np.exp(-logits)) >= self.threshold).astype(int)
            y_true = y_true.astype(int)
            out = {
                f"f1_{avg}": skm.f1_score(y_true, y_pred, labels=every, average=avg, zero_division=0)
                for avg in ("micro", "macro", "weighted", "samples")
            }
            out["subset_accuracy"] = skm.accuracy_score(y_true, y_pred)
            self.last_confusion = skm.multilabel_confusion_matrix(y_true, y_pred, labels=every)
            out.update(self._per_class(skm.f1_score(y_true, y_pred, labels=every, average=None, zero_division=0)))
        else:
            y_pred = logits.argmax(-1)
            out = {
                "accuracy": skm.accuracy_score(y_true, y_pred),
                # the mean recall over every class (sklearn's balanced_accuracy_score skips classes with no row)
                "balanced_accuracy": skm.recall_score(y_true, y_pred, labels=every, average="macro", zero_division=0),
                "mcc": _mcc(y_true, y_pred),
            }
            out.update(
                {
                    f"f1_{avg}": skm.f1_score(y_true, y_pred, labels=every, average=avg, zero_division=0)
                    for avg in ("micro", "macro", "weighted")
                }
            )
            out.update(self._per_class(skm.f1_score(y_true, y_pred, average=None, labels=every, zero_division=0)))
            n = len(names)
            if n > MAX_CLASSES_PLOTTED:
                cells, counts = np.unique(np.asarray(y_true, dtype=np.int64) * n + y_pred, return_counts=True)
                self.last_confusion = {"true": cells // n, "pred": cells % n, "count": counts}
            else:
                self.last_confusion = skm.confusion_matrix(y_true, y_pred, labels=range(n))
        self.last_report = skm.classification_report(
            y_true, y_pred, labels=every, target_names=names, output_dict=True, zero_division=0
        )
        return {k: float(v) for k, v in out.items()}


def _mcc(y_true, y_pred) -> float:
    """Matthews' correlation: unaffected by classes with no row, so sklearn's hint to pass every label (it has
    no such argument) is noise."""
    import warnings

    from sklearn.metrics import matthews_corrcoef

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        return matthews_corrcoef(y_true, y_pred)


def log_confusion_matrix(metrics: ClassificationMetrics) -> None:
    """Log the last eval confusion matrix as an MLflow table and, up to MAX_CLASSES_PLOTTED labels, a PNG heat map.

    Past that many classes the table holds only the non-zero cells (true, pred, count): a dense one grows as
    the square of the classes, while the non-zero cells are at most the eval rows.
    """
    import mlflow

    cm, names = metrics.last_confusion, metrics.labels
    if cm is None:
        return
    if metrics.task == "multilabel":
        table = {"label": names, "tn": cm[:, 0, 0], "fp": cm[:, 0, 1], "fn": cm[:, 1, 0], "tp": cm[:, 1, 1]}
        grid, xticks, yticks = cm[:, 1, :], ["pred 0", "pred 1"], [f"{n} (true 1)" for n in names]
    elif len(names) > MAX_CLASSES_PLOTTED:
        if isinstance(cm, dict):
            true, pred, count = cm["true"], cm["pred"], cm["count"]
        else:
            true, pred = np.nonzero(cm)
            count = cm[true, pred]
        table = {"true": [names[i] for i in true], "pred": [names[j] for j in pred], "count": count}
    else:
        table = {"true": names, **{f"pred_{n}": cm[:, j] for j, n in enumerate(names)}}
        grid, xticks, yticks = cm, names, names
    mlflow.log_table(
        {k: [int(x) if not isinstance(x, str) else x for x in v] for k, v in table.items()},
        artifact_file="confusion_matrix.json",
    )
    if len(names) > MAX_CLASSES_PLOTTED:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(xticks), 1.0 + 0.5 * len(yticks)))
    ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(len(xticks)), xticks, rotation=45, ha="right")
    ax.set_yticks(range(len(yticks)), yticks)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, int(value), ha="center", va="center")
    ax.set_title("eval confusion matrix")
    fig.tight_layout()
    mlflow.log_figure(fig, "confusion_matrix.png")
    plt.close(fig)


def perplexity(eval_loss: float) -> float:
    """exp(loss), capped at exp(50) so that a diverged run logs a number."""
    return math.exp(min(eval_loss, 50.0))


class MlflowMetricsCallback(TrainerCallback):
    """Log every Trainer log line to the active MLflow run under the contract's names."""

    def __init__(self, perplexity: bool):
        self.perplexity = perplexity

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {}
        for key, value in (logs or {}).items():
            if key in NOT_METRICS or not isinstance(value, (int, float)):
                continue
            metrics[HF_TO_MLFLOW.get(key, key)] = float(value)
        if self.perplexity and "eval_loss" in metrics:
            metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
        if "train_runtime_s" in metrics and state.num_input_tokens_seen:
            metrics["train_tokens"] = float(state.num_input_tokens_seen)
        if metrics:
            tracking.log_metrics(metrics, step=state.global_step)  # waits out a locked store


class TokenRate:
    """Training throughput: the non-padding tokens the optimizer steps consumed (every micro-batch of each
    accumulated step, every rank), over the wall time they took, evaluations left out. :meth:`window` is the rate
    since the last call (one log line's), :meth:`overall` the rate since :meth:`start`."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.started = self.marked = 0.0
        self.tokens_started = self.tokens_marked = 0
        self.excluded_s = self.excluded_since_mark_s = 0.0

    def start(self, tokens_seen: int) -> None:
        self.started = self.marked = self.clock()
        self.tokens_started = self.tokens_marked = tokens_seen
        self.excluded_s = self.excluded_since_mark_s = 0.0

    def exclude(self, seconds: float) -> None:
        """Time spent on something other than training steps (an evaluation) since the last mark."""
        self.excluded_s += seconds
        self.excluded_since_mark_s += seconds

    def window(self, tokens_seen: int) -> Optional[float]:
        now = self.clock()
        rate = _rate(tokens_seen - self.tokens_marked, now - self.marked - self.excluded_since_mark_s)
        self.marked, self.tokens_marked, self.excluded_since_mark_s = now, tokens_seen, 0.0
        return rate

    def overall(self, tokens_seen: int) -> Optional[float]:
        return _rate(tokens_seen - self.tokens_started, self.clock() - self.started - self.excluded_s)


def _rate(tokens: int, seconds: float) -> Optional[float]:
    return tokens / seconds if tokens > 0 and seconds > 0 else None


class TokenRateCallback(TrainerCallback):
    """Writes :class:`TokenRate`'s ``train_tokens_per_second`` into each training log, in place of HF's (the
    session's tokens over the time since training began, evaluations included), so that the console line and
    MLflow's ``train_tokens_per_s`` read one number: a log line's window, and at the end the whole run's rate.
    It must come before the callbacks that read the logs."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.rate = TokenRate(clock)

    def on_train_begin(self, args, state, control, **kwargs):
        self.rate.start(state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        logs.pop("train_tokens_per_second", None)
        if "eval_runtime" in logs:
            self.rate.exclude(logs["eval_runtime"])
            return
        if "loss" in logs:
            rate = self.rate.window(state.num_input_tokens_seen)
        elif "train_loss" in logs:  # the end-of-training summary
            rate = self.rate.overall(state.num_input_tokens_seen)
        else:
            return
        if rate is not None:
            logs["train_tokens_per_second"] = rate


class MetricLines(TrainerCallback):
    """Logs each training and eval log of the main process as one compact line (src.console), led by ``label``
    where one process trains several runs (a pack's trials), so that each line says whose it is."""

    def __init__(self, label: Optional[str] = None):
        self.label = label

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = console.metric_line(logs, state.global_step, state.max_steps, self.label)
            if line:
                console.log.info(line)


class ProgressBar(ProgressCallback):
    """HF's progress bar (with its ETA), without its printing of each log dict (MetricLines prints those)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


def use_loraplus(trainer, ratio: float) -> None:
    """LoRA+ ("LoRA+: Efficient Low Rank Adaptation of Large Models", https://arxiv.org/abs/2402.12354): the
    trainer's optimizer, of the class and settings its arguments name (on the fast path, the ones it replanned), with
    B's parameters at ``ratio`` times A's learning rate, by peft's own helper, whose rule puts every other 1-D
    trainable parameter (DoRA's magnitudes, a classifier head's bias) with B; LoRA on an embedding layer keeps the
    run's learning rate. Set before
    training, it is the optimizer the Trainer keeps (``create_optimizer`` makes one only where none is set)."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs.setdefault("lr", trainer.args.learning_rate)
    trainer.optimizer = create_loraplus_optimizer(
        trainer.model,
        optimizer_cls,
        loraplus_lr_ratio=ratio,
        loraplus_weight_decay=trainer.args.weight_decay,
        loraplus_lr_embedding=kwargs["lr"],  # peft's default, 1e-6, whatever train.learning_rate says
        **kwargs,
    )


def use_console(trainer, label: Optional[str] = None) -> None:
    """Replace HF's printing callbacks: a progress bar on a terminal, and compact metric lines everywhere."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if sys.stderr.isatty():
        trainer.add_callback(ProgressBar)
    trainer.add_callback(MetricLines(label))


def tokenize_classification(data: TaskData, tokenizer, max_length: int) -> tuple[Any, Any, int]:
    """Tokenize text with truncation; return (train, eval, number of truncated rows)."""

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        full = tokenizer(batch["text"], truncation=False, verbose=False)["input_ids"]
        enc["truncated"] = [len(ids) > max_length for ids in full]
        return enc

    label_key = "label" if data.task == "classification" else "labels"
    drop = [c for c in data.train.column_names if c != label_key]
    train = data.train.map(encode, batched=True, remove_columns=drop)
    eval_ = data.eval.map(encode, batched=True, remove_columns=drop)
    truncated = int(sum(train["truncated"]) + sum(eval_["truncated"]))
    return train.remove_columns("truncated"), eval_.remove_columns("truncated"), truncated


def count_truncated_sft(data: TaskData, tokenizer, max_length: int) -> int:
    """Rows whose prompt + completion + EOS exceed max_length (TRL keeps the start)."""
    n = 0
    for split in (data.train, data.eval):
        texts = [p + c for p, c in zip(split["prompt"], split["completion"])]
        n += sum(len(ids) + 1 > max_length for ids in tokenizer(texts, verbose=False)["input_ids"])
    return n


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy completions for the prompts, decoded without the prompt."""
    if not prompts:
        return []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    was_training = model.training
    model.eval()
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def text_loss(model, tokenizer, text: str, max_length: int) -> float:
    """A causal LM's mean next-token loss on ``text``, cut into chunks of ``max_length`` tokens; every predicted token
    counts alike, so a short last chunk weighs by its length. In eval mode (no dropout), without gradients."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    chunks = [chunk for chunk in chunks if len(chunk) > 1]  # a lone token predicts nothing
    if not chunks:
        raise ValueError(f"the text is {len(ids)} token(s) long: too short to score")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for chunk in chunks:
                input_ids = torch.tensor([chunk], device=model.device)
                loss = model(input_ids=input_ids, labels=input_ids).loss  # the mean over the chunk's predictions
                total += float(loss) * (len(chunk) - 1)
                count += len(chunk) - 1
    finally:
        model.train(was_training)
    return total / count


def peak_gpu_mem_gb() -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
