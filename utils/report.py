"""Reports over runs' results.json: per-method tables, tables next to the BiDoRA paper, paired tests and figures.

    python utils/report.py RUNS... [--split test] [--metric M] [--extra-metrics f1_weighted] [--tasks T]
                           [--methods lora,dora,bidora] [--seeds 0,1,2] [--compare bidora:dora,...]
                           [--markdown F] [--json F] [--figure F] [--title T]
    python utils/report.py RUNS... --paper [--tasks cola,rte] [--seeds 1,2,3] [--compare bidora:dora]
                           [--pair-by auto|seed|task-mean] [--markdown F] [--json F] [--figure F]

RUNS are folders searched recursively for results.json (docs/CONTRACTS.md), or such files. ``--methods`` and
``--seeds`` keep only those runs and are the grid expected: an absent (method, seed) is reported in the table, the
JSON and on stderr, never dropped silently. Values in results.json are fractions: accuracy-like metrics are shown in
percent, MSE-like ones raw. Mean ± sample std (ddof = 1), n shown. Exit status 0, or 1 on bad input.

Method table (default; the runs of one task and model): one row per method on ``--split`` (default test) with the
metric (default: the task's ``paper_metric`` from results.json), the seeds, trainable parameters, median wall time
and median peak memory. For BiDoRA runs with a retraining phase the reported model is the retrained one; a second row,
"bidora (search only)", is the search phase alone: for each run the search-phase step with the best held-out value
(``split == "heldout"`` in ``history``) of the run's ``select_metric`` -- selection never looks at the reported split
-- and the reported split's metric at that step; its wall time is the elapsed time at the end of the search phase
(``log.csv``), its memory the whole run's peak. Below the table, paired differences a − b over the seeds both rows
have (``--compare``; default every pair of rows): mean, 95% percentile bootstrap interval, Wilcoxon signed-rank p.

Paper tables (``--paper``): rows (model, method, rank), columns tasks, each with the paper's number
(utils/data/paper_results.json) and ours − paper; each task's metric and split are the paper's. The GLUE average is
over the GLUE tasks present, marked (k/8) when incomplete, against the paper over the same tasks. Missing (task,
method, seed) combinations are listed (grid: every task and seed seen per model, or ``--tasks`` / ``--seeds``), files
of tasks the paper lacks are listed, and BiDoRA is tested against DoRA (utils/significance.py, GLUE tasks).

For other reports (learning curves over train sizes, sensitivity arms): ``load_runs`` gives every run with its raw
JSON (``Run.raw``), ``metric_value`` reads a number, ``group_series`` groups any (key, seed, value) into ``Series``
(mean, sample std), and ``paired_differences`` / ``utils.significance.paired_test`` compare two of them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script (python utils/report.py): make `utils` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralib.files import atomic_write, atomic_write_text  # noqa: E402
from utils.files import mean_and_sample_std  # noqa: E402
from utils.paper_results import (  # noqa: E402
    PaperData,
    load_paper_data,
    normalise_method,
    normalise_model,
    normalise_task,
)
from utils.significance import (  # noqa: E402
    MIN_PAIRS_FOR_5_PERCENT,
    PairedTest,
    format_wilcoxon_markdown,
    paired_test,
    wilcoxon_test,
)

RESULTS_NAME = "results.json"
SEARCH_ONLY = "bidora (search only)"
METHOD_ORDER = ["ft", "adapter", "lora", "dora", "bidora", SEARCH_ONLY]
RAW_METRICS = frozenset({"mse", "neg_mse", "rmse", "mae", "loss"})  # shown raw; every other metric is a fraction
LOWER_IS_BETTER = frozenset({"mse", "rmse", "mae", "loss"})


# ------------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Run:
    """One results.json. ``method`` is normalised ('BiDoRA' -> 'bidora'); task and model are as written."""

    path: str
    task: str
    model: str
    method: str
    rank: int | None
    seed: int
    eval: dict[str, dict[str, float]]
    history: list[dict]
    select_metric: str | None
    paper_metric: str | None
    has_retrain: bool
    trainable_parameters: int | None
    wall_time_s: float | None
    peak_memory_bytes: int | None
    raw: dict = field(repr=False, compare=False)  # the whole file (config, data_sizes, ...) for other reports


def find_results(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    """results.json files under the given folders (recursively), plus the files given; no file twice."""
    found: list[Path] = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else list(inputs):
        path = Path(item)
        if path.is_dir():
            found += sorted(path.rglob(RESULTS_NAME))
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{item}: no such file or directory")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError(f"no {RESULTS_NAME} under {inputs if isinstance(inputs, (str, Path)) else list(inputs)}")
    return unique


def load_run(path: str | Path) -> Run:
    """Read one results.json. Raises ValueError naming the file for anything malformed."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        method, seed, evals = normalise_method(str(raw["method"])), int(raw["seed"]), raw["eval"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: needs 'method', 'seed' and 'eval' ({err!r})") from err
    if not isinstance(evals, dict):
        raise ValueError(f"{path}: 'eval' must be a {{split: {{metric: value}}}} mapping")
    history = raw.get("history") or []
    config = raw.get("config") or {}
    has_retrain = (config.get("retrain_max_steps") or config.get("retrain_iterations") or 0) > 0 or any(
        h.get("phase") == "retrain" for h in history)
    # Rank means nothing for full fine-tuning; ignore whatever default the config carried.
    rank = None if method == "ft" or raw.get("rank") is None else int(raw["rank"])
    return Run(str(path), str(raw.get("task")), str(raw.get("model")), method, rank, seed, evals, history,
               raw.get("select_metric"), raw.get("paper_metric"), has_retrain, raw.get("trainable_parameters"),
               raw.get("wall_time_s"), raw.get("peak_memory_bytes"), raw)


def load_runs(inputs) -> list[Run]:
    return [load_run(p) for p in find_results(inputs)]


def _check_fraction(path: str, metric: str, value: float) -> float:
    if metric not in RAW_METRICS and math.isfinite(value) and abs(value) > 1.0:
        raise ValueError(f"{path}: {metric} = {value} is not a fraction (percent written by mistake?)")
    return value


def metric_value(run: Run, split: str, metric: str) -> float:
    """``eval[split][metric]`` of a run, checked (ValueError naming the file when absent or not a fraction)."""
    if split not in run.eval:
        raise ValueError(f"{run.path}: no split {split!r} in eval (has {sorted(run.eval)}); choose --split")
    if metric not in run.eval[split]:
        raise ValueError(f"{run.path}: eval[{split!r}] has no {metric!r} (has {sorted(run.eval[split])})")
    return _check_fraction(run.path, metric, float(run.eval[split][metric]))


# --------------------------------------------------------------------------------------------------- statistics


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


def seed_differences(a: Series, b: Series, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """``a − b`` per seed both have (times ``scale``), in ``a``'s seed order: the seeds and the differences."""
    bv = dict(zip(b.seeds, b.values))
    pairs = [(s, scale * (v - bv[s])) for s, v in zip(a.seeds, a.values) if s in bv]
    return [s for s, _ in pairs], [d for _, d in pairs]


def paired_differences(a: Series, b: Series, scale: float = 1.0) -> tuple[list[int], PairedTest]:
    """``a − b`` over the seeds both have (times ``scale``): the seeds used and the paired test."""
    seeds, diffs = seed_differences(a, b, scale)
    return seeds, paired_test(diffs)


# ------------------------------------------------------------------------------------------------- method table


@dataclass
class MethodRow(Series):
    label: str = ""
    method: str = ""
    extra: dict[str, list[float]] = field(default_factory=dict)  # further metrics, same seed order
    trainable_parameters: list[int] = field(default_factory=list)
    wall_times_s: list[float] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)
    selected_steps: list[int] = field(default_factory=list)  # search-only row: the heldout-best step per seed
    missing_seeds: list[int] = field(default_factory=list)

    def extra_stats(self, metric: str) -> tuple[float, float | None]:
        return mean_and_sample_std(self.extra[metric])

    def add(self, seed, value, extra, params, wall, memory) -> None:
        self.seeds.append(seed)
        self.values.append(value)
        for m, v in extra.items():
            self.extra.setdefault(m, []).append(v)
        for attr, v, kind in (("trainable_parameters", params, int), ("wall_times_s", wall, float),
                              ("peak_memory_bytes", memory, int)):
            if v is not None:
                getattr(self, attr).append(kind(v))


@dataclass
class MethodTable:
    task: str
    model: str
    split: str
    metric: str
    extra_metrics: list[str]
    expected_seeds: list[int]
    rows: list[MethodRow]
    files: list[str]
    pairs: list[tuple[str, str, list[int], PairedTest]] = field(default_factory=list)  # (a, b, seeds, test)

    @property
    def missing(self) -> dict[str, list[int]]:
        return {r.label: r.missing_seeds for r in self.rows if r.missing_seeds}


def _phase_ends_from_log(run_dir: Path) -> dict[str, float]:
    """Elapsed seconds at the last log.csv row of each phase (``{}`` without a readable log)."""
    ends: dict[str, float] = {}
    try:
        with open(run_dir / "log.csv", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if row.get("phase") and row.get("elapsed_s"):
                    ends[row["phase"]] = float(row["elapsed_s"])
    except (OSError, ValueError, csv.Error):
        return {}
    return ends


def _search_end_from_log(run_dir: Path) -> float | None:
    """Elapsed seconds at the last search-phase step of log.csv (None without a readable log)."""
    return _phase_ends_from_log(run_dir).get("search")


def search_only_value(run: Run, split: str, metrics: list[str]) -> tuple[int, dict[str, float]]:
    """BiDoRA's search phase alone: the search-phase step with the best held-out ``select_metric`` (ties: the
    earliest; NaN is the worst value) and the ``metrics`` on ``split`` at that step, from ``history``."""
    if not run.select_metric:
        raise ValueError(f"{run.path}: no 'select_metric' in results.json (needed for the search-only row)")
    heldout = sorted((h for h in run.history if h.get("phase") == "search" and h.get("split") == "heldout"),
                     key=lambda h: h["step"])
    if not heldout:
        raise ValueError(f"{run.path}: no held-out evaluation in the search phase of history")
    best_step, best_value = heldout[0]["step"], None  # every value NaN: the earliest, as the trainer keeps it
    for h in heldout:
        if run.select_metric not in h:
            raise ValueError(f"{run.path}: heldout history entry at step {h['step']} lacks {run.select_metric!r}")
        v = float(h[run.select_metric])
        if not math.isnan(v) and (best_value is None or v > best_value):
            best_step, best_value = h["step"], v
    at = [h for h in run.history if h.get("step") == best_step and h.get("split") == split
          and h.get("phase") == "search"]
    if not at:
        raise ValueError(f"{run.path}: split {split!r} was not evaluated at the search step {best_step}")
    missing = [m for m in metrics if m not in at[0]]
    if missing:
        raise ValueError(f"{run.path}: history[{split!r}, step {best_step}] has no {missing[0]!r}")
    return int(best_step), {m: _check_fraction(run.path, m, float(at[0][m])) for m in metrics}


def _method_key(label: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER), label)


def method_table(runs: list[Run], split: str = "test", metric: str | None = None, extra_metrics=None,
                 methods=None, seeds=None, task: str | None = None, compare=None) -> MethodTable:
    """Group the runs of one task and model by method (see the module docstring).

    Args:
        metric: default the task's ``paper_metric``. methods / seeds: the grid expected (other runs are left out;
            absent ones are reported as missing). task: keep only this task. compare: [(a, b)] row labels for
            paired differences ("search" names the search-only row); default every pair, later row − earlier.
    Raises:
        ValueError: no runs, several tasks or models, two results for one (method, seed), a missing metric.
    """
    extra_metrics = list(extra_metrics or [])
    if task is not None:
        runs = [r for r in runs if normalise_task(r.task) == normalise_task(task)]
    if not runs:
        raise ValueError("no runs to compare" + (f" for task {task!r}" if task else ""))
    for attr in ("task", "model"):
        values = sorted({getattr(r, attr) for r in runs})
        if len(values) > 1:
            hint = " (pass --tasks, or --paper)" if attr == "task" else " (one model per folder, or --paper)"
            raise ValueError(f"runs of several {attr}s: {values}{hint}")
    if methods is not None:
        methods = [normalise_method(m) for m in methods]
        runs = [r for r in runs if r.method in methods]
    if seeds is not None:
        runs = [r for r in runs if r.seed in seeds]
    if metric is None:
        paper = {r.paper_metric for r in runs if r.paper_metric}
        if len(paper) != 1:
            raise ValueError(f"cannot tell the task's metric from the files (paper_metric: {sorted(paper)}); "
                             "pass --metric")
        metric = paper.pop()
    seen: dict[tuple[str, int], str] = {}
    rows: dict[str, MethodRow] = {}
    for r in sorted(runs, key=lambda r: r.seed):
        if (key := (r.method, r.seed)) in seen:
            raise ValueError(f"two results for method {r.method!r} seed {r.seed}: {seen[key]} and {r.path}")
        seen[key] = r.path
        rows.setdefault(r.method, MethodRow(label=r.method, method=r.method)).add(
            r.seed, metric_value(r, split, metric), {m: metric_value(r, split, m) for m in extra_metrics},
            r.trainable_parameters, r.wall_time_s, r.peak_memory_bytes)
        if r.method == "bidora" and r.has_retrain:
            step, values = search_only_value(r, split, [metric, *extra_metrics])
            search = rows.setdefault(SEARCH_ONLY, MethodRow(label=SEARCH_ONLY, method="bidora"))
            search.add(r.seed, values[metric], {m: values[m] for m in extra_metrics}, r.trainable_parameters,
                       _search_end_from_log(Path(r.path).parent), r.peak_memory_bytes)
            search.selected_steps.append(step)
    expected = sorted(set(seeds) if seeds is not None else {r.seed for r in runs})
    for method in methods or []:
        rows.setdefault(method, MethodRow(label=method, method=method))
    for row in rows.values():
        row.missing_seeds = [s for s in expected if s not in row.seeds]
    ordered = sorted(rows.values(), key=lambda row: _method_key(row.label))
    table = MethodTable(runs[0].task, runs[0].model, split, metric, extra_metrics, expected, ordered,
                        sorted(r.path for r in runs))
    by_label = {r.label: r for r in ordered if r.n}
    if compare is None:
        labels = list(by_label)
        compare = [(a, b) for i, a in enumerate(labels) for b in labels[:i]]
    for a, b in compare:
        a, b = (SEARCH_ONLY if x in ("search", SEARCH_ONLY) else normalise_method(x) for x in (a, b))
        if a not in by_label or b not in by_label:
            raise ValueError(f"--compare {a}:{b}: no runs of {a if a not in by_label else b} (rows: {list(by_label)})")
        table.pairs.append((a, b, *paired_differences(by_label[a], by_label[b], display_scale(metric))))
    return table


def display_scale(metric: str) -> float:
    """100 for fractions shown in percent, 1 for MSE-like metrics."""
    return 1.0 if metric in RAW_METRICS else 100.0


def _fmt(metric: str, value: float | None, signed: bool = False, scaled: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—" if value is None else str(value)
    scale = display_scale(metric)
    value = value if scaled else value * scale
    return f"{value:{'+' if signed else ''}.{2 if scale == 100 else 4}f}"


def _mean_std(metric: str, values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = mean_and_sample_std(values)
    return f"{_fmt(metric, mean)} ± {_fmt(metric, std)} (n={len(values)})" if std is not None else \
        f"{_fmt(metric, mean)} (n={len(values)})"


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def method_markdown(table: MethodTable) -> str:
    """The method table as markdown, with the paired differences and notes on selection and missing seeds."""
    m = table.metric
    unit, better = ("%" if display_scale(m) == 100 else "raw"), ("lower" if m in LOWER_IS_BETTER else "higher")
    lines = [f"### {table.task} — {table.model}", "",
             f"Metric: `{m}` on `{table.split}` ({unit}, {better} is better); mean ± sample std over seeds.", ""]
    head = ["method", f"{m} ({table.split})", *table.extra_metrics, "seeds", "trainable params",
            "wall time (median)", "peak memory (median)", "missing seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        params, extra = sorted(set(row.trainable_parameters)), table.extra_metrics
        cells = [row.label, _mean_std(m, row.values), *(_mean_std(x, row.extra.get(x, [])) for x in extra),
                 ", ".join(f"{s}: {_fmt(m, v)}" for s, v in zip(row.seeds, row.values)) or "—",
                 "—" if not params else f"{params[0]:,}" + ("" if len(params) == 1 else f"–{params[-1]:,}"),
                 "—" if not row.wall_times_s else f"{_median(row.wall_times_s):.1f} s",
                 _fmt_bytes(_median(row.peak_memory_bytes)), ", ".join(map(str, row.missing_seeds)) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if table.pairs:
        lines += [f"Paired differences a − b over the seeds both have ({unit}; {better} is better): mean, "
                  "95% percentile bootstrap interval of the mean, Wilcoxon signed-rank test (two-sided).", "",
                  "| a − b | seeds | mean | 95% interval | Wilcoxon p | smallest reachable p |", "|" + "---|" * 6]
        for a, b, seeds, t in table.pairs:
            ci = "—" if t.ci_low is None else f"[{_fmt(m, t.ci_low, True, True)}, {_fmt(m, t.ci_high, True, True)}]"
            lines.append(f"| {a} − {b} | {', '.join(map(str, seeds)) or '—'} | {_fmt(m, t.mean_diff, True, True)} | "
                         f"{ci} | {'—' if t.p_two_sided is None else f'{t.p_two_sided:.3g}'} | "
                         f"{'—' if t.p_floor is None else f'{t.p_floor:.3g}'} |")
        if any(t.n < MIN_PAIRS_FOR_5_PERCENT for *_, t in table.pairs):
            lines += ["", "Fewer than 6 non-zero differences: the test cannot reach p < 0.05, and the bootstrap "
                      "interval of so few seeds is too narrow; read them as a description of these seeds."]
        lines.append("")
    search = next((r for r in table.rows if r.label == SEARCH_ONLY), None)
    if search is not None:
        lines.append(f"`{SEARCH_ONLY}`: the bi-level phase's model at its best held-out step (steps "
                     f"{search.selected_steps}), before retraining; wall time = time at the end of that phase, "
                     "memory = the whole run's peak.")
    if table.missing:
        lines.append("Missing runs: " + "; ".join(f"{k}: seeds {v}" for k, v in table.missing.items())
                     + f" (expected seeds {table.expected_seeds}).")
    lines.append(f"Files: {len(table.files)} results.json.")
    return "\n".join(lines) + "\n"


def method_json(table: MethodTable) -> dict[str, Any]:
    """JSON-ready summary (raw values, plus the display scale, means, stds, medians and the paired tests)."""
    rows = []
    for row in table.rows:
        d = asdict(row)
        d.update(n=row.n, mean=row.mean if row.n else None, std=row.std if row.n else None,
                 median_wall_time_s=_median(row.wall_times_s),
                 median_peak_memory_bytes=_median(row.peak_memory_bytes),
                 extra_stats={x: dict(zip(("mean", "std"), row.extra_stats(x))) for x in table.extra_metrics if row.n})
        rows.append(d)
    return {"task": table.task, "model": table.model, "split": table.split, "metric": table.metric,
            "display_scale": display_scale(table.metric), "extra_metrics": table.extra_metrics,
            "expected_seeds": table.expected_seeds, "missing": table.missing, "rows": rows, "files": table.files,
            "pairs": [{"a": a, "b": b, "seeds": s, "units": "percent points" if display_scale(table.metric) == 100
                       else "raw", **vars(t)} for a, b, s, t in table.pairs]}


# ------------------------------------------------------------------------------------------------- paper tables


class UnknownTaskError(ValueError):
    """A results file for a task the paper does not report (listed in the report, not aggregated)."""


@dataclass(frozen=True)
class Score:
    """One reported number: a task's metric of one run, in display units (percent, or raw MSE)."""

    path: str
    model: str
    method: str
    rank: int | None  # None for full fine-tuning
    seed: int
    task: str
    value: float
    metric: str
    split: str


@dataclass
class Collection:
    scores: list[Score]
    skipped: list[str]  # files not used, with the reason


def run_scores(run: Run, data: PaperData | None = None) -> list[Score]:
    """A run's numbers as the paper reports its task: one Score per task (two for MNLI with a mismatched split).

    A run that reports a single, differently named split uses it. Raises UnknownTaskError for a task the paper lacks,
    ValueError for an empty eval, a missing split or metric, or a value that is not a fraction.
    """
    data = data or load_paper_data()
    task, model = normalise_task(run.task, data), normalise_model(run.model, data)
    if not run.eval:
        raise ValueError(f"{run.path}: 'eval' must be a non-empty {{split: {{metric: value}}}} mapping")
    if task not in data.tasks:
        raise UnknownTaskError(f"{run.path}: task {run.task!r} is not one of the paper's tasks {sorted(data.tasks)}")
    out = []
    for spec in [data.tasks[task]] + [s for s in data.tasks.values() if s.derived_from == task]:
        primary = spec.derived_from is None
        split = next((s for s in spec.splits if s in run.eval), None)
        if split is None and primary and len(run.eval) == 1:
            split = next(iter(run.eval))
        if split is None:
            if primary:
                raise ValueError(f"{run.path}: none of the splits {list(spec.splits)} in eval (has {sorted(run.eval)})")
            continue  # e.g. an MNLI run without the mismatched split
        name = next((n for n in data.metric_aliases.get(spec.metric, (spec.metric,)) if n in run.eval[split]), None)
        if name is None:
            raise ValueError(f"{run.path}: eval[{split!r}] has no {spec.metric!r} (has {sorted(run.eval[split])})")
        value = float(run.eval[split][name])
        if not math.isfinite(value):
            raise ValueError(f"{run.path}: {spec.key} {name} = {value}")
        if spec.scale == 100 and abs(value) > 1.0:
            raise ValueError(f"{run.path}: {spec.key} {name} = {value} is not a fraction (already in percent?)")
        out.append(Score(run.path, model, run.method, run.rank, run.seed, spec.key, value * spec.scale, name, split))
    return out


def paper_scores(runs: list[Run], data: PaperData | None = None) -> Collection:
    """Every run's paper numbers; runs of tasks the paper lacks are listed, not dropped silently. Two files for the
    same (model, method, rank, task, seed) are an error."""
    data = data or load_paper_data()
    scores, skipped = [], []
    for run in runs:
        try:
            scores += run_scores(run, data)
        except UnknownTaskError as err:
            skipped.append(str(err))
    seen: dict[tuple, str] = {}
    for s in scores:
        key = (s.model, s.method, s.rank, s.task, s.seed)
        if key in seen:
            raise ValueError(f"two results for {key}: {seen[key]} and {s.path}")
        seen[key] = s.path
    return Collection(scores, skipped)


def summarise(scores) -> dict[tuple, dict[str, Series]]:
    """{(model, method, rank): {task: Series}}."""
    cells = group_series(scores, key=lambda s: (s.model, s.method, s.rank, s.task), value=lambda s: s.value)
    table: dict[tuple, dict[str, Series]] = defaultdict(dict)
    for (model, method, rank, task), cell in cells.items():
        table[(model, method, rank)][task] = cell
    return dict(table)


def group_order(key: tuple):
    model, method, rank = key
    return (model, -1 if rank is None else rank, *_method_key(method))


def missing_runs(scores, tasks=None, seeds=None) -> list[dict]:
    """(task, seed) combinations absent for a (model, method, rank) group: the grid of a model is ``tasks`` ×
    ``seeds`` when given, else every task and seed of any run of that model. MNLI-mm is not part of the grid."""
    data = load_paper_data()
    by_model: dict[str, list[Score]] = defaultdict(list)
    for s in scores:
        if data.tasks[s.task].derived_from is None:
            by_model[s.model].append(s)
    missing = []
    for model, runs in sorted(by_model.items()):
        grid_tasks = list(tasks) if tasks is not None else sorted({s.task for s in runs}, key=list(data.tasks).index)
        grid_seeds = sorted(seeds) if seeds is not None else sorted({s.seed for s in runs})
        present = {(s.method, s.rank, s.task, s.seed) for s in runs}
        for method, rank in sorted({(s.method, s.rank) for s in runs}, key=lambda g: group_order((model, *g))):
            missing += [{"model": model, "method": method, "rank": rank, "task": t, "seed": s}
                        for t in grid_tasks for s in grid_seeds if (method, rank, t, s) not in present]
    return missing


def glue_average(cells: dict[str, Series], data: PaperData) -> tuple[float | None, list[str]]:
    """Mean of the per-task means over the GLUE tasks present; (None, []) when there are none."""
    tasks = [t for t in data.task_order() if data.tasks[t].glue and t in cells]
    return (float(np.mean([cells[t].mean for t in tasks])), tasks) if tasks else (None, [])


def paper_average(row, tasks: list[str], data: PaperData) -> tuple[float | None, str]:
    """The paper's average over exactly ``tasks``: its published average when these are all its GLUE tasks, else the
    mean of its per-task numbers; None when the paper row lacks one of them."""
    if row is None or not tasks or any(t not in row.scores for t in tasks):
        return None, ""
    if set(tasks) == {t for t in row.scores if data.tasks[t].glue} and row.avg is not None:
        return float(row.avg), "published"
    return float(np.mean([row.scores[t] for t in tasks])), "same tasks"


def _num(x: float | None, decimals: int, signed: bool = False) -> str:
    return "—" if x is None else f"{x:{'+' if signed else ''}.{decimals}f}"


def _cell(cell: Series | None, decimals: int) -> str:
    if cell is None:
        return "—"
    return f"{cell.mean:.{decimals}f}{'' if cell.std is None else f' ± {cell.std:.{decimals}f}'} (n={cell.n})"


def paper_markdown(collection: Collection, missing: list[dict], tests_md: str | None = None,
                   data: PaperData | None = None) -> str:
    """One table per model next to the paper, notes, the metric and split used, missing runs, files not used, and
    the tests' markdown (utils.significance.format_wilcoxon_markdown)."""
    data = data or load_paper_data()
    summary, order = summarise(collection.scores), data.task_order()
    n_glue = sum(1 for s in data.tasks.values() if s.glue)
    lines = ["# Results vs. the BiDoRA paper", "",
             "Ours: mean ± sample std (ddof = 1) over seeds, n = number of seeds; percent (fractions × 100) except MSE "
             "(lower is better). Paper: its published number for the same model, method and rank (— when it has "
             "none). Δ = ours − paper."]
    for model in sorted({k[0] for k in summary}):
        groups = sorted((k for k in summary if k[0] == model), key=group_order)
        tasks = sorted({t for k in groups for t in summary[k]}, key=order.index)
        has_glue = any(data.tasks[t].glue for t in tasks)
        header = ["method", "r"] + [x for t in tasks for x in (data.tasks[t].name, "paper", "Δ")]
        header += ["GLUE avg", "paper", "Δ"] if has_glue else []
        lines += ["", f"## {model}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        notes = []
        for key in groups:
            _, method, rank = key
            cells, row = summary[key], data.lookup(*key)
            label, rank_text = data.method_label(method), "—" if rank is None else str(rank)
            out = [label, rank_text]
            for t in tasks:
                d, paper, cell = data.tasks[t].decimals, row.scores.get(t) if row else None, summary[key].get(t)
                diff = cell.mean - paper if cell is not None and paper is not None else None
                out += [_cell(cell, d + 1), _num(paper, d), _num(diff, d + 1, signed=True)]
            if has_glue:
                avg, used = glue_average(cells, data)
                p_avg, how = paper_average(row, used, data)
                mark = "" if len(used) == n_glue else f" ({len(used)}/{n_glue})"
                out += [_num(avg, 2) + mark, _num(p_avg, 2),
                        _num(None if avg is None or p_avg is None else avg - p_avg, 2, signed=True)]
                if used and len(used) < n_glue:
                    paper_note = {"published": "is the paper's published average",
                                  "same tasks": "is the mean of the paper's numbers for the same tasks",
                                  "": "is empty: the paper row does not cover these tasks"}[how]
                    notes.append(f"{label} r={rank_text}: GLUE average over {len(used)} of {n_glue} tasks "
                                 f"({', '.join(data.tasks[t].name for t in used)}); the paper column {paper_note}.")
            if row is not None:
                stated = ""
                if not row.rank_stated:
                    stated = " (its rank is not printed in the paper; see the notes in utils/data)"
                elif row.rank is None and method not in ("ft", "adapter"):
                    stated = " (the paper does not state its rank)"
                notes.append(f"{label} r={rank_text}: paper numbers from {row.table}{stated}.")
            lines.append("| " + " | ".join(out) + " |")
        lines += [""] + [f"- {n}" for n in notes]

    splits = Counter((s.task, s.metric, s.split) for s in collection.scores)
    lines += ["", "Metric and split read from each results file (count of runs):"]
    lines += [f"- {data.tasks[t].name}: {m} on {sp} ({c})" for (t, m, sp), c in sorted(splits.items())]
    if any(data.tasks[s.task].glue for s in collection.scores):
        lines.append(f"- GLUE average: MNLI counts once (matched); MNLI-mm is shown but not averaged; "
                     f"{n_glue} GLUE tasks in the paper's average.")
    lines += ["", "## Missing runs", ""]
    if missing:
        lines.append(f"{len(missing)} (task, method, seed) combination(s) absent from the expected grid (every task "
                     "and seed seen for the model, or --tasks / --seeds):")
        seeds_of: dict[tuple, list[int]] = defaultdict(list)  # one line per (group, task), seeds listed
        for x in missing:
            seeds_of[(x["model"], x["method"], x["rank"], x["task"])].append(x["seed"])
        for (model, method, rank, task), seeds in seeds_of.items():
            lines.append(f"- {model} / {data.method_label(method)} / r={'—' if rank is None else rank}: {task}, "
                         f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    else:
        lines.append("None: every (task, method, seed) combination of the expected grid is present.")
    if collection.skipped:
        lines += ["", "## Files not used", ""] + [f"- {s}" for s in collection.skipped]
    if tests_md:
        lines += ["", tests_md.rstrip()]
    return "\n".join(lines) + "\n"


def paper_json(collection: Collection, missing: list[dict], tests: list, data: PaperData | None = None) -> dict:
    data = data or load_paper_data()
    cells = []
    for (model, method, rank), tasks in sorted(summarise(collection.scores).items(), key=lambda kv: group_order(kv[0])):
        row = data.lookup(model, method, rank)
        cells += [{"model": model, "method": method, "rank": rank, "task": t, "seeds": c.seeds, "values": c.values,
                   "n": c.n, "mean": c.mean, "std": c.std, "paper": row.scores.get(t) if row else None}
                  for t, c in tasks.items()]
    return {"units": "display (percent, MSE raw)", "cells": cells, "missing": missing, "skipped": collection.skipped,
            "tests": [asdict(t) for t in tests]}


# ------------------------------------------------------------------------------------------------------ figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    fmt = Path(path).suffix.lstrip(".") or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight"))
    finally:
        _pyplot().close(fig)


def plot_methods(table: MethodTable, path, title: str | None = None) -> Path:
    """One bar per method (mean), sample-std error bar, each seed as a dot (fixed jitter). Writes ``path``."""
    plt = _pyplot()
    rows = [r for r in table.rows if r.n]
    if not rows:
        raise ValueError("nothing to plot: no method has a run")
    scale = display_scale(table.metric)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 4.0))
    rng = np.random.default_rng(0)  # the same figure every time
    for i, row in enumerate(rows):
        vals = np.asarray(row.values) * scale
        ax.bar(i, vals.mean(), 0.6, yerr=(row.std or 0.0) * scale, capsize=4, color=plt.get_cmap("tab10")(i % 10),
               alpha=0.75, hatch="//" if row.label == SEARCH_ONLY else None, edgecolor="black", linewidth=0.5)
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(rows)), [f"{r.label}\n(n={r.n})" for r in rows], fontsize=8)
    all_vals = np.concatenate([np.asarray(r.values) * scale for r in rows])
    lo, hi = float(np.nanmin(all_vals)), float(np.nanmax(all_vals))
    pad = max((hi - lo) * 0.3, abs(hi) * 0.02, 1e-3)
    ax.set_ylim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)  # bars start near the data, not at 0
    ax.set_ylabel(f"{table.metric} on {table.split}" + (" (%)" if scale == 100 else ""))
    ax.set_xlabel("method (bars: mean ± sample std; dots: seeds)")
    ax.set_title(title or f"{table.task} — {Path(table.model).name or table.model}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_task_bars(summary: dict, path, data: PaperData | None = None) -> Path:
    """One panel per (model, unit): tasks on the x axis, one bar per (method, rank) with its sample std, the paper's
    number as a black diamond. ``summary`` is :func:`summarise`'s."""
    plt, data = _pyplot(), data or load_paper_data()
    if not summary:
        raise ValueError("nothing to plot")
    order = data.task_order()
    panels: dict[tuple[str, str], list[str]] = {}  # percent tasks and MSE do not share an axis
    for (model, _m, _r), cells in summary.items():
        for task in cells:
            unit = "%" if data.tasks[task].scale == 100 else data.tasks[task].metric
            panels.setdefault((model, unit), [])
            if task not in panels[(model, unit)]:
                panels[(model, unit)].append(task)
    keys = sorted(panels)
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(6.0, max(len(panels[k]) for k in keys) * 1.4),
                                                    3.6 * len(keys)), squeeze=False)
    kinds = sorted({(g[1], g[2]) for g in summary}, key=lambda k: group_order(("", *k)))
    colour = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}  # the same in every panel
    for ax, (model, unit) in zip(axes[:, 0], keys):
        tasks = sorted(panels[(model, unit)], key=order.index)
        groups = sorted((g for g in summary if g[0] == model and any(t in summary[g] for t in tasks)), key=group_order)
        width, x = 0.8 / max(len(groups), 1), np.arange(len(tasks))
        shown = []
        for i, group in enumerate(groups):
            _, method, rank = group
            offset, row = x - 0.4 + width * (i + 0.5), data.lookup(*group)
            cells = [summary[group].get(t) for t in tasks]
            ax.bar(offset, [c.mean if c else np.nan for c in cells], width, capsize=2, color=colour[(method, rank)],
                   yerr=[c.std if c and c.std is not None else 0.0 for c in cells],
                   label=data.method_label(method) + ("" if rank is None else f" r={rank}"))
            # The paper's marker only where we have a bar to compare it with.
            paper = [row.scores.get(t, np.nan) if row and c else np.nan for t, c in zip(tasks, cells)]
            ax.scatter(offset, paper, marker="D", s=18, color="k", zorder=3, label="paper" if i == 0 else None)
            shown += [c.mean for c in cells if c] + [p for p in paper if not np.isnan(p)]
        ax.set_xticks(x, [data.tasks[t].name for t in tasks])
        ax.set_ylabel(unit if unit == "%" else unit.upper())
        ax.set_title(model, fontsize=10)
        if unit == "%" and shown:  # start near the data so that differences of a point are visible
            ax.set_ylim(max(min(0.0, min(shown) - 5), min(shown) - 10), min(100.0, max(shown) + 5))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------------------ CLI


def _list(kind=str):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def _pair(text: str) -> list[tuple[str, str]]:
    pairs = [tuple(p.split(":")) for p in text.replace(" ", "").split(",") if p]
    if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
        raise argparse.ArgumentTypeError(f"expected A:B[,C:D], got {text!r}")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n", 1)[0], epilog=doc.split("\n", 2)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="folders searched recursively for results.json, or results.json files")
    p.add_argument("--paper", action="store_true", help="tables next to the paper's numbers (several tasks/models)")
    p.add_argument("--split", default="test", help="method table: split whose numbers are reported (default: test)")
    p.add_argument("--metric", default=None, help="method table: metric (default: paper_metric in results.json)")
    p.add_argument("--extra-metrics", type=_list(), default=[], help="method table: more metrics, comma-separated")
    p.add_argument("--tasks", type=_list(), default=None,
                   help="only runs of these tasks (method table: one task); --paper: the expected task grid")
    p.add_argument("--methods", type=_list(), default=None, help="only these methods, all expected (default: found)")
    p.add_argument("--seeds", type=_list(int), default=None, help="only these seeds, all expected (default: found)")
    p.add_argument("--compare", type=_pair, default=None,
                   help="paired differences a − b, e.g. bidora:dora,search:bidora (method table default: every pair "
                   "of rows; --paper default: bidora:dora)")
    p.add_argument("--pair-by", choices=["auto", "seed", "task-mean"], default="auto",
                   help="--paper test pairs: (model, r, task, seed), or per-task means; auto: seeds when any pair")
    p.add_argument("--markdown", default=None, help="write the markdown here (printed either way)")
    p.add_argument("--json", default=None, help="write the summary as JSON here")
    p.add_argument("--figure", default=None, help="write the figure here (png, pdf, svg)")
    p.add_argument("--title", default=None, help="method table figure title (default: task — model)")
    return p


def _paper_report(runs: list[Run], args) -> tuple[str, dict, Callable]:
    data = load_paper_data()
    tasks = None if args.tasks is None else [normalise_task(t, data) for t in args.tasks]
    if tasks is not None and any(t not in data.tasks for t in tasks):
        raise ValueError(f"--tasks: unknown task in {tasks}; known: {sorted(data.tasks)}")
    collection = paper_scores(runs, data)
    collection.scores = [s for s in collection.scores if (tasks is None or s.task in tasks or
                                                          data.tasks[s.task].derived_from in tasks)]
    if not collection.scores:
        raise ValueError("no usable results (see the files not used):\n" + "\n".join(collection.skipped))
    missing = missing_runs(collection.scores, tasks=tasks, seeds=args.seeds)
    glue = [t for t, s in data.tasks.items() if s.glue]
    tests, parts = [], []
    for a, b in args.compare or [("bidora", "dora")]:
        a, b = normalise_method(a), normalise_method(b)
        tests.append(wilcoxon_test(collection.scores, a=a, b=b, pair_by=args.pair_by, tasks=glue))
        paper_p = data.wilcoxon_p if (a, b) == ("bidora", "dora") else None
        parts.append(format_wilcoxon_markdown(tests[-1], data.method_names, paper_p))
    text = paper_markdown(collection, missing, "\n".join(parts), data)
    return text, paper_json(collection, missing, tests, data), \
        lambda path: plot_task_bars(summarise(collection.scores), path, data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = load_runs(args.inputs)
        if args.methods is not None:
            runs = [r for r in runs if r.method in {normalise_method(m) for m in args.methods}]
        if args.seeds is not None:
            runs = [r for r in runs if r.seed in args.seeds]
        if args.paper:
            text, summary, plot = _paper_report(runs, args)
            warnings = [f"{len(summary['missing'])} missing run(s), listed under 'Missing runs'"] * bool(
                summary["missing"])
        else:
            if args.tasks is not None and len(args.tasks) != 1:
                raise ValueError("--tasks: the method table is for one task (or use --paper)")
            table = method_table(runs, args.split, args.metric, args.extra_metrics, args.methods, args.seeds,
                                 args.tasks[0] if args.tasks else None, args.compare)
            text, summary = method_markdown(table), method_json(table)
            warnings = [f"{label}: missing seeds {seeds}" for label, seeds in table.missing.items()]
            plot = lambda path: plot_methods(table, path, args.title)  # noqa: E731
        print(text, end="")
        if args.markdown:
            atomic_write_text(args.markdown, text)
        if args.json:
            atomic_write_text(args.json, json.dumps(summary, indent=2) + "\n")
        if args.figure:
            plot(args.figure)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
