"""Collect many runs' results.json into mean ± std tables next to the BiDoRA paper's numbers.

Rows are (model, method, rank); columns are tasks, each followed by the paper's number (utils/data/paper_results.json)
and the difference ours − paper. Values are percent (the results files hold fractions) except MSE. Mean ± sample std
(ddof = 1) over seeds, n shown. The GLUE average of a row is over the GLUE tasks present in that row, marked (k/8)
when incomplete, and compared with the paper's average over the same tasks. Missing (task, method, seed) combinations
are listed, and BiDoRA is tested against DoRA with a Wilcoxon signed-rank test (utils/significance.py).

    python utils/aggregate_results.py RESULTS_DIR_OR_FILE [...] [--markdown out.md] [--figure assets/glue.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script (python utils/aggregate_results.py): make `utils` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.files import atomic_write_text, mean_and_sample_std  # noqa: E402
from utils.paper_results import (  # noqa: E402
    PaperData,
    load_paper_data,
    normalise_method,
    normalise_model,
    normalise_task,
)
from utils.significance import format_wilcoxon_markdown, wilcoxon_test  # noqa: E402

METHOD_ORDER = ["ft", "adapter", "lora", "dora", "bidora"]
RESULTS_NAME = "results.json"


class UnknownTaskError(ValueError):
    """A results file for a task the paper does not report (listed in the report, not aggregated)."""


@dataclass(frozen=True)
class RunScore:
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
class Cell:
    """The seeds of one (model, method, rank, task)."""

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
        """Sample standard deviation (ddof = 1); None with a single seed."""
        return mean_and_sample_std(self.values)[1]


GroupKey = tuple[str, str, "int | None"]  # (model, method, rank)


@dataclass
class Collection:
    scores: list[RunScore]
    skipped: list[str]  # files not used, with the reason


def find_results_files(inputs) -> list[Path]:
    """results.json files under the given directories (recursively), plus the files given directly."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(path.rglob(RESULTS_NAME))
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{item}: no such file or directory")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError(f"no {RESULTS_NAME} found under {list(map(str, inputs))}")
    return unique


def _metric_value(metrics: dict, metric: str, data: PaperData):
    for name in data.metric_aliases.get(metric, (metric,)):
        if name in metrics:
            return name, metrics[name]
    return None, None


def _pick_split(evals: dict, splits, allow_single: bool):
    for split in splits:
        if split in evals:
            return split
    # A trainer that reports a single, differently named split: use it (the markdown lists the splits used).
    if allow_single and len(evals) == 1:
        return next(iter(evals))
    return None


def load_run_scores(path: str | Path, data: PaperData | None = None) -> list[RunScore]:
    """The reported numbers of one results.json: one RunScore per task (two for MNLI with a mismatched split).

    Raises ValueError for a malformed file, an unknown task, a missing metric or a value that is not a fraction.
    """
    data = data or load_paper_data()
    with open(path, encoding="utf-8") as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
    try:
        task = normalise_task(str(raw["task"]), data)
        model = normalise_model(str(raw["model"]), data)
        method = normalise_method(str(raw["method"]))
        seed = int(raw["seed"])
        evals = raw["eval"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: needs 'task', 'model', 'method', 'seed' and 'eval' ({err!r})") from err
    if not isinstance(evals, dict) or not evals:
        raise ValueError(f"{path}: 'eval' must be a non-empty {{split: {{metric: value}}}} mapping")
    if task not in data.tasks:
        raise UnknownTaskError(f"{path}: task {raw['task']!r} is not one of the paper's tasks {sorted(data.tasks)}")
    # Rank means nothing for full fine-tuning; ignore whatever default the config carried.
    rank = None if method == "ft" or raw.get("rank") is None else int(raw["rank"])

    specs = [data.tasks[task]] + [s for s in data.tasks.values() if s.derived_from == task]
    out = []
    for spec in specs:
        primary = spec.derived_from is None
        split = _pick_split(evals, spec.splits, allow_single=primary)
        if split is None:
            if primary:
                raise ValueError(f"{path}: none of the splits {list(spec.splits)} in eval (has {sorted(evals)})")
            continue  # e.g. an MNLI run without the mismatched split
        name, value = _metric_value(evals[split], spec.metric, data)
        if name is None:
            raise ValueError(f"{path}: eval[{split!r}] has no {spec.metric!r} (has {sorted(evals[split])})")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{path}: {spec.key} {name} = {value}")
        if spec.scale == 100 and abs(value) > 1.0:
            raise ValueError(f"{path}: {spec.key} {name} = {value} is not a fraction (already in percent?)")
        out.append(RunScore(str(path), model, method, rank, seed, spec.key, value * spec.scale, name, split))
    return out


def collect(inputs, data: PaperData | None = None) -> Collection:
    """Load every results.json; files for tasks the paper does not report are skipped and listed, not dropped
    silently. Two files for the same (model, method, rank, task, seed) are an error."""
    data = data or load_paper_data()
    scores, skipped = [], []
    for path in find_results_files(inputs):
        try:
            scores += load_run_scores(path, data)
        except UnknownTaskError as err:
            skipped.append(str(err))
    seen: dict[tuple, str] = {}
    for s in scores:
        key = (s.model, s.method, s.rank, s.task, s.seed)
        if key in seen:
            raise ValueError(f"two results for {key}: {seen[key]} and {s.path}")
        seen[key] = s.path
    return Collection(scores, skipped)


def summarise(scores) -> dict[GroupKey, dict[str, Cell]]:
    """{(model, method, rank): {task: Cell}}."""
    table: dict[GroupKey, dict[str, Cell]] = defaultdict(lambda: defaultdict(Cell))
    for s in sorted(scores, key=lambda s: s.seed):
        cell = table[(s.model, s.method, s.rank)][s.task]
        cell.values.append(s.value)
        cell.seeds.append(s.seed)
    return {k: dict(v) for k, v in table.items()}


def group_order(key: GroupKey):
    model, method, rank = key
    pos = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (model, -1 if rank is None else rank, pos, method)


def missing_runs(scores, tasks=None, seeds=None) -> list[dict]:
    """(task, seed) combinations absent for a (model, method, rank) group.

    The expected grid of a model is `tasks` × `seeds` when given, otherwise every task and every seed that appears
    in any run of that model. Derived columns (MNLI-mm) are not part of the grid.
    """
    data = load_paper_data()
    primary = [s for s in scores if data.tasks[s.task].derived_from is None]
    by_model: dict[str, list[RunScore]] = defaultdict(list)
    for s in primary:
        by_model[s.model].append(s)
    order = data.task_order()
    missing = []
    for model, runs in sorted(by_model.items()):
        grid_tasks = list(tasks) if tasks is not None else sorted({s.task for s in runs}, key=order.index)
        grid_seeds = sorted(seeds) if seeds is not None else sorted({s.seed for s in runs})
        present = {(s.method, s.rank, s.task, s.seed) for s in runs}
        for method, rank in sorted({(s.method, s.rank) for s in runs}, key=lambda g: group_order((model, *g))):
            for task in grid_tasks:
                for seed in grid_seeds:
                    if (method, rank, task, seed) not in present:
                        missing.append({"model": model, "method": method, "rank": rank, "task": task, "seed": seed})
    return missing


def glue_average(cells: dict[str, Cell], data: PaperData) -> tuple[float | None, list[str]]:
    """Mean of the per-task means over the GLUE tasks present; (None, []) when there are none."""
    tasks = [t for t in data.task_order() if data.tasks[t].glue and t in cells]
    if not tasks:
        return None, []
    return float(np.mean([cells[t].mean for t in tasks])), tasks


def paper_average(row, tasks: list[str], data: PaperData) -> tuple[float | None, str]:
    """The paper's average over exactly `tasks`: its published average when these are all its GLUE tasks, else the
    mean of its per-task numbers; None when the paper row lacks one of them."""
    if row is None or not tasks or any(t not in row.scores for t in tasks):
        return None, ""
    glue_in_row = {t for t in row.scores if data.tasks[t].glue}
    if set(tasks) == glue_in_row and row.avg is not None:
        return float(row.avg), "published"
    return float(np.mean([row.scores[t] for t in tasks])), "same tasks"


def _fmt(x: float | None, decimals: int, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{decimals}f}" if signed else f"{x:.{decimals}f}"


def _cell_text(cell: Cell | None, decimals: int) -> str:
    if cell is None:
        return "—"
    std = "" if cell.std is None else f" ± {cell.std:.{decimals}f}"
    return f"{cell.mean:.{decimals}f}{std} (n={cell.n})"


def render_markdown(collection: Collection, missing: list[dict], wilcoxon_md: str | None = None,
                    data: PaperData | None = None) -> str:
    """The full report: one table per model, notes, missing runs, skipped files, the Wilcoxon section."""
    data = data or load_paper_data()
    summary = summarise(collection.scores)
    order = data.task_order()
    n_glue = sum(1 for s in data.tasks.values() if s.glue)
    lines = ["# Results vs. the BiDoRA paper", ""]
    lines.append("Ours: mean ± sample std (ddof = 1) over seeds, n = number of seeds; percent (fractions × 100) "
                 "except MSE (lower is better). Paper: its published number for the same model, method and rank "
                 "(— when it has none). Δ = ours − paper.")
    for model in sorted({k[0] for k in summary}):
        groups = sorted((k for k in summary if k[0] == model), key=group_order)
        tasks = sorted({t for k in groups for t in summary[k]}, key=order.index)
        has_glue = any(data.tasks[t].glue for t in tasks)
        header = ["method", "r"]
        for t in tasks:
            header += [data.tasks[t].name, "paper", "Δ"]
        if has_glue:
            header += ["GLUE avg", "paper", "Δ"]
        lines += ["", f"## {model}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        notes = []
        for key in groups:
            _, method, rank = key
            cells = summary[key]
            row = data.lookup(model, method, rank)
            label = data.method_label(method)
            rank_text = "—" if rank is None else str(rank)
            out = [label, rank_text]
            for t in tasks:
                spec = data.tasks[t]
                paper = row.scores.get(t) if row else None
                cell = cells.get(t)
                diff = cell.mean - paper if cell is not None and paper is not None else None
                out += [_cell_text(cell, spec.decimals + 1), _fmt(paper, spec.decimals),
                        _fmt(diff, spec.decimals + 1, signed=True)]
            if has_glue:
                avg, used = glue_average(cells, data)
                p_avg, how = paper_average(row, used, data)
                mark = "" if len(used) == n_glue else f" ({len(used)}/{n_glue})"
                out += [_fmt(avg, 2) + mark, _fmt(p_avg, 2), _fmt(None if avg is None or p_avg is None
                                                                   else avg - p_avg, 2, signed=True)]
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
        for m in missing:
            seeds_of[(m["model"], m["method"], m["rank"], m["task"])].append(m["seed"])
        for (model, method, rank, task), seeds in seeds_of.items():
            lines.append(f"- {model} / {data.method_label(method)} / r={'—' if rank is None else rank}: {task}, "
                         f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    else:
        lines.append("None: every (task, method, seed) combination of the expected grid is present.")
    if collection.skipped:
        lines += ["", "## Files not used", ""] + [f"- {s}" for s in collection.skipped]
    if wilcoxon_md:
        lines += ["", wilcoxon_md.rstrip()]
    return "\n".join(lines) + "\n"


def _csv(text: str | None, kind):
    if text is None:
        return None
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise SystemExit(f"cannot parse {text!r}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Aggregate results.json files (tasks x methods x seeds) into mean ± std tables next to the "
        "BiDoRA paper's numbers, list missing runs, and test BiDoRA against DoRA (Wilcoxon signed-rank)."
    )
    parser.add_argument("inputs", nargs="+", help="results.json files or directories searched recursively")
    parser.add_argument("--markdown", default=None, help="write the report to this file (printed either way)")
    parser.add_argument("--figure", default=None, help="bar chart PNG (e.g. assets/glue.png)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated expected tasks for the missing-run grid (default: all seen per model)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated expected seeds for the missing-run grid (default: all seen per model)")
    parser.add_argument("--pair-by", choices=["auto", "seed", "task-mean"], default="auto",
                        help="Wilcoxon pairs: same (model, r, task, seed), or per-task means over seeds; auto: seed "
                        "pairs when any exist")
    parser.add_argument("--compare", default="bidora,dora", help="the two methods to test, a,b (default bidora,dora)")
    args = parser.parse_args(argv)

    data = load_paper_data()
    try:
        collection = collect(args.inputs, data)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    if not collection.scores:
        raise SystemExit("error: no usable results (see the files not used):\n" + "\n".join(collection.skipped))
    tasks = _csv(args.tasks, lambda t: normalise_task(t, data))
    if tasks is not None and any(t not in data.tasks for t in tasks):
        raise SystemExit(f"--tasks: unknown task in {tasks}; known: {sorted(data.tasks)}")
    missing = missing_runs(collection.scores, tasks=tasks, seeds=_csv(args.seeds, int))
    compare = [normalise_method(m) for m in args.compare.split(",")]
    if len(compare) != 2:
        raise SystemExit("--compare takes two methods, e.g. bidora,dora")
    report = wilcoxon_test(collection.scores, a=compare[0], b=compare[1], pair_by=args.pair_by,
                           tasks=[t for t, s in data.tasks.items() if s.glue])
    paper_p = data.wilcoxon_p if compare == ["bidora", "dora"] else None
    text = render_markdown(collection, missing, format_wilcoxon_markdown(report, data.method_names, paper_p), data)
    print(text)
    if args.markdown:
        atomic_write_text(args.markdown, text)
        print(f"wrote {args.markdown}")
    if args.figure:
        from utils.aggregate_plot import plot_task_bars

        print(f"wrote {plot_task_bars(summarise(collection.scores), args.figure, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
