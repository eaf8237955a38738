"""The best learning rate of each LoRA rank, on the parent run of a study that searches both.

A LoRA run's best learning rate depends on its rank, and on how its update is scaled ("LoRA Without Regret",
https://thinkingmachines.ai/blog/lora/; "Learning Rate Matters: Vanilla LoRA May Suffice",
https://arxiv.org/abs/2602.04998): a study over one learning-rate interval for every rank can crown a rank that
only had the luckier learning rates. So a single-objective study whose trials draw both ``lora.r`` and
``train.learning_rate`` (``sweeps/lr_rank.yaml``) reports, for each rank, its best completed trial: the learning
rate, the objective, and how many trials of that rank ran. The parent run gets ``best_lr_by_rank.md`` and ``.csv``,
one metric ``best_lr/r<rank>`` each, and ``plots/lr_by_rank.png`` (every trial's objective against its learning
rate, one colour a rank, each rank's best circled). Only trials that ran count (a repeated proposal, answered
from the trial it repeats, is left out)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from src.sweeps.importance import save_plot
from src.sweeps.outcomes import DUPLICATE_OF_ATTR

RANK, LR = "lora.r", "train.learning_rate"
RANK_TABLE, RANK_CSV, RANK_PLOT = "best_lr_by_rank.md", "best_lr_by_rank.csv", "lr_by_rank.png"
BEST_LR_PREFIX = "best_lr/r"


@dataclass(frozen=True)
class RankBest:
    rank: int
    learning_rate: float
    value: float
    trial: int
    trials: int  # completed trials of this rank
    others: str = ""  # the best trial's other params (targets, rsLoRA...): its rate holds with them

    @property
    def with_text(self) -> str:
        return self.others or "-"


def ran_trials(study) -> list:
    """The completed trials that ran and drew both a rank and a learning rate."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in complete if DUPLICATE_OF_ATTR not in t.user_attrs and RANK in t.params and LR in t.params]


def best_by_rank(study) -> list[RankBest]:
    """Each rank's best trial, by rank; empty unless the study has one objective and searches both."""
    if len(study.directions) != 1:
        return []
    maximize = study.direction.name == "MAXIMIZE"
    by_rank: dict[int, list] = {}
    for trial in ran_trials(study):
        by_rank.setdefault(int(trial.params[RANK]), []).append(trial)
    found = []
    for rank, trials in sorted(by_rank.items()):
        best = (max if maximize else min)(trials, key=lambda t: t.value)
        others = " ".join(f"{k}={v}" for k, v in best.params.items() if k not in (RANK, LR))
        found.append(RankBest(rank, float(best.params[LR]), float(best.value), best.number, len(trials), others))
    return found


def rank_table(found: list[RankBest], metric: str) -> str:
    lines = [
        f"Best learning rate per LoRA rank, by {metric} ({sum(b.trials for b in found)} completed trial(s))",
        "",
        f"| lora.r | best learning rate | {metric} | trial | trials of this rank | with |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {b.rank} | {b.learning_rate:.3g} | {b.value:.4g} | #{b.trial} | {b.trials} | {b.with_text} |" for b in found
    ]
    lines += [
        "",
        "Each rate holds with its trial's other params: a rank's best rate under rsLoRA (alpha / sqrt(r)) or other",
        "targets differs from plain LoRA's (alpha / r).",
    ]
    return "\n".join(lines) + "\n"


def rank_plot(study, found: list[RankBest], metric: str, path: Path) -> Optional[str]:
    """Every trial's objective against its learning rate (log scale), one colour a rank, each rank's best circled,
    as PNG at ``path``; why not, if drawing failed."""

    def draw():
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(figsize=(6, 4))
        trials = ran_trials(study)
        for best in found:
            mine = [t for t in trials if int(t.params[RANK]) == best.rank]
            points = axes.scatter([t.params[LR] for t in mine], [t.value for t in mine], label=f"r={best.rank}")
            ring = points.get_facecolor()
            axes.scatter([best.learning_rate], [best.value], s=160, facecolors="none", edgecolors=ring)
        axes.set_xscale("log")
        axes.set_xlabel("learning rate")
        axes.set_ylabel(metric)
        axes.set_title("Objective by learning rate and rank (circled: each rank's best)")
        axes.legend()
        return axes

    return save_plot(draw, path)


def lr_by_rank_files(study, metric: str, out: Path) -> tuple[list[RankBest], list[tuple[Path, Optional[str]]], dict]:
    """The table, CSV and plot in ``out`` (the plot under ``plots/``), as (found, files to log with their artifact
    folder, metrics); nothing where the study does not search both a rank and a learning rate."""
    found = best_by_rank(study)
    if not found:
        return [], [], {}
    (out / RANK_TABLE).write_text(rank_table(found, metric))
    with open(out / RANK_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lora.r", "learning_rate", metric, "trial", "trials", "with"])
        writer.writerows([b.rank, b.learning_rate, b.value, b.trial, b.trials, b.others] for b in found)
    files: list[tuple[Path, Optional[str]]] = [(out / RANK_TABLE, None), (out / RANK_CSV, None)]
    why = rank_plot(study, found, metric, out / "plots" / RANK_PLOT)
    if why is None:
        files.append((out / "plots" / RANK_PLOT, "plots"))
    else:
        with open(out / RANK_TABLE, "a") as handle:
            handle.write(f"\nnote: no plot: {why}\n")
    metrics: dict[str, Any] = {f"{BEST_LR_PREFIX}{b.rank}": b.learning_rate for b in found}
    return found, files, metrics


def best_lr_text(found: list[RankBest]) -> str:
    return ", ".join(
        f"r={b.rank}: {b.learning_rate:.3g} ({b.value:.4g}{', ' + b.others if b.others else ''})" for b in found
    )
