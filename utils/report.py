"""Reports over runs' results.json: per-method tables, tables next to the BiDoRA paper, paired tests and figures.

    python utils/report.py RUNS... [--split test] [--metric M] [--extra-metrics f1_weighted] [--tasks T]
                           [--methods lora,dora,bidora] [--seeds 0,1,2] [--compare bidora:dora,...]
                           [--markdown F] [--json F] [--figure F] [--title T]
    python utils/report.py RUNS... --paper [--tasks cola,rte] [--seeds 1,2,3] [--compare bidora:dora]
                           [--pair-by auto|seed|task-mean] [--markdown F] [--json F] [--figure F]

RUNS are folders searched recursively for results.json (docs/CONTRACTS.md), or such files. ``--methods`` and
``--seeds`` keep only those runs and are the grid expected: an absent (method, seed) is reported in the table, the
JSON and on stderr, never dropped silently. Accuracy-like metrics are shown in percent, MSE-like ones raw; mean ±
sample std (ddof = 1), n shown. Exit status 0, or 1 on bad input.

The method table (default; one task and model: utils/method_report.py) has a row per method, BiDoRA's search phase
alone as a row of its own, and paired differences between rows. ``--paper`` (utils/paper_report.py) puts many tasks
and models next to the paper's numbers, lists missing runs and tests BiDoRA against DoRA. What each row, column and
test is: utils/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python utils/report.py): make `utils` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralib.files import atomic_write_text  # noqa: E402
from utils.method_report import method_json, method_markdown, method_table, plot_methods  # noqa: E402
from utils.paper_report import (  # noqa: E402
    format_wilcoxon_markdown,
    missing_runs,
    paper_json,
    paper_markdown,
    paper_scores,
    plot_task_means,
    summarise,
)
from utils.paper_results import load_paper_data, normalise_method, normalise_task  # noqa: E402
from utils.results import Run, load_run, load_runs, search_only_value  # noqa: E402
from utils.stats import wilcoxon_test  # noqa: E402

# What callers of the former all-in-one module import from here (tests/test_run_glue.py); the rest moved (utils/README).
__all__ = ["build_parser", "load_run", "main", "search_only_value"]


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
    """The command line (options in the module docstring)."""
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
        lambda path: plot_task_means(summarise(collection.scores), path, data)


def main(argv: list[str] | None = None) -> int:
    """Run the report; 0, or 1 on bad input (the error on stderr, naming the file)."""
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
