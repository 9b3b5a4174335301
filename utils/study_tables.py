"""The small-data study's tables (utils/study_report.py writes them), each as markdown and a JSON-ready dict, from
the points of :func:`utils.results.load_study` (rows: every arm's reported model, and BiDoRA's search phase alone,
``<arm>:search``). Test accuracy in percent; paired differences in percent points over the seeds both rows have.

Learning curves per (device, dataset) and N; the headline pooled over sizes and seeds; sensitivity arms against the
default BiDoRA, Holm-adjusted within each (device, dataset, N); the confirmation (examples/study/plan.py
``CONFIRMATION``: one-sided against the default, reported against DoRA); cost per cell (method time = wall − test
evaluations; cells that shared the machine or resumed are left out of the medians); open cells.
"""

from __future__ import annotations

from collections import defaultdict

from utils.formatting import EN_DASH, diff_ci, mean_std, p_text
from utils.results import SEARCH, Point
from utils.stats import (
    PairedTest,
    Series,
    group_series,
    holm_adjust,
    median,
    paired_differences,
    paired_test,
    seed_differences,
)

CORE_ROWS = ("lora", "dora", "dora_es", "bidora:search", "bidora")
ROW_LABELS = {"lora": "LoRA", "dora": "DoRA", "dora_es": "DoRA, early-stopped (80/20)",
              "bidora:search": "BiDoRA, search only", "bidora": "BiDoRA, retrained"}
CURVE_PAIRS = (("bidora", "dora"), ("bidora", "dora_es"), ("bidora:search", "dora_es"), ("dora_es", "dora"),
               ("dora", "lora"))
DATASET_TITLES = {"rt": "all-MiniLM-L6-v2 on Rotten Tomatoes", "acp": "AntiBERTy on ACP vs random",
                  "smoke": "smoke (MiniLM, tiny slice)"}



def study_series(points: list[Point]) -> dict[tuple, Series]:
    """{(device, dataset, N, row): Series of the points' values over seeds}."""
    return group_series(points, key=lambda p: (p.device, p.dataset, p.size, p.row), value=lambda p: p.value)


def _ms(s: Series | None) -> str:
    return EN_DASH if s is None or not s.n else mean_std(s.mean, s.std, s.n)


def row_label(row: str) -> str:
    """A row's name in tables: 'BiDoRA, retrained', 'BiDoRA, upper_lr = x10, search only', ..."""
    if row in ROW_LABELS:
        return ROW_LABELS[row]
    arm, _, search = row.partition(":")
    return arm.replace("bidora-", "BiDoRA, ").replace("=", " = ") + (", search only" if search else "")


def curve_tables(points: list[Point]) -> tuple[str, dict]:
    """Per device and dataset: rows × sizes (mean ± std (n)), then the paired differences per size."""
    series = study_series([p for p in points if p.group == "curve"])
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
                cells.append(f"{diff_ci(t)}, p = {p_text(t.p_two_sided)} (n = {t.n})" if t.n else "–")
                entries[n] = {"seeds": seeds, "mean": t.mean_diff, "ci": [t.ci_low, t.ci_high],
                              "p_two_sided": t.p_two_sided}
            lines.append(f"| {row_label(a)} − {row_label(b)} | " + " | ".join(cells) + " |")
            data.setdefault(f"{device}/{dataset}", {}).setdefault("pairs", {})[f"{a} - {b}"] = entries
        data.setdefault(f"{device}/{dataset}", {})["rows"] = {
            row: {str(n): {"values": s.values, "seeds": s.seeds, "mean": s.mean, "std": s.std}
                  for n in sizes if (s := series.get((device, dataset, n, row)))} for row in CORE_ROWS}
        lines.append("")
    return "\n".join(lines), data


def pooled_tests(points: list[Point]) -> tuple[str, dict]:
    """The headline: a − b pooled over every (dataset, N, seed) pair, per device, per dataset and over both."""
    series = study_series([p for p in points if p.group == "curve"])
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
                lines.append(f"| {row_label(a)} − {row_label(b)} | {where} × N × seed | {t.n} | {diff_ci(t)} | "
                             f"{p_text(t.p_two_sided)} | {p_text(t.p_greater)} |")
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
        series = study_series(where)
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
                         f"{diff_ci(e['test'])} | {p_text(e['test'].p_two_sided)} | {p_text(e['p_holm'])} | "
                         f"{_ms(e.get('search'))} | {diff_ci(e['search_test']) if 'search_test' in e else '–'} |")
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
        series = study_series([p for p in points if (p.device, p.dataset, p.size) == (device, dataset, size)])
        arm, base, dora, search, base_search = (series.get((device, dataset, size, r)) for r in
                                                (row, "bidora", "dora", f"{row}:{SEARCH}", f"bidora:{SEARCH}"))
        where = f"{DATASET_TITLES.get(dataset, dataset)}, N = {size} ({device})"
        if base is None:
            lines.append(f"| {where} | {row_label(row)} | {_ms(arm)} | no default BiDoRA cell yet | – | – | – | – |")
            continue
        diffs = seed_differences(arm, base)[1]
        test = paired_test(diffs)
        vs_dora = paired_differences(arm, dora)[1] if dora is not None else PairedTest()
        vs_search = (paired_differences(search, base_search)[1] if search is not None and base_search is not None
                     else PairedTest())
        above = sum(d > 0 for d in diffs)
        lines.append(f"| {where} | {row_label(row)} | {_ms(arm)} | {diff_ci(test)} | {p_text(test.p_greater)} | "
                     f"{above} of {len(diffs)} | {diff_ci(vs_dora)} | {diff_ci(vs_search)} |")
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


def timed_points(points: list[Point]) -> tuple[list[Point], bool]:
    """The cells whose times count: those that neither shared the machine nor resumed (a resumed cell's times cover
    its last part only: never used); when there are none, the shared ones, and True (the times are inflated)."""
    timed = [p for p in points if p.wall_s and not p.resumed]
    clean = [p for p in timed if not p.shared]
    return (clean, False) if clean else (timed, bool(timed))


def method_seconds(point: Point) -> float | None:
    """The method's own time of a cell: its wall time minus its test-split evaluations (None when unknown)."""
    return point.wall_s - point.test_eval_s if point.wall_s and point.test_eval_s is not None else None


def cost_table(points: list[Point]) -> tuple[str, dict]:
    """Per (device, dataset, N, row): medians of wall time, of the test evaluations inside it, of the method's own
    time (wall − test evaluations) and its ratio to DoRA's, CPU time and peak memory; over the cells that neither
    shared the machine nor resumed (all cells, marked *, when no such cell exists)."""
    groups: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        groups[(p.device, p.dataset, p.size, p.row)].append(p)

    own_time = {k: median(method_seconds(p) for p in timed_points(ps)[0]) for k, ps in groups.items()}
    lines = ["| device | dataset | N | arm | cells | excluded | median wall (s) | of which test eval (s) | "
             "method time (s) | × DoRA | median CPU (s) | peak RSS (GB) | accuracy − DoRA |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    data = []
    order = {r: i for i, r in enumerate(CORE_ROWS)}
    series = study_series(points)
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], order.get(k[3], 99), k[3])):
        ps = groups[key]
        used, only_shared = timed_points(ps)
        star = "*" if only_shared else ""
        wall, evals = median(p.wall_s for p in used), median(p.test_eval_s for p in used)
        mine, dora = own_time[key], own_time.get((*key[:3], "dora"))
        cpu, rss = median(p.cpu_s for p in used), median(p.peak_rss_bytes for p in used)
        diff = None
        if (sd := series.get((*key[:3], "dora"))) is not None:
            diff = paired_differences(series[key], sd)[1].mean_diff
        ratio = mine / dora if mine and dora else None

        def num(x, fmt="{:.0f}", star=star):
            return "–" if x is None else fmt.format(x) + star

        excluded = sum(p.shared or p.resumed for p in ps)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {row_label(key[3])} | {len(ps)} | {excluded} | {num(wall)} | "
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

