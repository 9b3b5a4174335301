"""GLUE metrics with scikit-learn and scipy (no ``evaluate``, no hub).

All values are fractions (accuracy 0.871, not 87.1); reports multiply by 100. Every metric is "higher is better"
except ``mse`` (reported as in the paper's Table 4), whose negation ``neg_mse`` is what model selection maximises.
Pearson and Spearman are undefined (NaN) when either side is constant; that NaN is returned, never replaced by a
number, so a caller selecting a model must treat NaN as the worst value.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from glue_tasks import GlueTask, get_task
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef, precision_recall_fscore_support


def _to_numpy(x: Any) -> np.ndarray:
    """Numpy view of a list, array or torch tensor (bf16/half tensors are upcast first: numpy has no bf16)."""
    if hasattr(x, "detach"):
        x = x.detach()
        if x.is_floating_point():
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x)


def accuracy(predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Fraction of predictions equal to the labels."""
    p, y = _check_pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Binary F1 of the positive class 1 (MRPC "equivalent", QQP "duplicate"); 0.0 when it is never predicted."""
    p, y = _check_pair(predictions, labels)
    return float(f1_score(y, p, pos_label=1, average="binary", zero_division=0))


def matthews_correlation(predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Matthews correlation coefficient (CoLA); 0.0 when the predictions are constant (scikit-learn's convention)."""
    p, y = _check_pair(predictions, labels)
    return float(matthews_corrcoef(y, p))


def pearson(predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation (STS-B); NaN if either side is constant."""
    p, y = _check_pair(predictions, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.pearsonr(p.astype(np.float64), y.astype(np.float64))[0])


def spearman(predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (STS-B); NaN if either side is constant."""
    p, y = _check_pair(predictions, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(p.astype(np.float64), y.astype(np.float64))[0])


def weighted_precision_recall_f1(predictions, labels) -> tuple[float, float, float]:
    """Precision, recall and F1 averaged over classes weighted by support (the paper's Table 4)."""
    p, y = _check_pair(predictions, labels)
    precision, recall, f1_value, _ = precision_recall_fscore_support(y, p, average="weighted", zero_division=0)
    return float(precision), float(recall), float(f1_value)


def mse(predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Mean squared error (lower is better)."""
    p, y = _check_pair(predictions, labels)
    return float(np.mean((p.astype(np.float64) - y.astype(np.float64)) ** 2))


def _check_pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = _to_numpy(predictions), _to_numpy(labels)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"expected 1-D predictions and labels, got shapes {p.shape} and {y.shape}")
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions but {len(y)} labels")
    if len(p) == 0:
        raise ValueError("cannot compute a metric over zero examples")
    return p, y


_METRIC_FNS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearman": spearman,
    "precision_weighted": lambda p, y: weighted_precision_recall_f1(p, y)[0],
    "recall_weighted": lambda p, y: weighted_precision_recall_f1(p, y)[1],
    "f1_weighted": lambda p, y: weighted_precision_recall_f1(p, y)[2],
    "mse": mse,
    "neg_mse": lambda p, y: -mse(p, y),
}


def predictions_from_outputs(task: str | GlueTask, predictions: Any) -> np.ndarray:
    """Turn model outputs into label predictions.

    Classification: logits ``(N, num_labels)`` are arg-maxed; ``(N,)`` integer class ids are taken as they are.
    Regression (STS-B): ``(N, 1)`` or ``(N,)`` scores, squeezed to ``(N,)`` float64.

    Raises:
        ValueError: on a shape that fits neither form, or non-integer class predictions.
    """
    task = get_task(task)
    p = _to_numpy(predictions)
    if task.is_regression:
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        if p.ndim != 1:
            raise ValueError(f"{task.name}: expected regression outputs of shape (N,) or (N, 1), got {p.shape}")
        return p.astype(np.float64)
    if p.ndim == 2:
        if p.shape[1] != task.num_labels:
            raise ValueError(f"{task.name}: logits have {p.shape[1]} columns, the task has {task.num_labels} labels")
        return p.argmax(axis=1)
    if p.ndim != 1:
        raise ValueError(f"{task.name}: expected logits (N, {task.num_labels}) or class ids (N,), got {p.shape}")
    if p.dtype.kind == "f":
        if not np.all(np.isfinite(p)) or not np.all(p == np.round(p)):
            raise ValueError(f"{task.name}: 1-D predictions must be integer class ids, got non-integer floats")
        p = p.astype(np.int64)
    return p


def compute_metrics(task: str | GlueTask, predictions: Any, labels: Any) -> dict[str, float]:
    """All metrics of ``task`` (``task.metric_names``) for one split.

    Args:
        task: task name or :class:`GlueTask`.
        predictions: logits ``(N, C)``, class ids ``(N,)``, or regression scores ``(N,)`` / ``(N, 1)``
            (list, numpy array or torch tensor).
        labels: gold labels ``(N,)``.

    Returns:
        ``{metric_name: value}`` as Python floats, e.g. ``{"accuracy": 0.88, "f1": 0.91}`` for MRPC.
    """
    task = get_task(task)
    p = predictions_from_outputs(task, predictions)
    y = _to_numpy(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if not task.is_regression:
        if y.dtype.kind == "f":
            if not np.all(y == np.round(y)):
                raise ValueError(f"{task.name}: labels must be integer class ids")
            y = y.astype(np.int64)
        bad = ~np.isin(y, task.label_set)
        if bad.any():
            raise ValueError(f"{task.name}: {int(bad.sum())} labels outside the label set {list(task.label_set)}"
                             f" (e.g. {y[bad][0]!r}); unlabelled test splits have no metrics")
    return {name: _METRIC_FNS[name](p, y) for name in task.metric_names}


def paper_score(task: str | GlueTask, metrics: dict[str, float]) -> float:
    """The number the paper reports for ``task`` out of a :func:`compute_metrics` dict."""
    return metrics[get_task(task).paper_metric]
