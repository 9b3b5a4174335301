"""GLUE metrics against hand-computed values (explicit float64 formulas in the tests)."""

from __future__ import annotations

import math

import glue_metrics as gm  # noqa: E402
import numpy as np
import pytest
import torch
from glue_tasks import GLUE_TASK_NAMES as TASK_NAMES  # noqa: E402
from glue_tasks import TASKS, get_task  # noqa: E402

PRED = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1]
GOLD = [1, 0, 0, 1, 1, 0, 1, 0, 0, 1]


def _confusion(p, y):
    tp = sum(1 for a, b in zip(p, y) if a == 1 and b == 1)
    tn = sum(1 for a, b in zip(p, y) if a == 0 and b == 0)
    fp = sum(1 for a, b in zip(p, y) if a == 1 and b == 0)
    fn = sum(1 for a, b in zip(p, y) if a == 0 and b == 1)
    return tp, tn, fp, fn


def _pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _avg_ranks(x):
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def test_hand_computed_confusion_values():
    tp, tn, fp, fn = _confusion(PRED, GOLD)
    assert (tp, tn, fp, fn) == (4, 3, 2, 1)  # counted by eye from PRED / GOLD above
    assert gm.accuracy(PRED, GOLD) == pytest.approx(7 / 10)
    assert gm.f1(PRED, GOLD) == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc == pytest.approx(10 / math.sqrt(6 * 5 * 5 * 4))
    assert gm.matthews_correlation(PRED, GOLD) == pytest.approx(mcc, abs=1e-12)


def test_f1_uses_positive_class_one():
    # swapping the classes changes F1 (it is not symmetric): F1 of class 0 would be 2*3/(2*3+1+2) = 6/9
    flipped_p, flipped_y = [1 - v for v in PRED], [1 - v for v in GOLD]
    assert gm.f1(flipped_p, flipped_y) == pytest.approx(6 / 9)
    assert gm.f1([0, 0, 0], [1, 0, 1]) == 0.0  # positive class never predicted


def test_pearson_spearman_formula():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 40).round(1).tolist()  # rounded: ties exercise average ranks
    p = (np.asarray(y) + rng.normal(0, 1.0, 40)).tolist()
    assert gm.pearson(p, y) == pytest.approx(_pearson(p, y), abs=1e-12)
    assert gm.spearman(p, y) == pytest.approx(_pearson(_avg_ranks(p), _avg_ranks(y)), abs=1e-12)


def test_constant_predictions():
    assert math.isnan(gm.pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]))
    assert math.isnan(gm.spearman([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]))
    assert gm.matthews_correlation([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0


def test_compute_metrics_from_logits_and_ids():
    logits = torch.tensor([[0.2, 1.0] if v == 1 else [3.0, -1.0] for v in PRED])
    out = gm.compute_metrics("mrpc", logits, torch.tensor(GOLD))
    assert set(out) == {"accuracy", "f1"}
    assert out["accuracy"] == pytest.approx(0.7) and out["f1"] == pytest.approx(8 / 11)
    assert all(type(v) is float for v in out.values())
    assert gm.compute_metrics("mrpc", np.array(PRED), GOLD) == out  # already arg-maxed
    assert gm.compute_metrics("cola", logits.to(torch.bfloat16), GOLD)["matthews_correlation"] == pytest.approx(
        gm.matthews_correlation(PRED, GOLD))


def test_compute_metrics_mnli_three_classes():
    labels = [0, 1, 2, 2, 1, 0]
    logits = np.zeros((6, 3))
    preds = [0, 1, 1, 2, 0, 0]
    logits[np.arange(6), preds] = 1.0
    assert gm.compute_metrics("mnli", logits, labels) == {"accuracy": pytest.approx(4 / 6)}


def test_compute_metrics_stsb_squeezes():
    y = [0.0, 1.5, 2.0, 4.5, 5.0]
    p = [[0.3], [1.0], [2.5], [4.0], [4.9]]
    out = gm.compute_metrics("stsb", torch.tensor(p), torch.tensor(y))
    flat = [v[0] for v in p]
    assert out["pearson"] == pytest.approx(_pearson(flat, y), abs=1e-6)
    assert out["spearman"] == pytest.approx(1.0)  # same order
    assert gm.paper_score("stsb", out) == out["pearson"]


def test_metric_names_match_registry():
    for name in TASK_NAMES:
        task = get_task(name)
        n = 6
        labels = [1.0, 2.0, 3.0, 0.5, 4.0, 2.2] if task.is_regression else [i % task.num_labels for i in range(n)]
        preds = [1.1, 2.5, 2.0, 0.4, 3.9, 2.0] if task.is_regression else labels[::-1]
        assert tuple(gm.compute_metrics(name, preds, labels)) == task.metric_names
    assert TASKS["cola"].paper_metric == "matthews_correlation"
    assert TASKS["stsb"].paper_metric == "pearson"
    assert {TASKS[t].paper_metric for t in TASK_NAMES if t not in ("cola", "stsb")} == {"accuracy"}


@pytest.mark.parametrize(
    "task, preds, labels, match",
    [
        ("sst2", [0, 1], [0, 1, 1], "2 predictions but 3 labels"),
        ("sst2", np.zeros((3, 3)), [0, 1, 1], "3 columns, the task has 2 labels"),
        ("sst2", [], [], "zero examples"),
        ("sst2", [0, 1, 1], [0, 1, 2], "1 labels outside the label set"),
        ("sst2", [0.3, 0.9], [0, 1], "integer class ids"),
        ("stsb", np.zeros((2, 2)), [0.0, 1.0], r"\(N,\) or \(N, 1\)"),
        ("sst-3", [0], [0], "valid tasks: cola, sst2"),
    ],
)
def test_compute_metrics_rejects_bad_input(task, preds, labels, match):
    with pytest.raises(ValueError, match=match):
        gm.compute_metrics(task, preds, labels)


def test_task_registry():
    assert TASK_NAMES == ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
    assert get_task("SST-2") is TASKS["sst2"] and get_task("STS-B") is TASKS["stsb"]
    assert TASKS["stsb"].num_labels == 1 and TASKS["stsb"].is_regression
    assert TASKS["mnli"].num_labels == 3 and TASKS["mnli"].eval_splits == ("validation_matched",
                                                                           "validation_mismatched")
    assert TASKS["qqp"].text_columns == ("question1", "question2")
    assert TASKS["qnli"].text_columns == ("question", "sentence")
    assert TASKS["cola"].text_columns == ("sentence",) and not TASKS["cola"].is_pair


def test_weighted_metrics_and_mse_by_hand():
    labels = [0, 0, 0, 1, 1, 1, 1]
    preds = [0, 1, 1, 1, 1, 1, 0]
    # class 0: P = 1/2, R = 1/3, F1 = 0.4 (support 3); class 1: P = 3/5, R = 3/4, F1 = 2/3 (support 4)
    out = gm.compute_metrics("protein_classification", preds, labels)
    assert out["accuracy"] == pytest.approx(4 / 7)
    assert out["precision_weighted"] == pytest.approx((3 * 0.5 + 4 * 0.6) / 7)
    assert out["recall_weighted"] == pytest.approx((3 * (1 / 3) + 4 * 0.75) / 7)
    assert out["f1_weighted"] == pytest.approx((3 * 0.4 + 4 * (2 / 3)) / 7)
    reg = gm.compute_metrics("protein_regression", [1.0, 2.0, 4.0], [1.5, 2.0, 3.0])
    assert reg["mse"] == pytest.approx((0.25 + 0 + 1.0) / 3)
    assert reg["neg_mse"] == -reg["mse"]
    assert get_task("protein_regression").select_metric == "neg_mse"
    assert get_task("rotten_tomatoes").select_metric == "accuracy"
