"""Classification and regression metrics in numpy, by GLUE's definitions, so evaluation needs no Hub download.

Classification reports accuracy, Matthews correlation (CoLA's metric) and, for
two classes, F1 of class 1 (MRPC's and QQP's); regression reports Pearson and
Spearman correlation (STS-B's) and the mean squared error. The recipes use them,
and so does glue_scripts/glue_metrics.py (tests check them against scikit-learn
and scipy).
"""

from __future__ import annotations

import numpy as np


def classification_metrics(eval_pred) -> dict:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    preds = np.asarray(logits).argmax(-1)
    out = {"accuracy": accuracy(preds, labels), "matthews_correlation": matthews_correlation(preds, labels)}
    if logits.shape[-1] == 2:
        out["f1"] = f1(preds, labels)
    return out


def regression_metrics(eval_pred) -> dict:
    preds, labels = eval_pred
    preds = np.asarray(preds[0] if isinstance(preds, tuple) else preds).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    return {"pearson": pearson(preds, labels), "spearmanr": spearmanr(preds, labels),
            "mse": float(((preds - labels) ** 2).mean())}


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
