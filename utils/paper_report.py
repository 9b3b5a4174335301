"""Tables next to the BiDoRA paper's numbers (``utils/report.py --paper``): every run's score as the paper reports
its task, per (model, method, rank) means over seeds against utils/data/paper_results.json, GLUE averages, missing
runs, the BiDoRA-against-DoRA Wilcoxon test as markdown, and a bar figure per model."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from utils.figures import pyplot, save_figure
from utils.formatting import DASH, mean_std, number, table_row
from utils.method_report import method_key
from utils.paper_results import PaperData, load_paper_data, normalise_model, normalise_task
from utils.results import Run
from utils.stats import Series, WilcoxonReport, group_series


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
    """The paper scores of a set of runs, and the files not used (tasks the paper lacks) with the reason."""

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


def group_order(key: tuple) -> tuple:
    """Sort key of a (model, method, rank) group: model, rank (full fine-tuning first), method order."""
    model, method, rank = key
    return (model, -1 if rank is None else rank, *method_key(method))


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


def _cell(cell: Series | None, decimals: int) -> str:
    return DASH if cell is None else mean_std(cell.mean, cell.std, cell.n, lambda v: f"{v:.{decimals}f}", "n=")


def paper_markdown(collection: Collection, missing: list[dict], tests_md: str | None = None,
                   data: PaperData | None = None) -> str:
    """One table per model next to the paper, notes, the metric and split used, missing runs, files not used, and
    the tests' markdown (format_wilcoxon_markdown)."""
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
        lines += ["", f"## {model}", "", table_row(header), "|" + "---|" * len(header)]
        notes = []
        for key in groups:
            _, method, rank = key
            cells, row = summary[key], data.lookup(*key)
            label, rank_text = data.method_label(method), "—" if rank is None else str(rank)
            out = [label, rank_text]
            for t in tasks:
                d, paper, cell = data.tasks[t].decimals, row.scores.get(t) if row else None, summary[key].get(t)
                diff = cell.mean - paper if cell is not None and paper is not None else None
                out += [_cell(cell, d + 1), number(paper, d), number(diff, d + 1, signed=True)]
            if has_glue:
                avg, used = glue_average(cells, data)
                p_avg, how = paper_average(row, used, data)
                mark = "" if len(used) == n_glue else f" ({len(used)}/{n_glue})"
                out += [number(avg, 2) + mark, number(p_avg, 2),
                        number(None if avg is None or p_avg is None else avg - p_avg, 2, signed=True)]
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
            lines.append(table_row(out))
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
    """JSON-ready summary: every (model, method, rank, task) cell with the paper's number, missing runs, tests."""
    data = data or load_paper_data()
    cells = []
    for (model, method, rank), tasks in sorted(summarise(collection.scores).items(), key=lambda kv: group_order(kv[0])):
        row = data.lookup(model, method, rank)
        cells += [{"model": model, "method": method, "rank": rank, "task": t, "seeds": c.seeds, "values": c.values,
                   "n": c.n, "mean": c.mean, "std": c.std, "paper": row.scores.get(t) if row else None}
                  for t, c in tasks.items()]
    return {"units": "display (percent, MSE raw)", "cells": cells, "missing": missing, "skipped": collection.skipped,
            "tests": [asdict(t) for t in tests]}


def plot_task_means(summary: dict, path, data: PaperData | None = None) -> Path:
    """One panel per (model, unit): tasks on the x axis, per (method, rank) its mean as a dot with a sample-std error
    bar (no bars: the axis spans the data, not 0), the paper's number as a black diamond. ``summary`` is
    :func:`summarise`'s."""
    plt, data = pyplot(), data or load_paper_data()
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
            ax.errorbar(offset, [c.mean if c else np.nan for c in cells], fmt="o", markersize=5, capsize=2,
                        color=colour[(method, rank)], yerr=[c.std if c and c.std is not None else 0.0 for c in cells],
                        label=data.method_label(method) + ("" if rank is None else f" r={rank}"))
            # The paper's marker only where we have a mean to compare it with.
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
    return save_figure(fig, path)



def format_wilcoxon_markdown(report: WilcoxonReport, labels: dict[str, str] | None = None,
                             paper_p: float | None = None, decimals: int = 2) -> str:
    """Markdown section: what the pairs are, n, the statistic and p-values, and every pair."""
    labels = labels or {}
    la, lb = labels.get(report.a, report.a), labels.get(report.b, report.b)
    unit = "(model, r, task, seed)" if report.pair_by == "seed" else "(model, r, task), means over each method's seeds"
    lines = [f"## Wilcoxon signed-rank test: {la} vs {lb}", ""]
    lines.append(f"Pairs: one per {unit}; tasks: {', '.join(report.tasks)}. Difference = {la} − {lb} "
                 "(positive: " + la + " better). n = " + f"{report.n} pairs ({report.n_nonzero} non-zero).")
    if report.p_two_sided is not None:
        lines.append(f"Statistic min(W+, W−) = {report.statistic:g}; p two-sided = {report.p_two_sided:.4g}; "
                     f"p one-sided ({la} > {lb}) = {report.p_greater:.4g}.")
    else:
        lines.append("No test was run.")
    if report.ci_low is not None:
        lines.append(f"Mean difference {report.mean_diff:+.{decimals}f}, {100 * report.confidence:g}% bootstrap "
                     f"interval [{report.ci_low:+.{decimals}f}, {report.ci_high:+.{decimals}f}].")
    if paper_p is not None:
        lines.append(f"Paper: p = {paper_p:g} (its pairing is not stated).")
    lines += [f"- {m}" for m in report.messages]
    if report.pairs:
        lines += ["", f"| model | r | task | seed | {la} | {lb} | diff |", "|---|---|---|---|---|---|---|"]
        for p in report.pairs:
            seed = "mean" if p["seed"] is None else p["seed"]
            rank = "—" if p["rank"] is None else p["rank"]
            lines.append(f"| {p['model']} | {rank} | {p['task']} | {seed} | {p[report.a]:.{decimals}f} | "
                         f"{p[report.b]:.{decimals}f} | {p['diff']:+.{decimals}f} |")
    if report.unpaired:
        lines += ["", "Without a partner (not in the test):"] + [f"- {u}" for u in report.unpaired]
    return "\n".join(lines) + "\n"
