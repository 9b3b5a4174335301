"""Entity-level precision, recall and F1 for ``run_ner.py``, by calling ``seqeval`` directly
(``evaluate.load("seqeval")`` fetches its script from the hub, which an offline run cannot reach).

An entity counts as found only when its type and both of its ends match the gold entity exactly (CoNLL's ``conlleval``
rule, seqeval's default mode: an ``I-X`` after ``O`` or after another type starts an entity, as ``conlleval`` reads
it). Precision with no predicted entity, and recall with no gold entity, are 0 (never a warning or NaN), so F1 is 0
when nothing is found. ``accuracy`` is the share of tokens whose tag is right (``O`` included: high even for a model
that finds no entity).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ner_data import IGNORE
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

METRIC_NAMES = ("precision", "recall", "f1", "accuracy")


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]],
                  per_type: bool = False) -> dict[str, float]:
    """``{"precision", "recall", "f1", "accuracy"}`` over all sentences (micro-averaged over entities); with
    ``per_type`` also ``<TYPE>_precision``, ``<TYPE>_recall``, ``<TYPE>_f1``, ``<TYPE>_number`` (gold entities)."""
    gold, predicted = [list(s) for s in gold], [list(s) for s in predicted]
    if [len(s) for s in gold] != [len(s) for s in predicted]:
        raise ValueError("gold and predicted tag sequences differ in length")
    scores = {
        "precision": float(precision_score(gold, predicted, zero_division=0)),
        "recall": float(recall_score(gold, predicted, zero_division=0)),
        "f1": float(f1_score(gold, predicted, zero_division=0)),
        "accuracy": float(accuracy_score(gold, predicted)),
    }
    if per_type:
        report = classification_report(gold, predicted, output_dict=True, zero_division=0)
        for kind, row in report.items():
            if kind.endswith(" avg"):
                continue
            scores.update({f"{kind}_precision": float(row["precision"]), f"{kind}_recall": float(row["recall"]),
                           f"{kind}_f1": float(row["f1-score"]), f"{kind}_number": int(row["support"])})
    return scores


def tags_from_subwords(predictions: np.ndarray, label_ids: np.ndarray, labels: Sequence[str]):
    """``(gold, predicted)`` tag sequences from subword-level arrays: the positions whose label is not ``-100``
    (the first subword of every word, or every subword with ``label_all_tokens``). ``predictions`` are logits
    ``(examples, length, labels)`` or ids ``(examples, length)``."""
    ids = predictions.argmax(-1) if predictions.ndim == 3 else predictions
    gold, predicted = [], []
    for row_ids, row_labels in zip(ids, label_ids):
        keep = row_labels != IGNORE
        gold.append([labels[i] for i in row_labels[keep]])
        predicted.append([labels[i] for i in row_ids[keep]])
    return gold, predicted


def make_compute_metrics(labels: Sequence[str], per_type: bool = False):
    """A Trainer ``compute_metrics``: entity scores on the labelled subword positions of the evaluated split."""

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return entity_scores(*tags_from_subwords(np.asarray(logits), np.asarray(prediction.label_ids), labels),
                             per_type=per_type)

    return compute_metrics
