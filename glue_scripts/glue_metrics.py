"""GLUE metrics computed offline, by GLUE's definitions.

`evaluate.load("glue", task)` needs the Hub to fetch its metric script; these
functions give the same keys and values without it. They use numpy only, so
running the GLUE script needs neither scikit-learn nor scipy (the tests check
them against both).
"""

from __future__ import annotations

import numpy as np

# Which metrics GLUE reports for each task (the same keys as evaluate's "glue").
TASK_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def f1(preds, labels) -> float:
    """Binary F1 of the positive class 1; 0.0 when undefined, as scikit-learn."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = float(np.sum((preds == 1) & (labels == 1)))
    denom = float(np.sum(preds == 1) + np.sum(labels == 1))
    return 2 * tp / denom if denom else 0.0


def matthews_correlation(preds, labels) -> float:
    """Matthews correlation (multiclass form); 0.0 when undefined, as scikit-learn."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes, idx = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (idx[: len(labels)], idx[len(labels):]), 1)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)  # true / predicted counts
    n, c = confusion.sum(), np.trace(confusion)
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((c * n - t @ p) / denom) if denom else 0.0


def pearson(x, y) -> float:
    """Pearson correlation; nan for a constant input, as scipy."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx @ dx) * (dy @ dy))
    return float(dx @ dy / denom) if denom else float("nan")


def _average_ranks(x) -> np.ndarray:
    # Ties share the mean of their ranks, as scipy.stats.rankdata's default.
    x = np.asarray(x, dtype=np.float64)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="mergesort")] = np.arange(len(x))
    _, group = np.unique(x, return_inverse=True)
    return (np.bincount(group, weights=ranks) / np.bincount(group))[group]


def spearmanr(x, y) -> float:
    return pearson(_average_ranks(x), _average_ranks(y))


_FUNCTIONS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
}


def compute_glue_metrics(task: str, preds, labels) -> dict[str, float]:
    """GLUE's metrics for `task`; preds are class ids, or scores for stsb."""
    if task not in TASK_METRICS:
        raise KeyError(f"unknown GLUE task {task!r}; expected one of {sorted(TASK_METRICS)}")
    return {name: _FUNCTIONS[name](preds, labels) for name in TASK_METRICS[task]}
