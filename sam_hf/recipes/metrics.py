"""Classification and regression metrics in numpy, so evaluation needs no Hub download.

Classification reports accuracy, Matthews correlation (CoLA's metric) and, for
two classes, F1 of class 1 (MRPC's and QQP's); regression reports Pearson and
Spearman correlation (STS-B's).
"""

from __future__ import annotations

import numpy as np


def classification_metrics(eval_pred) -> dict:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    out = {"accuracy": float((preds == labels).mean()), "matthews_correlation": matthews(labels, preds)}
    if logits.shape[-1] == 2:
        out["f1"] = f1_binary(labels, preds)
    return out


def regression_metrics(eval_pred) -> dict:
    preds, labels = eval_pred
    preds = np.asarray(preds[0] if isinstance(preds, tuple) else preds).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    return {"pearson": _corr(preds, labels), "spearmanr": _corr(_rank(preds), _rank(labels)),
            "mse": float(((preds - labels) ** 2).mean())}


def f1_binary(labels, preds) -> float:
    tp = np.sum((preds == 1) & (labels == 1))
    fp = np.sum((preds == 1) & (labels != 1))
    fn = np.sum((preds != 1) & (labels == 1))
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def matthews(labels, preds) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K), as scikit-learn defines it."""
    classes = np.union1d(labels, preds)
    c = np.array([[np.sum((labels == a) & (preds == b)) for b in classes] for a in classes], dtype=float)
    t, p, n = c.sum(1), c.sum(0), c.sum()
    cov_yp = np.trace(c) * n - t @ p
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float(cov_yp / denom) if denom else 0.0


def _corr(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom else 0.0


def _rank(x):
    """Ranks with ties averaged, as Spearman's correlation needs."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks
