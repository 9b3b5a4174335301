"""Tables and figures of the small-data study (examples/study) from its per-cell result files.

    python utils/study_report.py [RESULTS] [--out DIR] [--estimators DIR] [--estimator-runs DIR]

RESULTS (default results/study) holds ``<device>/<dataset>-n<N>/<arm>/seed<k>/{cell.json,results.json,log.csv}``
as examples/study/run_study.py writes them. Writes ``DIR/study.md`` (every table), ``DIR/study.json``,
``DIR/learning_curve.png`` and ``DIR/sensitivity.png`` (default DIR: runs/study/report; the copies under
assets/study, which docs/study.md shows, are refreshed by ``make study-report``).

Compared (test accuracy in percent, nothing selected on test; utils/study_tables.py, utils/README.md): learning
curves per dataset with paired differences per size, the headline pooled over sizes and seeds, sensitivity arms
against the default BiDoRA (Holm-adjusted), the pre-stated confirmation, cost per cell (cells that shared the machine
or resumed are left out of the medians), failed and open cells. Devices are never paired with each other.

``--estimators DIR`` (e.g. results/estimators; left out, with a note, when DIR does not exist) adds the
hypergradient-estimator comparison, ``estimators.md`` and ``estimators.json`` in the output folder; its magnitude
shifts come from the cells' adapters under ``--estimator-runs`` (default runs/estimators/runs). Each shift computed
from an adapter is also written to the cell's results folder as ``magnitude_shift.json`` (small, committed, so the
number survives the run folder, which is not); a cell whose adapter is gone is read from that file, n/a without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `utils` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralib.files import atomic_write_text  # noqa: E402
from utils.estimator_comparison import compare, estimator_json, estimator_markdown, verdicts  # noqa: E402
from utils.results import Point, StudyResults, load_study  # noqa: E402
from utils.study_figures import plot_learning_curves, plot_sensitivity  # noqa: E402
from utils.study_tables import (  # noqa: E402
    confirmation_table,
    cost_table,
    curve_tables,
    open_cells,
    pooled_tests,
    sensitivity_table,
)

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["build_estimator_report", "build_report", "main", "plot_learning_curves", "plot_sensitivity"]


def build_report(results: str | Path) -> tuple[str, dict, StudyResults, list[dict]]:
    """The study's markdown, its JSON summary, the loaded cells and the sensitivity rows (for the forest plot)."""
    study = load_study(results)
    curve_md, curve = curve_tables(study.points)
    pooled_md, pooled = pooled_tests(study.points)
    sens_md, sens, sens_rows = sensitivity_table(study.points)
    conf_md, conf = confirmation_table(study.points)
    cost_md, cost = cost_table(study.points)
    opened = open_cells(study.points)
    parts = ["## Learning curves", "", curve_md, "## Headline: pooled over sizes and seeds", "", pooled_md,
             "## Sensitivity (one factor at a time around the default BiDoRA)", "",
             sens_md or "(no sensitivity cell recorded yet)\n",
             "## Confirmation (a hypothesis stated before its cells ran; examples/study/plan.py CONFIRMATION)", "",
             conf_md or "(no confirmation cell recorded yet)\n",
             "## Cost per cell", "", cost_md]
    if study.failed:
        parts += ["## Failed cells", ""] + [f"- {f['device']}/{f['cell']}: {f['error']}" for f in study.failed] + [""]
    if opened:
        parts += ["## Open cells (fewer seeds than the most complete)", ""] + [f"- {o}" for o in opened] + [""]
    summary = {"curves": curve, "pooled": pooled, "sensitivity": sens, "confirmation": conf, "cost": cost,
               "failed": study.failed, "open": opened, "cells": study.files}
    return "\n".join(parts), summary, study, sens_rows


def build_estimator_report(results: str | Path, runs: str | Path | None = None) -> tuple[str, dict]:
    """The estimator comparison of the cells under ``results`` as markdown and JSON; magnitude shifts from the
    adapters under ``runs`` (``<runs>/<dataset>-n<N>/<arm>/seed<k>/adapter``), recorded in and otherwise read from
    ``<results>/<device>/<dataset>-n<N>/<arm>/seed<k>/magnitude_shift.json`` (n/a without either)."""
    study = load_study(results)
    comparisons = compare(study.points, lambda p: _shift(Path(results), None if runs is None else Path(runs), p))
    rule = verdicts(comparisons)
    return (estimator_markdown(comparisons, rule, study.failed), estimator_json(comparisons, rule, study.failed))


SHIFT_FILE = "magnitude_shift.json"


def _shift(results: Path, runs: Path | None, point: Point) -> float | None:
    """The cell's relative magnitude shift (utils/magnitudes.py): computed from its adapter when the run folder is
    there (and recorded beside the cell's results), else the recorded value, else None."""
    name = Path(f"{point.dataset}-n{point.size}") / point.row / f"seed{point.seed}"
    record = results / point.device / name / SHIFT_FILE
    cell = None if runs is None else runs / name
    if cell is not None and (cell / "adapter").is_dir():
        from utils.magnitudes import cell_magnitude_shift  # torch and transformers: only when there is an adapter

        try:
            value = cell_magnitude_shift(cell)[1]
        except (ValueError, OSError) as err:
            print(f"warning: magnitude shift of {cell}: {err}", file=sys.stderr)
        else:
            if record.parent.is_dir() and _recorded_shift(record, quiet=True) != value:
                atomic_write_text(record, json.dumps({"magnitude_shift": value, "from": "the cell's adapter"}) + "\n")
            return value
    return _recorded_shift(record)


def _recorded_shift(record: Path, quiet: bool = False) -> float | None:
    if not record.is_file():
        return None
    try:
        return float(json.loads(record.read_text())["magnitude_shift"])
    except (ValueError, KeyError, TypeError) as err:
        if not quiet:
            print(f"warning: {record} is not a magnitude-shift record ({err}); shift n/a", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    """Write the report files; 0, or 1 on bad input (the error on stderr)."""
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n", 1)[0], epilog=doc.split("\n", 2)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", type=Path, default=ROOT / "results" / "study")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "study" / "report")
    p.add_argument("--estimators", type=Path, default=None, help="results of the estimator comparison (if it exists)")
    p.add_argument("--estimator-runs", type=Path, default=ROOT / "runs" / "estimators" / "runs",
                   help="its cells' run folders, for the magnitude shifts")
    args = p.parse_args(argv)
    try:
        text, summary, study, sens_rows = build_report(args.results)
        atomic_write_text(args.out / "study.md", text)
        atomic_write_text(args.out / "study.json", json.dumps(summary, indent=2, default=str) + "\n")
        plot_learning_curves(study.points, args.out / "learning_curve.png")
        if sens_rows:
            plot_sensitivity(sens_rows, args.out / "sensitivity.png")
        estimators = args.estimators is not None and args.estimators.is_dir()
        if estimators:
            est_text, est_summary = build_estimator_report(args.estimators, args.estimator_runs)
            atomic_write_text(args.out / "estimators.md", est_text)
            atomic_write_text(args.out / "estimators.json", json.dumps(est_summary, indent=2) + "\n")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(text, end="")
    print(f"wrote {args.out}/study.md, study.json, learning_curve.png" + (", sensitivity.png" if sens_rows else "")
          + (", estimators.md, estimators.json" if estimators else ""), file=sys.stderr)
    if args.estimators is not None and not estimators:
        print(f"no {args.estimators}: the estimator comparison is left out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
