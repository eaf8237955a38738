"""The eval split made when none is given: stratified by class, or by label set (iterative stratification).

Either way a class (or label) with two or more rows keeps at least one in each split where it can: rounding a
999:1 file's share of the minority to zero eval rows made every average of the eval split blind to it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from src.config import DataConfig


def iterative_stratification(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask for a multi-label matrix (Sechidis et al., 2011), one fold split in two.

    Rows are assigned label by label, rarest label first, to the fold that most lacks it, so
    every label's frequency is close to equal in both folds.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    desired = np.array([1 - test_fraction, test_fraction])
    want_rows = desired * n
    want_label = np.outer(desired, labels.sum(axis=0))
    fold = np.full(n, -1)
    remaining = labels.astype(bool).copy()
    while (fold < 0).any():
        counts = remaining[fold < 0].sum(axis=0)
        if counts.sum() == 0:  # rows with no label: fill by row quota
            for i in rng.permutation(np.flatnonzero(fold < 0)):
                f = int(np.argmax(want_rows))
                fold[i] = f
                want_rows[f] -= 1
            break
        label = int(np.argmin(np.where(counts > 0, counts, np.inf)))
        rows = rng.permutation(np.flatnonzero((fold < 0) & remaining[:, label]))
        for i in rows:
            options = np.flatnonzero(want_label[:, label] == want_label[:, label].max())
            if len(options) > 1:
                options = options[want_rows[options] == want_rows[options].max()]
            f = int(rng.choice(options))
            fold[i] = f
            want_rows[f] -= 1
            want_label[f] -= labels[i]
    return fold == 1


def make_eval_split(task: str, y: Any, n: int, d: DataConfig) -> np.ndarray:
    """Boolean eval mask: stratified for classes, iterative stratification for label sets."""
    if task == "multilabel":
        return _evaluate_every_label(y, iterative_stratification(y, d.eval_fraction, d.split_seed))
    rng = np.random.default_rng(d.split_seed)
    mask = np.zeros(n, dtype=bool)
    if task == "classification":
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            take = int(round(len(idx) * d.eval_fraction))
            if len(idx) >= 2:  # a class that can be in both splits is: rounding would leave a 999:1 minority out
                take = min(len(idx) - 1, max(1, take))
            mask[idx[:take]] = True
    else:
        mask[rng.permutation(n)[: max(1, int(round(n * d.eval_fraction)))]] = True
    return mask


def _evaluate_every_label(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Move a train row into eval for each label with two or more positives and none there (iterative
    stratification gives a label of 2 positives at eval_fraction=0.2 both to train); only a row whose labels
    all keep a positive in train moves, the one with the fewest labels first."""
    positive = labels.astype(bool)
    mask = mask.copy()
    for j in range(positive.shape[1]):
        if positive[mask, j].any() or positive[~mask, j].sum() < 2:
            continue
        rows = np.flatnonzero(~mask & positive[:, j])
        for i in sorted(rows, key=lambda r: (positive[r].sum(), r)):
            if all(positive[~mask, k].sum() >= 2 for k in np.flatnonzero(positive[i])):
                mask[i] = True
                break
    return mask
