"""The statistics every report uses: seed series, paired differences (percentile bootstrap interval of the mean,
Wilcoxon signed-rank test), Holm's adjustment, and the BiDoRA-against-DoRA pairing of the paper tables.

Differences are a − b, in the units of the values given (the reports give percent points).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import bootstrap, wilcoxon

# Below this many non-zero differences the exact test cannot reach p < 0.05 two-sided (2 / 2^5 = 0.0625).
MIN_PAIRS_FOR_5_PERCENT = 6


def mean_and_sample_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return float(np.median(present)) if present else None


@dataclass
class Series:
    """Values of one unit (a method, a table cell, a point of a curve), one per seed, in seed order."""

    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return mean_and_sample_std(self.values)[0]

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof = 1); None for a single seed."""
        return mean_and_sample_std(self.values)[1]


def group_series(items: Iterable, key: Callable, value: Callable, seed: Callable = lambda x: x.seed) -> dict:
    """{key(item): Series of value(item)}, seeds ascending. Two items with the same key and seed are an error."""
    out: dict[Any, Series] = {}
    for item in sorted(items, key=seed):
        s = out.setdefault(key(item), Series())
        if seed(item) in s.seeds:
            raise ValueError(f"two results for {key(item)!r} seed {seed(item)}")
        s.values.append(value(item))
        s.seeds.append(seed(item))
    return out


@dataclass
class PairedTest:
    """Paired differences d_i = a_i − b_i: their mean, a bootstrap interval of the mean, and the signed-rank test."""

    n: int = 0
    n_nonzero: int = 0
    mean_diff: float | None = None
    ci_low: float | None = None  # percentile bootstrap interval of the mean difference (None below 2 pairs)
    ci_high: float | None = None
    confidence: float = 0.95
    statistic: float | None = None  # min(W+, W-)
    p_two_sided: float | None = None
    p_greater: float | None = None  # one-sided: a better than b (positive differences)
    messages: list[str] = field(default_factory=list)

    @property
    def p_floor(self) -> float | None:
        """The smallest two-sided p the exact test can reach with this many non-zero differences."""
        return 2.0 / 2**self.n_nonzero if self.n_nonzero else None


def paired_test(diffs, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> PairedTest:
    """Mean of the paired differences, its percentile bootstrap interval (scipy, fixed seed: the same interval on
    every call) and the Wilcoxon signed-rank test (scipy, zero differences dropped, exact for small n).

    With few pairs the bootstrap interval is too narrow (3 seeds give at most 10 distinct resamples) and the test
    cannot reach small p (``messages`` says so); both are reported rather than hidden.
    """
    d = np.asarray(diffs, dtype=np.float64)
    test = PairedTest(n=len(d), n_nonzero=int(np.count_nonzero(d)), confidence=confidence)
    if test.n == 0:
        test.messages.append("no pairs; no test")
        return test
    test.mean_diff = float(d.mean())
    if test.n >= 2:
        if np.all(d == d[0]):
            test.ci_low = test.ci_high = float(d[0])
        else:
            ci = bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                           rng=np.random.default_rng(seed)).confidence_interval
            test.ci_low, test.ci_high = float(ci.low), float(ci.high)
    if test.n_nonzero == 0:
        test.messages.append("every paired difference is zero; the test is undefined")
        return test
    if test.n_nonzero < MIN_PAIRS_FOR_5_PERCENT:
        test.messages.append(
            f"only {test.n_nonzero} non-zero differences: the smallest two-sided p the exact test can give is "
            f"2/2^{test.n_nonzero} = {test.p_floor:.4g}, so it cannot show a difference at the 5% level"
        )
    if test.n_nonzero < test.n:
        test.messages.append(f"{test.n - test.n_nonzero} zero difference(s) dropped (zero_method='wilcox')")
    two = wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    test.statistic, test.p_two_sided = float(two.statistic), float(two.pvalue)
    test.p_greater = float(wilcoxon(d, zero_method="wilcox", alternative="greater").pvalue)
    return test


def seed_differences(a: Series, b: Series, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """``a − b`` per seed both have (times ``scale``), in ``a``'s seed order: the seeds and the differences."""
    bv = dict(zip(b.seeds, b.values))
    pairs = [(s, scale * (v - bv[s])) for s, v in zip(a.seeds, a.values) if s in bv]
    return [s for s, _ in pairs], [d for _, d in pairs]


def paired_differences(a: Series, b: Series, scale: float = 1.0) -> tuple[list[int], PairedTest]:
    """``a − b`` over the seeds both have (times ``scale``): the seeds used and the paired test."""
    seeds, diffs = seed_differences(a, b, scale)
    return seeds, paired_test(diffs)


def holm_adjust(p_values) -> list[float | None]:
    """Holm's step-down adjustment of a family of p values (Holm 1979, "A simple sequentially rejective multiple
    test procedure"): sort ascending, ``p_(i) · (m − i + 1)`` (i from 1), made non-decreasing, capped at 1, returned
    in the input order. Rejecting where the adjusted p < α controls the family-wise error rate at α. ``None``
    entries (no test possible) are left out of the family and stay ``None``."""
    present = [(i, float(p)) for i, p in enumerate(p_values) if p is not None]
    m, adjusted, running = len(present), [None] * len(p_values), 0.0
    for rank, (i, p) in enumerate(sorted(present, key=lambda x: x[1])):
        running = max(running, min(1.0, p * (m - rank)))
        adjusted[i] = running
    return adjusted


# ---- the paper tables' test: BiDoRA against DoRA over (model, rank, task, seed) pairs -----------------------------


@dataclass(kw_only=True)
class WilcoxonReport(PairedTest):
    a: str
    b: str
    pair_by: str  # "seed" or "task-mean"
    pairs: list[dict] = field(default_factory=list)  # model, rank, task, seed (None for task means), a, b, diff
    unpaired: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)


def make_pairs(scores, a: str, b: str, pair_by: str, tasks, lower_is_better=()) -> tuple[str, list[dict], list[str]]:
    """Pair the scores of methods `a` and `b`: the same seed of the same (model, rank, task), or with ``task-mean``
    (``auto`` when no seed pair exists) the per-(model, rank, task) means over seeds.

    Args:
        scores: objects with .model, .method, .rank, .task, .seed, .value (one per run and task).
        pair_by: "seed", "task-mean" or "auto" (seed if any seed pair exists, task means otherwise).
        tasks: task keys to use.
        lower_is_better: task keys whose difference is negated so that positive always means `a` is better.
    Returns:
        (mode used, pairs, descriptions of the runs left without a partner).
    """
    if pair_by not in {"seed", "task-mean", "auto"}:
        raise ValueError(f"pair_by must be 'seed', 'task-mean' or 'auto', got {pair_by!r}")
    tasks = set(tasks)
    by_seed: dict[tuple, dict[str, float]] = defaultdict(dict)
    for s in scores:
        if s.method in (a, b) and s.task in tasks:
            by_seed[(s.model, s.rank, s.task, s.seed)][s.method] = s.value
    seed_pairs = [k for k, v in by_seed.items() if len(v) == 2]
    mode = pair_by if pair_by != "auto" else ("seed" if seed_pairs else "task-mean")

    if mode == "seed":
        grouped = dict(by_seed)
    else:
        collected: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for (model, rank, task, _seed), v in by_seed.items():
            for method, value in v.items():
                collected[(model, rank, task, None)][method].append(value)
        grouped = {k: {m: float(np.mean(vals)) for m, vals in v.items()} for k, v in collected.items()}

    pairs, unpaired = [], []
    for key in sorted(grouped, key=lambda k: tuple(str(x) for x in k)):
        model, rank, task, seed = key
        values = grouped[key]
        if len(values) < 2:
            where = f"{model} r={rank} {task}" + (f" seed {seed}" if seed is not None else "")
            unpaired.append(f"{where}: only {next(iter(values))}")
            continue
        sign = -1.0 if task in lower_is_better else 1.0
        pairs.append({"model": model, "rank": rank, "task": task, "seed": seed, a: values[a], b: values[b],
                      "diff": sign * (values[a] - values[b])})
    return mode, pairs, unpaired


def wilcoxon_test(scores, a: str = "bidora", b: str = "dora", pair_by: str = "auto", tasks=None,
                  lower_is_better=()) -> WilcoxonReport:
    """Wilcoxon signed-rank test (scipy, zero differences dropped) of `a` against `b` on paired runs."""
    if tasks is None:
        raise ValueError("tasks must be given (the task keys to pair on)")
    mode, pairs, unpaired = make_pairs(scores, a, b, pair_by, tasks, lower_is_better)
    test = paired_test([p["diff"] for p in pairs])
    if test.n == 0:
        test.messages = [f"no pairs: no {mode} unit was run with both {a} and {b}; no test"]
    return WilcoxonReport(a=a, b=b, pair_by=mode, pairs=pairs, unpaired=unpaired, tasks=sorted(set(tasks)),
                          **vars(test))
