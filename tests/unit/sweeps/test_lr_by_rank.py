"""The best learning rate of each rank on a study's parent run (:mod:`src.sweeps.lr_by_rank`), on real Optuna
studies."""

from __future__ import annotations

import csv

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from src.sweeps.lr_by_rank import best_by_rank, lr_by_rank_files
from src.sweeps.outcomes import DUPLICATE_OF_ATTR
from src.sweeps.study_report import study_artifacts

DISTRIBUTIONS = {
    "lora.r": CategoricalDistribution([4, 8, 16]),
    "train.learning_rate": FloatDistribution(1e-5, 1e-2, log=True),
}


def _study(direction: str, points: list[tuple[int, float, float]], duplicate: tuple | None = None):
    study = optuna.create_study(direction=direction)
    for rank, lr, value in points:
        study.add_trial(
            optuna.trial.create_trial(
                params={"lora.r": rank, "train.learning_rate": lr}, distributions=DISTRIBUTIONS, value=value
            )
        )
    if duplicate is not None:  # a repeated proposal answered from trial 0, with a value no run gave
        rank, lr, value = duplicate
        study.add_trial(
            optuna.trial.create_trial(
                params={"lora.r": rank, "train.learning_rate": lr},
                distributions=DISTRIBUTIONS,
                value=value,
                user_attrs={DUPLICATE_OF_ATTR: 0},
            )
        )
    return study


POINTS = [(4, 1e-4, 0.70), (4, 1e-3, 0.80), (8, 3e-4, 0.85), (8, 3e-3, 0.60), (8, 1e-5, 0.50), (16, 2e-4, 0.75)]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_each_rank_gets_its_own_best_trial_and_learning_rate(direction):
    found = best_by_rank(_study(direction, POINTS, duplicate=(8, 5e-3, 0.99 if direction == "maximize" else 0.01)))
    assert [b.rank for b in found] == [4, 8, 16]
    assert [b.trials for b in found] == [2, 3, 1]  # the duplicate is not a trial that ran
    best = [(b.learning_rate, b.value, b.trial) for b in found]
    if direction == "maximize":
        assert best == [(1e-3, 0.80, 1), (3e-4, 0.85, 2), (2e-4, 0.75, 5)]
    else:
        assert best == [(1e-4, 0.70, 0), (1e-5, 0.50, 4), (2e-4, 0.75, 5)]


def test_a_study_that_does_not_search_both_or_has_several_objectives_gets_no_table(tmp_path):
    only_rank = optuna.create_study(direction="maximize")
    only_rank.add_trial(
        optuna.trial.create_trial(params={"lora.r": 4}, distributions={"lora.r": DISTRIBUTIONS["lora.r"]}, value=1.0)
    )
    assert best_by_rank(only_rank) == []
    two = optuna.create_study(directions=["maximize", "minimize"])
    two.add_trial(
        optuna.trial.create_trial(
            params={"lora.r": 4, "train.learning_rate": 1e-4}, distributions=DISTRIBUTIONS, values=[1.0, 2.0]
        )
    )
    assert best_by_rank(two) == []
    assert lr_by_rank_files(two, "objective", tmp_path) == ([], [], {})
    assert not list(tmp_path.iterdir())


def test_the_parent_run_gets_the_table_csv_plot_and_one_metric_a_rank(tmp_path):
    study = _study("maximize", POINTS)
    report = study_artifacts(study, ["objective"], ["eval_f1_macro"], tmp_path)
    logged = {path.name: folder for path, folder in report["files"]}
    assert logged["best_lr_by_rank.md"] is None and logged["best_lr_by_rank.csv"] is None
    assert logged["lr_by_rank.png"] == "plots" and (tmp_path / "plots" / "lr_by_rank.png").stat().st_size > 1000
    assert {k: v for k, v in report["metrics"].items() if k.startswith("best_lr/")} == {
        "best_lr/r4": 1e-3,
        "best_lr/r8": 3e-4,
        "best_lr/r16": 2e-4,
    }
    text = (tmp_path / "best_lr_by_rank.md").read_text()
    assert "| 8 | 0.0003 | 0.85 | #2 | 3 | - |" in text and "by eval_f1_macro" in text
    rows = list(csv.DictReader(open(tmp_path / "best_lr_by_rank.csv")))
    assert [(r["lora.r"], float(r["learning_rate"])) for r in rows] == [("4", 1e-3), ("8", 3e-4), ("16", 2e-4)]


def test_each_rank_s_best_says_the_scaling_and_targets_its_rate_holds_with(tmp_path):
    """A rank's best rate under rsLoRA (alpha / sqrt(r)) is not plain LoRA's: the table names the best trial's other
    params."""
    from src.sweeps.lr_by_rank import best_lr_text

    distributions = {
        **DISTRIBUTIONS,
        "lora.r": CategoricalDistribution([64]),
        "lora.use_rslora": CategoricalDistribution([False, True]),
    }
    study = optuna.create_study(direction="maximize")
    for rslora, lr, value in [(False, 1e-3, 0.6), (True, 1e-4, 0.9)]:
        params = {"lora.r": 64, "train.learning_rate": lr, "lora.use_rslora": rslora}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    (best,) = best_by_rank(study)
    assert (best.learning_rate, best.others) == (1e-4, "lora.use_rslora=True")
    assert best_lr_text([best]) == "r=64: 0.0001 (0.9, lora.use_rslora=True)"
    lr_by_rank_files(study, "objective", tmp_path)
    assert "| 64 | 0.0001 | 0.9 | #1 | 2 | lora.use_rslora=True |" in (tmp_path / "best_lr_by_rank.md").read_text()
