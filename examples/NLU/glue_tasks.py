"""The tasks the runner knows: the eight GLUE tasks of the BiDoRA paper, and local-file tasks (the offline demo,
proteins) that go through the same pipeline. Columns, labels, splits and metrics.

Column names and label ids follow the ``nyu-mll/glue`` dataset on the Hugging Face hub, so local files in the
same layout and the hub data go through one code path. Models are selected on ``select_metric``, which is always
"higher is better" (``neg_mse`` for the MSE tasks).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    Attributes:
        name: lower-case task name as used by ``nyu-mll/glue`` (``"mnli"``, ``"stsb"``, ...).
        text_columns: one column (single sentence) or two (sentence pair), in the order fed to the tokenizer.
        label_names: class names indexed by label id; empty for the regression task (STS-B).
        eval_splits: dev splits, each reported separately (MNLI: matched and mismatched).
        test_splits: unlabelled GLUE test splits.
        metric_names: keys of the dict :func:`glue_metrics.compute_metrics` returns for this task.
        paper_metric: the metric the BiDoRA paper reports for this task (Table 1 / Table 2).
        label_range: closed interval of valid regression targets (STS-B: 0..5); ``None`` for classification.
        local_only: no hub dataset exists; the task reads local files (``--train_file`` ...) only.
        selection_metric: metric used for model selection when it is not ``paper_metric`` (e.g. ``neg_mse``).
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    eval_splits: tuple[str, ...]
    test_splits: tuple[str, ...]
    metric_names: tuple[str, ...]
    paper_metric: str
    label_range: tuple[float, float] | None = None
    local_only: bool = False
    selection_metric: str | None = None

    @property
    def select_metric(self) -> str:
        """The "higher is better" metric that model selection maximises."""
        return self.selection_metric or self.paper_metric

    @property
    def is_regression(self) -> bool:
        """True for STS-B (a similarity score predicted by a single output)."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Width of the model head: number of classes, or 1 for regression."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def label_set(self) -> tuple[int, ...]:
        """Valid integer labels (empty for regression)."""
        return tuple(range(len(self.label_names)))

    @property
    def is_pair(self) -> bool:
        """True when each example is a pair of texts."""
        return len(self.text_columns) == 2


_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1")

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), ("validation",), ("test",),
                 ("matthews_correlation",), "matthews_correlation"),
        GlueTask("sst2", ("sentence",), ("negative", "positive"), ("validation",), ("test",), _ACC, "accuracy"),
        GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("validation",), ("test",),
                 _ACC_F1, "accuracy"),
        GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("validation",), ("test",),
                 _ACC_F1, "accuracy"),
        GlueTask("stsb", ("sentence1", "sentence2"), (), ("validation",), ("test",), ("pearson", "spearman"),
                 "pearson", label_range=(0.0, 5.0)),
        GlueTask("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                 ("validation_matched", "validation_mismatched"), ("test_matched", "test_mismatched"), _ACC,
                 "accuracy"),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("validation",), ("test",),
                 _ACC, "accuracy"),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("validation",), ("test",),
                 _ACC, "accuracy"),
    )
}

GLUE_TASK_NAMES: tuple[str, ...] = tuple(TASKS)

_WEIGHTED = ("accuracy", "precision_weighted", "recall_weighted", "f1_weighted")

# Tasks on local files only, through the same pipeline: the offline demo (examples/demo) and proteins (examples/bio).
TASKS.update(
    {
        t.name: t
        for t in (
            GlueTask("rotten_tomatoes", ("sentence",), ("rotten", "fresh"), ("validation",), ("test",), _ACC,
                     "accuracy", local_only=True),
            GlueTask("vader_movies", ("sentence",), (), ("validation",), ("test",), ("pearson", "spearman", "mse"),
                     "pearson", label_range=(-4.0, 4.0), local_only=True),
            GlueTask("protein_classification", ("sequence",), ("negative", "positive"), ("validation",), ("test",),
                     _WEIGHTED, "accuracy", local_only=True),
            GlueTask("protein_regression", ("sequence",), (), ("validation",), ("test",),
                     ("mse", "neg_mse", "pearson", "spearman"), "mse", local_only=True, selection_metric="neg_mse"),
        )
    }
)

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str | GlueTask) -> GlueTask:
    """Return the :class:`GlueTask` called ``name`` (case-insensitive; ``"sst-2"`` and ``"sts-b"`` accepted).

    Raises:
        ValueError: for an unknown task, listing the valid names.
    """
    if isinstance(name, GlueTask):
        return name
    key = str(name).strip().lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return TASKS[key]
