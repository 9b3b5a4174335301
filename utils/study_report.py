"""Tables and figures of the small-data study (examples/study) from its per-cell result files.

    python utils/study_report.py [RESULTS] [--out DIR]

RESULTS (default results/study) holds ``<device>/<dataset>-n<N>/<arm>/seed<k>/{cell.json,results.json,log.csv}``
as examples/study/run_study.py writes them. Writes ``DIR/study.md`` (every table), ``DIR/study.json``,
``DIR/learning_curve.png`` and ``DIR/sensitivity.png`` (default DIR: runs/study/report; the copies under
assets/study, which docs/study.md shows, are refreshed by ``make study-report``).

What is compared (test accuracy, in percent points; nothing is selected on test):

* rows: every arm's reported model, plus BiDoRA's search phase alone ("search only": the held-out-best search step,
  utils/report.py ``search_only_value``) for every BiDoRA arm;
* per (dataset, N): mean ± sample std over seeds, and paired differences over the seeds both rows have (mean, 95%
  percentile bootstrap interval, Wilcoxon signed-rank p; utils/significance.py);
* headline: BiDoRA − DoRA and BiDoRA − DoRA-early-stopped pooled over seeds × sizes (Wilcoxon on all pairs);
* sensitivity: every one-factor arm (and retraining off) against the default BiDoRA on the same seeds, Holm-adjusted
  within each (device, dataset, N);
* confirmation: a hypothesis the sensitivity left, stated before its cells ran (examples/study/plan.py
  ``CONFIRMATION``), tested once on other data: one-sided Wilcoxon (arm > default BiDoRA), and reported against DoRA;
* cost: median wall time, the test evaluations inside it, the method's own time (wall − test evaluations) and its
  ratio to DoRA's, CPU time and peak memory. A CPU cell whose CPU seconds per wall second are below 0.8 × the best
  seen on its host shared the machine with other work; shared and resumed cells are counted and left out of the
  medians (shared ones are used, marked *, when no other cell exists; resumed ones never).

Results of different devices are never paired (each device is its own section). Failed cells are listed with
their error; cells of a grid with fewer seeds than the most complete cell are listed as open.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `utils` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralib.files import atomic_write_text  # noqa: E402
from utils.report import (  # noqa: E402
    Series,
    _phase_ends_from_log,
    _pyplot,
    _save,
    group_series,
    load_run,
    metric_value,
    paired_differences,
    search_only_value,
    seed_differences,
)
from utils.significance import PairedTest, holm_adjust, paired_test  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METRIC = "accuracy"
SHARED_FRACTION = 0.8  # CPU seconds per wall second below this fraction of the host's best: shared with other work
SEARCH = "search"  # suffix of the search-only row of a BiDoRA arm
CORE_ROWS = ("lora", "dora", "dora_es", "bidora:search", "bidora")
ROW_LABELS = {"lora": "LoRA", "dora": "DoRA", "dora_es": "DoRA, early-stopped (80/20)",
              "bidora:search": "BiDoRA, search only", "bidora": "BiDoRA, retrained"}
CURVE_PAIRS = (("bidora", "dora"), ("bidora", "dora_es"), ("bidora:search", "dora_es"), ("dora_es", "dora"),
               ("dora", "lora"))
DATASET_TITLES = {"rt": "all-MiniLM-L6-v2 on Rotten Tomatoes", "acp": "AntiBERTy on ACP vs random",
                  "smoke": "smoke (MiniLM, tiny slice)"}


@dataclass
class Point:
    """One value of one row: (device, dataset, N, row, seed) with its cell's cost."""

    device: str
    dataset: str
    size: int
    row: str  # arm name, or "<arm>:search"
    seed: int
    value: float  # percent
    wall_s: float | None
    cpu_s: float | None
    peak_rss_bytes: int | None
    factor: str | None = None
    level: str | None = None
    default_level: str | None = None
    group: str = "curve"
    test_eval_s: float | None = None  # seconds spent evaluating the test split (the study's, not the method's)
    host: str = ""
    shared: bool = False  # the cell shared the machine with other work (set by load_study)
    resumed: bool = False


@dataclass
class StudyResults:
    points: list[Point] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    files: int = 0


def _search_wall(cell: dict, run_dir: Path) -> float | None:
    """Process wall time minus the retraining phase (log.csv elapsed at the end minus at the end of the search)."""
    ends = _phase_ends_from_log(run_dir)
    if "search" not in ends or cell.get("wall_s") is None:
        return None
    return cell["wall_s"] - (max(ends.values()) - ends["search"])


def load_study(results: str | Path) -> StudyResults:
    """Every recorded cell under ``results`` (``<device>/.../cell.json``), as points per reported row.

    Raises:
        ValueError: no cell.json under ``results``, or a malformed file (named).
    """
    root = Path(results)
    records = sorted(root.rglob("cell.json"))
    if not records:
        raise ValueError(f"no cell.json under {root} (run examples/study/run_study.py first)")
    out = StudyResults(files=len(records))
    for path in records:
        try:
            cell = json.loads(path.read_text(encoding="utf-8"))
            key = dict(device=cell["device"], dataset=cell["dataset"], size=int(cell["size"]), seed=int(cell["seed"]),
                       factor=cell.get("factor"), level=cell.get("level"), default_level=cell.get("default_level"),
                       group=cell.get("group", "curve"), host=str(cell.get("host", "")),
                       resumed=bool(cell.get("resumed")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a study cell record ({err!r})") from err
        if cell.get("status") != "done":
            out.failed.append({"cell": cell.get("cell", str(path.parent)), "device": cell["device"],
                               "error": cell.get("error", "")})
            continue
        run = load_run(path.parent / "results.json")
        cost = dict(wall_s=cell.get("wall_s"), cpu_s=cell.get("cpu_s"), peak_rss_bytes=cell.get("peak_rss_bytes"),
                    test_eval_s=_test_eval_seconds(run.history))
        out.points.append(Point(row=cell["arm"], value=100 * metric_value(run, "test", METRIC), **key, **cost))
        if cell.get("method") == "bidora":
            step, values = search_only_value(run, "test", [METRIC])
            search_cost = dict(cost, wall_s=_search_wall(cell, path.parent) if cost["wall_s"] else None, cpu_s=None,
                               test_eval_s=_test_eval_seconds([h for h in run.history if h.get("phase") == "search"]))
            out.points.append(Point(row=f"{cell['arm']}:{SEARCH}", value=100 * values[METRIC], **key, **search_cost))
    _mark_shared(out.points)
    return out


def _test_eval_seconds(history: list[dict]) -> float | None:
    """Seconds spent evaluating the test split (None when the history predates the ``runtime`` field)."""
    rows = [h for h in history if h.get("split") == "test"]
    if not rows or any("runtime" not in h for h in rows):
        return None
    return float(sum(h["runtime"] for h in rows))


def _mark_shared(points: list[Point]) -> None:
    """A CPU cell shared the machine when its CPU time per wall second is below 0.8 × the best one seen on that host
    (a lone cell keeps every core it uses busy; on 2 cores a lone cell measures about 1.85, a shared one 1.0-1.3)."""
    best: dict[str, float] = {}
    for p in points:
        if p.device == "cpu" and p.cpu_s and p.wall_s:
            best[p.host] = max(best.get(p.host, 0.0), p.cpu_s / p.wall_s)
    by_cell = {(p.device, p.dataset, p.size, p.row.partition(":")[0], p.seed): p for p in points if p.cpu_s}
    for p in points:
        owner = by_cell.get((p.device, p.dataset, p.size, p.row.partition(":")[0], p.seed))
        if owner is not None and owner.device == "cpu" and owner.wall_s:
            p.shared = owner.cpu_s / owner.wall_s < SHARED_FRACTION * best[owner.host]


# ------------------------------------------------------------------------------------------------------- tables


def _series(points: list[Point]) -> dict[tuple, Series]:
    return group_series(points, key=lambda p: (p.device, p.dataset, p.size, p.row), value=lambda p: p.value)


def _ms(s: Series | None) -> str:
    if s is None or not s.n:
        return "–"
    return f"{s.mean:.2f} ± {s.std:.2f} ({s.n})" if s.std is not None else f"{s.mean:.2f} (1)"


def _ci(t: PairedTest) -> str:
    if t.mean_diff is None:
        return "–"
    ci = f" [{t.ci_low:+.2f}, {t.ci_high:+.2f}]" if t.ci_low is not None else ""
    return f"{t.mean_diff:+.2f}{ci}"


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.3g}"


def _label(row: str) -> str:
    if row in ROW_LABELS:
        return ROW_LABELS[row]
    arm, _, search = row.partition(":")
    return arm.replace("bidora-", "BiDoRA, ").replace("=", " = ") + (", search only" if search else "")


def curve_tables(points: list[Point]) -> tuple[str, dict]:
    """Per device and dataset: rows × sizes (mean ± std (n)), then the paired differences per size."""
    series = _series([p for p in points if p.group == "curve"])
    lines, data = [], {}
    for device, dataset in sorted({(k[0], k[1]) for k in series}):
        sizes = sorted({k[2] for k in series if k[:2] == (device, dataset)})
        title = DATASET_TITLES.get(dataset, dataset)
        lines += [f"### {title} ({device}): test accuracy (%), mean ± sample std (seeds)", "",
                  "| arm | " + " | ".join(f"N = {n}" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
        for row in CORE_ROWS:
            cells = [series.get((device, dataset, n, row)) for n in sizes]
            if any(cells):
                lines.append(f"| {ROW_LABELS[row]} | " + " | ".join(_ms(c) for c in cells) + " |")
        lines += ["", "Paired differences a − b (percent points) over common seeds: mean [95% bootstrap "
                  "interval], Wilcoxon p (two-sided; 5 pairs cannot go below 0.0625)", "",
                  "| a − b | " + " | ".join(f"N = {n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for a, b in CURVE_PAIRS:
            cells, entries = [], {}
            for n in sizes:
                sa, sb = series.get((device, dataset, n, a)), series.get((device, dataset, n, b))
                if sa is None or sb is None:
                    cells.append("–")
                    continue
                seeds, t = paired_differences(sa, sb)
                cells.append(f"{_ci(t)}, p = {_p(t.p_two_sided)} (n = {t.n})" if t.n else "–")
                entries[n] = {"seeds": seeds, "mean": t.mean_diff, "ci": [t.ci_low, t.ci_high],
                              "p_two_sided": t.p_two_sided}
            lines.append(f"| {_label(a)} − {_label(b)} | " + " | ".join(cells) + " |")
            data.setdefault(f"{device}/{dataset}", {}).setdefault("pairs", {})[f"{a} - {b}"] = entries
        data.setdefault(f"{device}/{dataset}", {})["rows"] = {
            row: {str(n): {"values": s.values, "seeds": s.seeds, "mean": s.mean, "std": s.std}
                  for n in sizes if (s := series.get((device, dataset, n, row)))} for row in CORE_ROWS}
        lines.append("")
    return "\n".join(lines), data


def pooled_tests(points: list[Point]) -> tuple[str, dict]:
    """The headline: a − b pooled over every (dataset, N, seed) pair, per device, per dataset and over both."""
    series = _series([p for p in points if p.group == "curve"])
    lines = ["| a − b | pooled over | pairs | mean [95% bootstrap] | Wilcoxon p (two-sided) | p (a better) |",
             "|---|---|---:|---|---:|---:|"]
    data = {}
    for a, b in (("bidora", "dora"), ("bidora", "dora_es"), ("bidora:search", "dora_es"), ("dora_es", "dora")):
        for device in sorted({k[0] for k in series}):
            datasets = sorted({k[1] for k in series if k[0] == device})
            for scope in [*datasets, "all"] if len(datasets) > 1 else datasets:
                diffs = []
                for key, sa in series.items():
                    if key[0] != device or key[3] != a or (scope != "all" and key[1] != scope):
                        continue
                    sb = series.get((*key[:3], b))
                    if sb is not None:
                        bv = dict(zip(sb.seeds, sb.values))
                        diffs += [v - bv[s] for s, v in zip(sa.seeds, sa.values) if s in bv]
                t = paired_test(diffs)
                where = f"{device}, {'every dataset' if scope == 'all' else DATASET_TITLES.get(scope, scope)}"
                lines.append(f"| {_label(a)} − {_label(b)} | {where} × N × seed | {t.n} | {_ci(t)} | "
                             f"{_p(t.p_two_sided)} | {_p(t.p_greater)} |")
                data[f"{a} - {b} | {device} | {scope}"] = {"n": t.n, "mean": t.mean_diff, "ci": [t.ci_low, t.ci_high],
                                                           "p_two_sided": t.p_two_sided, "p_greater": t.p_greater}
    caveat = ("\nThe pooled test treats every (dataset, N, seed) pair as independent. They are not quite: for one seed "
              "the smaller Rotten Tomatoes training set is inside the larger one, and every size shares one test set, "
              "so the pooled p is somewhat optimistic; the per-size tables above carry no such assumption.\n")
    return "\n".join(lines) + "\n" + caveat, data


def sensitivity_table(points: list[Point]) -> tuple[str, dict, list[dict]]:
    """Per (device, dataset, N) with sensitivity cells: each arm against the default BiDoRA on the same seeds (the
    reported, retrained model; and search only against the default's search only), plus retraining off (the
    default's search-only row) against on; two-sided Wilcoxon p, Holm-adjusted within that group."""
    sens = [p for p in points if p.group == "sensitivity"]
    rows: list[dict] = []
    blocks: list[str] = []
    for device, dataset, size in sorted({(p.device, p.dataset, p.size) for p in sens}):
        where = [p for p in points if (p.device, p.dataset, p.size) == (device, dataset, size)]
        series = _series(where)
        base, base_search = (series.get((device, dataset, size, r)) for r in ("bidora", f"bidora:{SEARCH}"))
        title = f"### {DATASET_TITLES.get(dataset, dataset)}, N = {size} ({device})"
        if base is None:
            blocks.append(f"{title}\n\n(sensitivity cells recorded, but no default BiDoRA cell to compare with yet)\n")
            continue
        arms = sorted({(p.factor, p.level, p.default_level, p.row) for p in where
                       if p.group == "sensitivity" and not p.row.endswith(f":{SEARCH}")})
        group = [dict(factor="retrain", level="off", default="on", row=f"bidora:{SEARCH}", search_row=None)]
        group += [dict(factor=f, level=lv, default=d, row=row, search_row=f"{row}:{SEARCH}") for f, lv, d, row in arms]
        entries = []
        for g in group:
            s = series.get((device, dataset, size, g["row"]))
            if s is None:
                continue
            entry = {"device": device, "dataset": dataset, "size": size, **g, "series": s,
                     "test": paired_differences(s, base)[1]}
            ss = series.get((device, dataset, size, g["search_row"])) if g["search_row"] else None
            if ss is not None and base_search is not None:
                entry["search"], entry["search_test"] = ss, paired_differences(ss, base_search)[1]
            entries.append(entry)
        for entry, adj in zip(entries, holm_adjust([e["test"].p_two_sided for e in entries])):
            entry["p_holm"], entry["base"] = adj, base
        lines = [title, "", f"Default BiDoRA (retrained): {_ms(base)}; its search only: {_ms(base_search)}", "",
                 "| factor = level (default) | accuracy | − default [95% bootstrap] | p | p (Holm) | "
                 "search only: accuracy | − default's search only |", "|---|---|---|---:|---:|---|---|"]
        for e in entries:
            what = "search only (no retraining)" if e["factor"] == "retrain" else "retrained"
            lines.append(f"| {e['factor']} = {e['level']} ({e['default'] or '?'}; {what}) | {_ms(e['series'])} | "
                         f"{_ci(e['test'])} | {_p(e['test'].p_two_sided)} | {_p(e['p_holm'])} | "
                         f"{_ms(e.get('search'))} | {_ci(e['search_test']) if 'search_test' in e else '–'} |")
        blocks.append("\n".join(lines) + "\n")
        rows += entries
    data = [{k: v for k, v in e.items() if k not in ("series", "search", "test", "search_test", "base")}
            | {"mean": e["series"].mean, "std": e["series"].std, "seeds": e["series"].seeds,
               "diff": e["test"].mean_diff, "ci": [e["test"].ci_low, e["test"].ci_high],
               "p_two_sided": e["test"].p_two_sided} for e in rows]
    return "\n".join(blocks), {"rows": data}, rows


def confirmation_table(points: list[Point]) -> tuple[str, dict]:
    """Each confirmation arm (retrained model) against the default BiDoRA on the same seeds with the stated test, a
    one-sided Wilcoxon signed-rank p (arm better; one test, so no Holm), and against DoRA (reported, not tested);
    plus its search-only row against the default's."""
    conf = {(p.device, p.dataset, p.size, p.row) for p in points
            if p.group == "confirmation" and not p.row.endswith(f":{SEARCH}")}
    lines: list[str] = []
    data: list[dict] = []
    for device, dataset, size, row in sorted(conf):
        series = _series([p for p in points if (p.device, p.dataset, p.size) == (device, dataset, size)])
        arm, base, dora, search, base_search = (series.get((device, dataset, size, r)) for r in
                                                (row, "bidora", "dora", f"{row}:{SEARCH}", f"bidora:{SEARCH}"))
        where = f"{DATASET_TITLES.get(dataset, dataset)}, N = {size} ({device})"
        if base is None:
            lines.append(f"| {where} | {_label(row)} | {_ms(arm)} | no default BiDoRA cell yet | – | – | – | – |")
            continue
        diffs = seed_differences(arm, base)[1]
        test = paired_test(diffs)
        vs_dora = paired_differences(arm, dora)[1] if dora is not None else PairedTest()
        vs_search = (paired_differences(search, base_search)[1] if search is not None and base_search is not None
                     else PairedTest())
        above = sum(d > 0 for d in diffs)
        lines.append(f"| {where} | {_label(row)} | {_ms(arm)} | {_ci(test)} | {_p(test.p_greater)} | "
                     f"{above} of {len(diffs)} | {_ci(vs_dora)} | {_ci(vs_search)} |")
        data.append({"device": device, "dataset": dataset, "size": size, "row": row, "mean": arm.mean,
                     "std": arm.std, "seeds": arm.seeds, "diff": test.mean_diff, "ci": [test.ci_low, test.ci_high],
                     "p_greater": test.p_greater, "seeds_above": above, "pairs": len(diffs),
                     "minus_dora": vs_dora.mean_diff, "minus_dora_ci": [vs_dora.ci_low, vs_dora.ci_high],
                     "search_minus_default_search": vs_search.mean_diff})
    if not lines:
        return "", {"rows": data}
    header = ["| where | arm | accuracy | − default BiDoRA [95% bootstrap] | p, one-sided (arm > default) | "
              "seeds above default | − DoRA [95% bootstrap] | search only − default's search only |",
              "|---|---|---|---|---:|---|---|---|"]
    return "\n".join(header + lines) + "\n", {"rows": data}


def cost_table(points: list[Point]) -> tuple[str, dict]:
    """Per (device, dataset, N, row): medians of wall time, of the test evaluations inside it, of the method's own
    time (wall − test evaluations) and its ratio to DoRA's, CPU time and peak memory; over the cells that neither
    shared the machine nor resumed (all cells, marked *, when no such cell exists)."""
    groups: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        groups[(p.device, p.dataset, p.size, p.row)].append(p)

    def med(values):
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    def usable(ps):  # a resumed cell's times cover its last part only: never used
        timed = [p for p in ps if p.wall_s and not p.resumed]
        clean = [p for p in timed if not p.shared]
        return (clean, False) if clean else (timed, bool(timed))

    def own(p):
        return p.wall_s - p.test_eval_s if p.wall_s and p.test_eval_s is not None else None

    own_time = {k: med([own(p) for p in usable(ps)[0]]) for k, ps in groups.items()}
    lines = ["| device | dataset | N | arm | cells | excluded | median wall (s) | of which test eval (s) | "
             "method time (s) | × DoRA | median CPU (s) | peak RSS (GB) | accuracy − DoRA |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    data = []
    order = {r: i for i, r in enumerate(CORE_ROWS)}
    series = _series(points)
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], order.get(k[3], 99), k[3])):
        ps = groups[key]
        used, only_shared = usable(ps)
        star = "*" if only_shared else ""
        wall, evals = med([p.wall_s for p in used]), med([p.test_eval_s for p in used])
        mine, dora = own_time[key], own_time.get((*key[:3], "dora"))
        cpu, rss = med([p.cpu_s for p in used]), med([p.peak_rss_bytes for p in used])
        diff = None
        if (sd := series.get((*key[:3], "dora"))) is not None:
            diff = paired_differences(series[key], sd)[1].mean_diff
        ratio = mine / dora if mine and dora else None

        def num(x, fmt="{:.0f}", star=star):
            return "–" if x is None else fmt.format(x) + star

        excluded = sum(p.shared or p.resumed for p in ps)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {_label(key[3])} | {len(ps)} | {excluded} | {num(wall)} | "
                     f"{num(evals)} | {num(mine)} | {num(ratio, '{:.2f}')} | {num(cpu)} | "
                     f"{'–' if rss is None else f'{rss / 1e9:.2f}'} | {'–' if diff is None else f'{diff:+.2f}'} |")
        data.append({"device": key[0], "dataset": key[1], "size": key[2], "row": key[3], "cells": len(ps),
                     "excluded": excluded, "only_excluded_cells": only_shared, "median_wall_s": wall,
                     "median_test_eval_s": evals, "median_method_s": mine, "method_time_vs_dora": ratio,
                     "median_cpu_s": cpu, "median_peak_rss_bytes": rss, "accuracy_minus_dora": diff})
    notes = ("\nWall: the cell's process, start to exit (model loading, training, every evaluation). Method time: wall "
             "minus the test-split evaluations, which only the study needs (the arms that select on held-out data "
             "score the test split every epoch so that the search-only row can be read at the held-out-best step); "
             "held-out evaluations stay in (selection is part of those methods). Search-only rows: the run up to "
             "the end of the search phase. Excluded: cells that shared the machine with other work (CPU time per "
             "wall second below 0.8 × the host's best) or resumed from a checkpoint (its times are partial: never "
             "used); * = only shared cells exist (inflated).\n")
    return "\n".join(lines) + "\n" + notes, {"rows": data}


def open_cells(points: list[Point]) -> list[str]:
    """(device, dataset, N, arm) units with fewer seeds than the most complete unit of the study."""
    seeds = defaultdict(set)
    for p in points:
        if not p.row.endswith(f":{SEARCH}"):
            seeds[(p.device, p.dataset, p.size, p.row)].add(p.seed)
    full = max((len(s) for s in seeds.values()), default=0)
    return [f"{d}/{ds}-n{n}/{row}: seeds {sorted(s)} of {full}" for (d, ds, n, row), s in sorted(seeds.items())
            if len(s) < full]


# ------------------------------------------------------------------------------------------------------ figures


def plot_learning_curves(points: list[Point], path) -> Path:
    """One panel per (device, dataset): test accuracy against N (log axis), one line per row (mean, sample-std error
    bars), every seed as a dot."""
    plt = _pyplot()
    series = _series([p for p in points if p.group == "curve"])
    panels = sorted({(k[0], k[1]) for k in series})
    if not panels:
        raise ValueError("nothing to plot: no learning-curve cell recorded")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (device, dataset) in zip(axes[0], panels):
        for i, row in enumerate(CORE_ROWS):
            keys = sorted(k for k in series if k[:2] == (device, dataset) and k[3] == row)
            if not keys:
                continue
            colour = plt.get_cmap("tab10")(i)
            offset = 1 + 0.025 * (i - 2)  # side by side at each N
            xs = np.array([k[2] for k in keys], dtype=float) * offset
            means = [series[k].mean for k in keys]
            stds = [series[k].std or 0.0 for k in keys]
            ax.errorbar(xs, means, yerr=stds, marker="o", ms=4, capsize=3, color=colour, label=ROW_LABELS[row],
                        linestyle="--" if row == "bidora:search" else "-")
            for x, k in zip(xs, keys):
                ax.scatter(x * (1 + rng.uniform(-0.008, 0.008, series[k].n)), series[k].values, s=7,
                           color=colour, alpha=0.45, zorder=3)
        ax.set_xscale("log")
        sizes = sorted({k[2] for k in series if k[:2] == (device, dataset)})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlim(min(sizes) / 1.3, max(sizes) * 1.3)  # the arms' side-by-side offsets stay small next to N
        ax.minorticks_off()
        ax.set_xlabel("training examples N")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{DATASET_TITLES.get(dataset, dataset)} ({device})", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    # one caption for every panel: per panel it overlapped its neighbour's
    fig.supxlabel("mean ± sample std over seeds, seeds as dots; BiDoRA and early-stopped DoRA train on 80% of N and "
                  "use the other 20% as held-out data", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_sensitivity(rows: list[dict], path) -> Path:
    """Forest plot: each sensitivity arm's paired difference to the default BiDoRA (retrained model; mean and 95%
    bootstrap interval, seeds as dots), one line per arm, grouped by factor."""
    plt = _pyplot()
    if not rows:
        raise ValueError("nothing to plot: no sensitivity arm recorded")
    first = (rows[0]["device"], rows[0]["dataset"], rows[0]["size"])  # one (device, dataset, N) per figure
    rows = [e for e in rows if (e["device"], e["dataset"], e["size"]) == first]
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(rows) + 1.4))
    labels = []
    for y, e in enumerate(reversed(rows)):
        t = e["test"]
        ax.errorbar(t.mean_diff, y, xerr=[[t.mean_diff - t.ci_low], [t.ci_high - t.mean_diff]]
                    if t.ci_low is not None else None, fmt="o", color="tab:blue", capsize=3)
        diffs = seed_differences(e["series"], e["base"])[1]
        ax.scatter(diffs, [y] * len(diffs), s=8, color="black", alpha=0.5, zorder=3)
        labels.append(f"{e['factor']} = {e['level']} (Holm p = {_p(e.get('p_holm'))})")
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("test accuracy − default BiDoRA (percent points; retrained model; 95% bootstrap, seeds as dots)")
    e0 = rows[0]
    ax.set_title(f"Sensitivity around the default, {DATASET_TITLES.get(e0['dataset'], e0['dataset'])} "
                 f"N = {e0['size']} ({e0['device']})", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------- CLI


def build_report(results: str | Path) -> tuple[str, dict, StudyResults, list[dict]]:
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


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n", 1)[0], epilog=doc.split("\n", 2)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", type=Path, default=ROOT / "results" / "study")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "study" / "report")
    args = p.parse_args(argv)
    try:
        text, summary, study, sens_rows = build_report(args.results)
        atomic_write_text(args.out / "study.md", text)
        atomic_write_text(args.out / "study.json", json.dumps(summary, indent=2, default=str) + "\n")
        plot_learning_curves(study.points, args.out / "learning_curve.png")
        if sens_rows:
            plot_sensitivity(sens_rows, args.out / "sensitivity.png")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(text, end="")
    print(f"wrote {args.out}/study.md, study.json, learning_curve.png" + (", sensitivity.png" if sens_rows else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
