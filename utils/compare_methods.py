"""Compare methods on one task: mean ± sample std over seeds, cost, and BiDoRA's search phase on its own.

    python utils/compare_methods.py RUNS_ROOT [--split test] [--metric accuracy] [--extra-metrics f1_weighted]
                                   [--methods lora,dora,bidora] [--seeds 0,1,2,3,4]
                                   [--markdown out.md] [--json out.json] [--figure out.png]

Reads every ``results.json`` under ``RUNS_ROOT`` (laid out ``<root>/<method>/seed<k>/results.json`` by the example
scripts, but any depth works). One row per method: mean ± sample std (ddof = 1, n shown) of the metric on the split
(default: the task's paper metric, from ``paper_metric`` in results.json, on ``test``), the individual seeds,
trainable parameters, median wall time and median peak memory.

For BiDoRA runs with a retraining phase the reported model is the retrained one; a second row,
"bidora (search only)", shows the model of the bi-level (search) phase alone: for each run, the search-phase step
with the best held-out value (``split == "heldout"`` in ``history``) of the run's ``select_metric`` -- selection
never looks at the reported split -- and the reported split's metric at that step. Its wall time is the elapsed time
at the end of the search phase (from ``log.csv`` when it is there); its memory is the whole run's peak.

Seeds missing for a method (compared with ``--seeds``, or with every seed seen for any method) are reported in the
table, the JSON and on stderr, never dropped silently. Values in results.json are fractions: accuracy-like metrics
are shown in percent, MSE-like ones raw. Exit status: 0, or 1 on bad input (message on stderr).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script (python utils/compare_methods.py): make `utils` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.files import atomic_write, mean_and_sample_std  # noqa: E402

RESULTS_NAME = "results.json"
SEARCH_ONLY = "bidora (search only)"
METHOD_ORDER = ["ft", "lora", "dora", "bidora", SEARCH_ONLY]
# Shown raw; every other metric is a fraction shown in percent.
RAW_METRICS = frozenset({"mse", "neg_mse", "rmse", "mae", "loss"})
LOWER_IS_BETTER = frozenset({"mse", "rmse", "mae", "loss"})

__all__ = [
    "RunRecord",
    "MethodRow",
    "Comparison",
    "find_results",
    "load_run",
    "search_only_value",
    "compare",
    "display_scale",
    "render_markdown",
    "plot_comparison",
    "main",
]


@dataclass
class RunRecord:
    """What the comparison needs from one results.json."""

    path: str
    task: str
    model: str
    method: str
    seed: int
    eval: dict[str, dict[str, float]]
    history: list[dict]
    select_metric: str | None
    paper_metric: str | None
    has_retrain: bool
    trainable_parameters: int | None
    wall_time_s: float | None
    peak_memory_bytes: int | None
    search_end_step: int | None  # last step of the search phase (the config's iterations)


@dataclass
class MethodRow:
    """One table row: a method (or BiDoRA's search phase) over its seeds. Values are raw (fractions / MSE)."""

    label: str
    method: str
    seeds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)  # further metrics, same seed order
    trainable_parameters: list[int] = field(default_factory=list)
    wall_times_s: list[float] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)
    selected_steps: list[int] = field(default_factory=list)  # search-only row: the heldout-best step per seed
    missing_seeds: list[int] = field(default_factory=list)

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

    def extra_stats(self, metric: str) -> tuple[float, float | None]:
        return mean_and_sample_std(self.extra[metric])


@dataclass
class Comparison:
    task: str
    model: str
    split: str
    metric: str
    extra_metrics: list[str]
    expected_seeds: list[int]
    rows: list[MethodRow]
    files: list[str]

    @property
    def missing(self) -> dict[str, list[int]]:
        return {r.label: r.missing_seeds for r in self.rows if r.missing_seeds}


# ------------------------------------------------------------------------------------------------------- loading


def find_results(root: str | os.PathLike) -> list[Path]:
    """Every results.json under ``root`` (recursively), or ``root`` itself if it is such a file."""
    path = Path(root)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{root}: no such file or directory")
    found = sorted(path.rglob(RESULTS_NAME))
    if not found:
        raise ValueError(f"no {RESULTS_NAME} under {root}")
    return found


def _search_end_from_log(run_dir: Path) -> float | None:
    """Elapsed seconds at the last search-phase step of log.csv (None without a readable log)."""
    log = run_dir / "log.csv"
    if not log.is_file():
        return None
    last = None
    try:
        with open(log, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if row.get("phase") == "search" and row.get("elapsed_s"):
                    last = float(row["elapsed_s"])
    except (OSError, ValueError, csv.Error):
        return None
    return last


def load_run(path: str | os.PathLike) -> RunRecord:
    """Read one results.json. Raises ValueError naming the file for anything malformed."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        method, seed, evals = str(raw["method"]), int(raw["seed"]), raw["eval"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: needs 'method', 'seed' and 'eval' ({err!r})") from err
    if not isinstance(evals, dict):
        raise ValueError(f"{path}: 'eval' must be a {{split: {{metric: value}}}} mapping")
    history = raw.get("history") or []
    config = raw.get("config") or {}
    retrain_iters = config.get("retrain_iterations") or 0
    has_retrain = retrain_iters > 0 or any(h.get("phase") == "retrain" for h in history)
    search_end = config.get("iterations")
    if search_end is None and history:
        search_steps = [h["step"] for h in history if h.get("phase") == "search"]
        search_end = max(search_steps) if search_steps else None
    return RunRecord(
        path=str(path),
        task=str(raw.get("task")),
        model=str(raw.get("model")),
        method=method,
        seed=seed,
        eval=evals,
        history=history,
        select_metric=raw.get("select_metric"),
        paper_metric=raw.get("paper_metric"),
        has_retrain=has_retrain,
        trainable_parameters=raw.get("trainable_parameters"),
        wall_time_s=raw.get("wall_time_s"),
        peak_memory_bytes=raw.get("peak_memory_bytes"),
        search_end_step=search_end,
    )


def _metric(run: RunRecord, split: str, metric: str) -> float:
    if split not in run.eval:
        raise ValueError(f"{run.path}: no split {split!r} in eval (has {sorted(run.eval)}); choose --split")
    if metric not in run.eval[split]:
        raise ValueError(f"{run.path}: eval[{split!r}] has no {metric!r} (has {sorted(run.eval[split])})")
    value = float(run.eval[split][metric])
    _check_value(run.path, metric, value)
    return value


def _check_value(path: str, metric: str, value: float) -> None:
    if metric not in RAW_METRICS and math.isfinite(value) and abs(value) > 1.0:
        raise ValueError(f"{path}: {metric} = {value} is not a fraction (percent written by mistake?)")


def search_only_value(run: RunRecord, split: str, metrics: list[str]) -> tuple[int, dict[str, float]]:
    """BiDoRA's search phase alone: the search-phase step with the best held-out ``select_metric``, and the
    ``metrics`` on ``split`` at that step (from ``history``).

    Ties go to the earliest step; NaN is the worst value. Raises ValueError if the run has no held-out evaluation
    in its search phase, or ``split`` was not evaluated at the chosen step.
    """
    if not run.select_metric:
        raise ValueError(f"{run.path}: no 'select_metric' in results.json (needed for the search-only row)")
    heldout = [h for h in run.history if h.get("phase") == "search" and h.get("split") == "heldout"]
    if not heldout:
        raise ValueError(f"{run.path}: no held-out evaluation in the search phase of history")
    best_step, best_value = None, -math.inf
    for h in sorted(heldout, key=lambda h: h["step"]):
        if run.select_metric not in h:
            raise ValueError(f"{run.path}: heldout history entry at step {h['step']} lacks {run.select_metric!r}")
        v = float(h[run.select_metric])
        if not math.isnan(v) and (best_step is None or v > best_value):
            best_step, best_value = h["step"], v
    if best_step is None:  # every held-out value NaN: the earliest step, as the trainer would keep it
        best_step = min(h["step"] for h in heldout)
    at_step = [h for h in run.history if h.get("step") == best_step and h.get("split") == split
               and h.get("phase") == "search"]
    if not at_step:
        raise ValueError(f"{run.path}: split {split!r} was not evaluated at the search step {best_step}")
    out = {}
    for m in metrics:
        if m not in at_step[0]:
            raise ValueError(f"{run.path}: history[{split!r}, step {best_step}] has no {m!r}")
        out[m] = float(at_step[0][m])
        _check_value(run.path, m, out[m])
    return int(best_step), out


# ------------------------------------------------------------------------------------------------------ comparing


def _method_key(label: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER), label)


def compare(
    runs: list[RunRecord],
    split: str = "test",
    metric: str | None = None,
    extra_metrics: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    task: str | None = None,
) -> Comparison:
    """Group runs by method and summarise them (see the module docstring).

    Args:
        runs: loaded results (:func:`load_run`).
        split: the split whose numbers are reported (never used for selection).
        metric: the metric; default the task's ``paper_metric``.
        extra_metrics: further metrics shown as mean ± std columns.
        methods: methods expected (missing ones are reported with every seed missing); default those present.
        seeds: seeds expected for every method (runs of other seeds are left out); default every seed seen.
        task: keep only runs of this task (needed when the folder mixes tasks).

    Raises:
        ValueError: no runs, several tasks or models mixed, two results for one (method, seed), a missing metric.
    """
    extra_metrics = list(extra_metrics or [])
    if task is not None:
        runs = [r for r in runs if r.task == task]
    if not runs:
        raise ValueError("no runs to compare" + (f" for task {task!r}" if task else ""))
    for attr in ("task", "model"):
        values = sorted({getattr(r, attr) for r in runs})
        if len(values) > 1:
            hint = " (pass --task)" if attr == "task" else " (compare one model per folder)"
            raise ValueError(f"runs of several {attr}s: {values}{hint}")
    if methods is not None:
        runs = [r for r in runs if r.method in methods]
    if seeds is not None:
        runs = [r for r in runs if r.seed in seeds]  # exactly the seeds asked for; absent ones are reported
    if metric is None:
        paper = {r.paper_metric for r in runs if r.paper_metric}
        if len(paper) != 1:
            raise ValueError(f"cannot tell the task's metric from the files (paper_metric: {sorted(paper)}); "
                             "pass --metric")
        metric = paper.pop()
    seen: dict[tuple[str, int], str] = {}
    for r in runs:
        key = (r.method, r.seed)
        if key in seen:
            raise ValueError(f"two results for method {r.method!r} seed {r.seed}: {seen[key]} and {r.path}")
        seen[key] = r.path
    expected = sorted(set(seeds) if seeds is not None else {r.seed for r in runs})
    wanted = list(methods) if methods is not None else sorted({r.method for r in runs}, key=_method_key)

    rows: dict[str, MethodRow] = {}
    for r in sorted(runs, key=lambda r: r.seed):
        row = rows.setdefault(r.method, MethodRow(r.method, r.method))
        row.seeds.append(r.seed)
        row.values.append(_metric(r, split, metric))
        for m in extra_metrics:
            row.extra.setdefault(m, []).append(_metric(r, split, m))
        _add_cost(row, r.trainable_parameters, r.wall_time_s, r.peak_memory_bytes)
        if r.method == "bidora" and r.has_retrain:
            search = rows.setdefault(SEARCH_ONLY, MethodRow(SEARCH_ONLY, "bidora"))
            step, values = search_only_value(r, split, [metric, *extra_metrics])
            search.seeds.append(r.seed)
            search.selected_steps.append(step)
            search.values.append(values[metric])
            for m in extra_metrics:
                search.extra.setdefault(m, []).append(values[m])
            _add_cost(search, r.trainable_parameters, _search_end_from_log(Path(r.path).parent), r.peak_memory_bytes)
    for method in wanted:
        rows.setdefault(method, MethodRow(method, method))
    for row in rows.values():
        row.missing_seeds = [s for s in expected if s not in row.seeds]
    ordered = sorted(rows.values(), key=lambda row: _method_key(row.label))
    return Comparison(runs[0].task, runs[0].model, split, metric, extra_metrics, expected, ordered,
                      sorted(r.path for r in runs))


def _add_cost(row: MethodRow, params, wall, memory) -> None:
    if params is not None:
        row.trainable_parameters.append(int(params))
    if wall is not None:
        row.wall_times_s.append(float(wall))
    if memory is not None:
        row.peak_memory_bytes.append(int(memory))


# ------------------------------------------------------------------------------------------------------ rendering


def display_scale(metric: str) -> float:
    """100 for fractions shown in percent, 1 for MSE-like metrics."""
    return 1.0 if metric in RAW_METRICS else 100.0


def _fmt(metric: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—" if value is None else str(value)
    scale = display_scale(metric)
    return f"{value * scale:.2f}" if scale == 100 else f"{value:.4f}"


def _mean_std(metric: str, mean: float | None, std: float | None, n: int) -> str:
    if n == 0:
        return "—"
    text = _fmt(metric, mean)
    return f"{text} ± {_fmt(metric, std)} (n={n})" if std is not None else f"{text} (n={n})"


def _params(row: MethodRow) -> str:
    uniq = sorted(set(row.trainable_parameters))
    if not uniq:
        return "—"
    return f"{uniq[0]:,}" if len(uniq) == 1 else f"{uniq[0]:,}–{uniq[-1]:,}"


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _fmt_time(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.1f} s"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _unit(metric: str) -> str:
    return "%" if display_scale(metric) == 100 else "raw"


def render_markdown(comp: Comparison) -> str:
    """The comparison as a markdown table, with notes on selection and missing seeds."""
    better = "lower is better" if comp.metric in LOWER_IS_BETTER else "higher is better"
    lines = [
        f"### {comp.task} — {comp.model}",
        "",
        f"Metric: `{comp.metric}` on `{comp.split}` ({_unit(comp.metric)}, {better}); mean ± sample std over seeds.",
        "",
    ]
    head = ["method", f"{comp.metric} ({comp.split})", *comp.extra_metrics, "seeds", "trainable params",
            "wall time (median)", "peak memory (median)", "missing seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in comp.rows:
        main_cell = _mean_std(comp.metric, row.mean if row.n else None, row.std, row.n)
        extra_cells = []
        for m in comp.extra_metrics:
            if row.n:
                mean, std = row.extra_stats(m)
                extra_cells.append(_mean_std(m, mean, std, row.n))
            else:
                extra_cells.append("—")
        per_seed = ", ".join(f"{s}: {_fmt(comp.metric, v)}" for s, v in zip(row.seeds, row.values)) or "—"
        missing = ", ".join(map(str, row.missing_seeds)) or "none"
        lines.append("| " + " | ".join([row.label, main_cell, *extra_cells, per_seed, _params(row),
                                        _fmt_time(_median(row.wall_times_s)),
                                        _fmt_bytes(_median(row.peak_memory_bytes)), missing]) + " |")
    lines.append("")
    if any(r.label == SEARCH_ONLY for r in comp.rows):
        steps = next(r.selected_steps for r in comp.rows if r.label == SEARCH_ONLY)
        lines.append(f"`{SEARCH_ONLY}`: the bi-level phase's model at its best held-out step (steps {steps}), "
                     f"before retraining; wall time = time at the end of that phase, memory = the whole run's peak.")
    if comp.missing:
        lines.append("Missing runs: " + "; ".join(f"{k}: seeds {v}" for k, v in comp.missing.items())
                     + f" (expected seeds {comp.expected_seeds}).")
    lines.append(f"Files: {len(comp.files)} results.json.")
    return "\n".join(lines) + "\n"


def comparison_to_dict(comp: Comparison) -> dict[str, Any]:
    """JSON-ready summary (raw values, plus display scale and means/stds)."""
    rows = []
    for row in comp.rows:
        d = asdict(row)
        d.update(n=row.n, mean=row.mean if row.n else None, std=row.std,
                 median_wall_time_s=_median(row.wall_times_s), median_peak_memory_bytes=_median(row.peak_memory_bytes))
        d["extra_stats"] = {m: dict(zip(("mean", "std"), row.extra_stats(m))) for m in comp.extra_metrics if row.n}
        rows.append(d)
    return {"task": comp.task, "model": comp.model, "split": comp.split, "metric": comp.metric,
            "display_scale": display_scale(comp.metric), "extra_metrics": comp.extra_metrics,
            "expected_seeds": comp.expected_seeds, "missing": comp.missing, "rows": rows, "files": comp.files}


def plot_comparison(comp: Comparison, path: str | os.PathLike, title: str | None = None) -> Path:
    """Bar chart: one bar per method (mean), sample-std error bar, each seed as a dot. Writes ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in comp.rows if r.n]
    if not rows:
        raise ValueError("nothing to plot: no method has a run")
    scale = display_scale(comp.metric)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 4.0))
    cmap = plt.get_cmap("tab10")
    rng = np.random.default_rng(0)  # fixed jitter: the same figure every time
    for i, row in enumerate(rows):
        vals = np.asarray(row.values) * scale
        ax.bar(i, vals.mean(), 0.6, yerr=(row.std or 0.0) * scale, capsize=4, color=cmap(i % 10), alpha=0.75,
               hatch="//" if row.label == SEARCH_ONLY else None, edgecolor="black", linewidth=0.5)
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r.label}\n(n={r.n})" for r in rows], fontsize=8)
    all_vals = np.concatenate([np.asarray(r.values) * scale for r in rows])
    lo, hi = float(np.nanmin(all_vals)), float(np.nanmax(all_vals))
    pad = max((hi - lo) * 0.3, abs(hi) * 0.02, 1e-3)
    ax.set_ylim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)  # bars start near the data, not at 0
    ax.set_ylabel(f"{comp.metric} on {comp.split}" + (" (%)" if scale == 100 else ""))
    ax.set_xlabel("method (bars: mean ± sample std; dots: seeds)")
    model = Path(comp.model).name or comp.model
    ax.set_title(title or f"{comp.task} — {model}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".") or "png"
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150))
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------------------ CLI


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x for x in text.replace(",", " ").split() if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=(__doc__ or "").split("\n", 2)[-1])
    parser.add_argument("root", help="folder searched recursively for results.json (or one results.json)")
    parser.add_argument("--split", default="test", help="split whose numbers are reported (default: test)")
    parser.add_argument("--metric", default=None, help="metric (default: the task's paper_metric in results.json)")
    parser.add_argument("--extra-metrics", type=_str_list, default=[], help="more metrics, comma-separated")
    parser.add_argument("--methods", type=_str_list, default=None,
                        help="methods expected, comma-separated (default: those found)")
    parser.add_argument("--seeds", type=_int_list, default=None,
                        help="seeds expected for every method; other seeds are left out (default: every seed found)")
    parser.add_argument("--task", default=None, help="only runs of this task (for folders mixing tasks)")
    parser.add_argument("--markdown", default=None, help="write the markdown table here")
    parser.add_argument("--json", default=None, help="write the summary as JSON here")
    parser.add_argument("--figure", default=None, help="write the bar chart here (png, pdf, svg)")
    parser.add_argument("--title", default=None, help="figure title (default: task — model)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [load_run(p) for p in find_results(args.root)]
        comp = compare(runs, split=args.split, metric=args.metric, extra_metrics=args.extra_metrics,
                       methods=args.methods, seeds=args.seeds, task=args.task)
        text = render_markdown(comp)
        print(text, end="")
        if args.markdown:
            atomic_write(args.markdown, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        if args.json:
            payload = json.dumps(comparison_to_dict(comp), indent=2) + "\n"
            atomic_write(args.json, lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))
        if args.figure:
            plot_comparison(comp, args.figure, args.title)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for label, seeds in comp.missing.items():
        print(f"warning: {label}: missing seeds {seeds}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
