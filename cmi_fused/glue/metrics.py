"""GLUE metrics with scikit-learn (``evaluate`` would fetch metric scripts at run time).

CoLA: Matthews correlation; MRPC and QQP: F1 (of the positive class) and accuracy; every other task:
accuracy. MNLI is evaluated on two splits, so its metric names carry the split: ``matched_accuracy``,
``mismatched_accuracy``. All values lie in [0, 1] (Matthews correlation in [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRIC_NAMES = {"cola": ("matthews_correlation",), "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy")}


def task_metric_names(task: str) -> tuple:
    """The metric names one evaluation split of ``task`` produces."""
    return METRIC_NAMES.get(task, ("accuracy",))


def glue_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict:
    """Metrics of integer ``predictions`` against ``labels`` for ``task``, as plain floats."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions shape {predictions.shape} does not match labels shape {labels.shape}")
    scores = {}
    for name in task_metric_names(task):
        if name == "matthews_correlation":
            scores[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "f1":
            scores[name] = float(f1_score(labels, predictions, zero_division=0.0))
        else:
            scores[name] = float(accuracy_score(labels, predictions))
    return scores


def build_compute_metrics(task: str) -> Callable:
    """A ``compute_metrics`` for ``transformers.Trainer``: argmax of the logits, then :func:`glue_metrics`."""

    def compute_metrics(eval_prediction) -> dict:
        logits = eval_prediction.predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        return glue_metrics(task, np.argmax(logits, axis=-1), eval_prediction.label_ids)

    return compute_metrics
