"""GLUE metrics computed offline, by GLUE's definitions.

`evaluate.load("glue", task)` needs the Hub to fetch its metric script; these
functions give the same keys and values without it. They are the numpy ones in
sam_hf/recipes/metrics.py, so running the GLUE script needs neither
scikit-learn nor scipy (the tests check them against both).
"""

from __future__ import annotations

from sam_hf.recipes.metrics import accuracy, f1, matthews_correlation, pearson, spearmanr

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
