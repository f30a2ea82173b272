"""Task metrics in numpy: the same definitions as scikit-learn's (checked against it in the tests).

classification: accuracy, macro-F1 (over the classes present in the truth or the predictions).
multilabel: ROC-AUC and average precision, macro over classes with both positives and negatives.
regression: R^2, mean absolute error.
pitch (MIDI numbers): raw pitch accuracy (|error| <= 50 cents) and raw chroma accuracy (the same,
    octave errors forgiven), as in mir_eval's melody metrics.
"""

from __future__ import annotations

import math

import numpy as np

PRIMARY = {"classification": "accuracy", "multilabel": "mAP", "regression": "r2", "pitch": "rpa_50c"}


def compute(kind: str, y: np.ndarray, output: np.ndarray, values: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of `output` against targets `y` (as `Task.targets()` gives them).

    output: (N, C) class scores for classification/multilabel/pitch, (N,) predictions for regression.
    values: for pitch, the MIDI number of each of the C classes.
    """
    if kind == "classification":
        pred = output.argmax(1)
        return {"accuracy": float((pred == y).mean()), "macro_f1": macro_f1(y, pred)}
    if kind == "multilabel":
        return {"mAP": _macro(average_precision, y, output), "roc_auc": _macro(roc_auc, y, output)}
    if kind == "regression":
        return {"r2": r2(y, output), "mae": float(np.abs(output - y).mean())}
    if kind == "pitch":
        cents = 100.0 * (values[output.argmax(1)] - y)
        chroma = (cents + 600.0) % 1200.0 - 600.0
        return {"rpa_50c": float((np.abs(cents) <= 50).mean()), "rca_50c": float((np.abs(chroma) <= 50).mean())}
    raise ValueError(f"unknown task kind {kind!r}")


def rank_value(value: float) -> float:
    """A metric as a key for choosing the best: NaN (undefined on a split, e.g. mAP with no
    positives) ranks below everything."""
    return -math.inf if math.isnan(value) else value


def semitone_classes(y: np.ndarray) -> np.ndarray:
    """The classes of a pitch probe or head: the distinct whole MIDI numbers in `y` (training
    targets), sorted (C,)."""
    return np.unique(np.round(y))


def nearest_class(values: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Index of the class in `values` (C,) nearest each MIDI number of `y` (N,) -> (N,) int."""
    return np.abs(np.asarray(y, dtype=float)[:, None] - np.asarray(values)[None, :]).argmin(1)


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted mean F1 over the labels in `y` or `pred` (N,) -> float."""
    scores = []
    for c in np.union1d(y, pred):
        tp = np.sum((pred == c) & (y == c))
        denom = np.sum(pred == c) + np.sum(y == c)
        scores.append(2.0 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination; a constant target gives 1 if predicted exactly, else 0 (as scikit-learn)."""
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of one binary column: the Mann-Whitney U with ties counted half."""
    ranks = _average_ranks(score)
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision of one binary column: sum over thresholds of (R_n - R_{n-1}) P_n, ties grouped."""
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], (y[order] > 0.5).astype(float)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the final item of each run of equal scores
    tp = np.cumsum(t)[last]
    precision = tp / (last + 1)
    recall = tp / t.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _macro(metric, y: np.ndarray, score: np.ndarray) -> float:
    cols = [c for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]
    return float(np.mean([metric(y[:, c], score[:, c]) for c in cols])) if cols else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sx)) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return ranks
