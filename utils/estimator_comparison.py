"""The hypergradient-estimator comparison (examples/study/plan.py ``ESTIMATOR_COMPARISON``, issue 19 item 5): SAMA,
damped_solve and first_order against darts (the default BiDoRA) and DoRA, at Rotten Tomatoes and ACP N = 200.

Per (device, dataset, N), over the seeds at which every arm is done (the others are listed, not counted): test
accuracy of the reported model (mean ± sample std), paired differences against DoRA and against darts (mean, 95%
percentile bootstrap interval; :func:`utils.stats.paired_test`), the relative magnitude shift
(:func:`utils.magnitudes.relative_magnitude_shift`; n/a without the cells' adapters), and the cost of
utils/study_tables.py (method time = wall − test evaluations; shared-machine cells marked and left out of medians).

The rule, stated in the plan before any cell ran: an estimator wins only if its paired interval against DoRA and
against darts excludes 0 on both datasets; here "excludes 0" in its favour (the interval's lower end above 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from utils.formatting import EN_DASH, diff_ci, mean_std, table_row
from utils.results import Point
from utils.stats import PairedTest, Series, median, paired_test, seed_differences
from utils.study_tables import DATASET_TITLES, method_seconds, timed_points

DORA, DARTS = "dora", "bidora"
ESTIMATORS = ("bidora-hypergradient=sama", "bidora-hypergradient=damped_solve", "bidora-hypergradient=first_order")
ARMS = (DORA, DARTS, *ESTIMATORS)  # the plan's arms of each dataset (tests/test_report.py checks them against it)
DATASETS = (("rt", 200), ("acp", 200))
PLANNED_SEEDS = 5
LABELS = {DORA: "DoRA", DARTS: "darts (default BiDoRA)", ESTIMATORS[0]: "sama", ESTIMATORS[1]: "damped_solve",
          ESTIMATORS[2]: "first_order"}


@dataclass
class ArmResult:
    """One arm of one dataset over the counted seeds."""

    arm: str
    accuracy: Series
    minus_dora: PairedTest | None  # None for DoRA itself
    minus_darts: PairedTest | None  # None for darts itself
    shifts: list[float | None]  # relative magnitude shift per counted seed (None: adapter not available)
    wall_s: float | None  # medians over the counted cells that did not share the machine (all, if none)
    method_s: float | None
    only_shared: bool  # every counted cell shared the machine: the times are inflated
    shared: int  # counted cells that shared the machine
    cpu_per_wall: list[float | None]  # per counted seed


@dataclass
class DatasetComparison:
    """Every arm of one (device, dataset, N) over the seeds at which all arms are done."""

    device: str
    dataset: str
    size: int
    seeds: list[int]
    arms: list[ArmResult] = field(default_factory=list)
    not_counted: dict[str, list[int]] = field(default_factory=dict)  # arm: seeds done while another arm is not


def compare(points: list[Point], shift: Callable[[Point], float | None]) -> list[DatasetComparison]:
    """Group the points of the comparison (reported models; search-only rows are left out) per (device, dataset, N)
    and pair them by seed over the seeds every arm has. ``shift(point)`` is the cell's magnitude shift or None."""
    cells = {(p.device, p.dataset, p.size, p.row, p.seed): p for p in points if p.row in ARMS}
    out = []
    order = {d: i for i, d in enumerate(DATASETS)}
    for device, dataset, size in sorted({k[:3] for k in cells}, key=lambda k: (k[0], order.get(k[1:], 99), k[1:])):
        done = {arm: {k[4] for k in cells if k[:4] == (device, dataset, size, arm)} for arm in ARMS}
        seeds = sorted(set.intersection(*done.values()))
        result = DatasetComparison(device, dataset, size, seeds,
                                   not_counted={a: sorted(s - set(seeds)) for a, s in done.items() if s - set(seeds)})
        counted = {arm: [cells[(device, dataset, size, arm, s)] for s in seeds] for arm in ARMS}
        series = {arm: Series([p.value for p in ps], list(seeds)) for arm, ps in counted.items()}
        for arm, ps in counted.items():
            timed, only_shared = timed_points(ps)
            result.arms.append(ArmResult(
                arm, series[arm], _paired(series[arm], series[DORA], arm == DORA),
                _paired(series[arm], series[DARTS], arm == DARTS), [shift(p) for p in ps],
                median(p.wall_s for p in timed), median(method_seconds(p) for p in timed), only_shared,
                sum(p.shared for p in ps), [p.cpu_s / p.wall_s if p.cpu_s and p.wall_s else None for p in ps]))
        out.append(result)
    return out


def _paired(a: Series, b: Series, same: bool) -> PairedTest | None:
    return None if same else paired_test(seed_differences(a, b)[1])


def verdicts(comparisons: list[DatasetComparison]) -> list[dict]:
    """The rule, per device and estimator: it wins only if all four intervals (against DoRA and against darts, on
    both datasets) lie above 0; it cannot be decided while a dataset has fewer than 2 counted seeds."""
    out = []
    for device in sorted({c.device for c in comparisons}):
        found = {(c.dataset, c.size): c for c in comparisons if c.device == device}
        for estimator in ESTIMATORS:
            intervals, missing = {}, []
            for dataset, size in DATASETS:
                c = found.get((dataset, size))
                arm = next((a for a in c.arms if a.arm == estimator), None) if c else None
                if arm is None or arm.accuracy.n < 2:
                    missing.append(f"{dataset}-n{size}: {0 if arm is None else arm.accuracy.n} counted seed(s)")
                    continue
                for against, test in (("dora", arm.minus_dora), ("darts", arm.minus_darts)):
                    intervals[f"{dataset}-n{size} - {against}"] = [test.ci_low, test.ci_high]
            if missing:
                verdict = "not decidable yet (" + "; ".join(missing) + ")"
            elif all(lo > 0 for lo, _ in intervals.values()):
                verdict = "wins"
            else:
                verdict = "does not win (" + ", ".join(k for k, (lo, _) in intervals.items() if lo <= 0) + \
                    ": interval reaches 0 or below)"
            out.append({"device": device, "estimator": estimator, "intervals": intervals,
                        "wins": verdict == "wins", "verdict": verdict})
    return out


def _shift_text(shifts: list[float | None]) -> str:
    known = [s for s in shifts if s is not None]
    if not known:
        return "n/a"
    part = "" if len(known) == len(shifts) else f"; {len(known)} of {len(shifts)} seeds"
    return f"{median(known):.2%} ({min(known):.2%} – {max(known):.2%}{part})"


def _seconds(x: float | None, star: bool) -> str:
    return EN_DASH if x is None else f"{x:.0f}" + "*" * star


def estimator_markdown(comparisons: list[DatasetComparison], rule: list[dict], failed: list[dict]) -> str:
    """The comparison as markdown: one table per dataset, the rule's verdicts, failed cells, notes."""
    lines = ["# Hypergradient estimators against darts and DoRA (examples/study/plan.py ESTIMATOR_COMPARISON)", "",
             "Test accuracy (%) of the reported model (BiDoRA arms: retrained), mean ± sample std (seeds). Only the "
             "seeds at which every arm of a dataset is done are counted. Differences are paired by seed: mean "
             "[95% percentile bootstrap interval, 9,999 resamples, fixed seed], percent points.", ""]
    for c in comparisons:
        dora = next(a for a in c.arms if a.arm == DORA)
        lines += [f"## {DATASET_TITLES.get(c.dataset, c.dataset)}, N = {c.size} ({c.device}): {len(c.seeds)} of "
                  f"{PLANNED_SEEDS} seeds counted ({', '.join(map(str, c.seeds)) or 'none'})", ""]
        if c.not_counted:
            lines += ["Done but not counted (another arm of the same seed is not done): " + "; ".join(
                f"{LABELS.get(a, a)}: seed{'s' * (len(s) > 1)} {', '.join(map(str, s))}"
                for a, s in c.not_counted.items()) + ".", ""]
        if not c.seeds:
            continue
        lines += [table_row(["arm", "accuracy", "− DoRA [95%]", "− darts [95%]", "magnitude shift, median (range)",
                             "median wall (s)", "method time (s)", "× DoRA", "shared cells"]),
                  "|---|---|---|---|---|---:|---:|---:|---:|"]
        for a in c.arms:
            ratio = a.method_s / dora.method_s if a.method_s and dora.method_s else None
            lines.append(table_row([
                LABELS.get(a.arm, a.arm), mean_std(a.accuracy.mean, a.accuracy.std, a.accuracy.n),
                *(diff_ci(t) if t else EN_DASH for t in (a.minus_dora, a.minus_darts)),
                _shift_text(a.shifts), _seconds(a.wall_s, a.only_shared), _seconds(a.method_s, a.only_shared),
                EN_DASH if ratio is None else f"{ratio:.2f}" + "*" * (a.only_shared or dora.only_shared),
                f"{a.shared} of {a.accuracy.n}"]))
        lines.append("")
    lines += ["## The rule", "",
              "An estimator wins only if its 95% paired bootstrap interval against DoRA and against darts excludes 0 "
              "on both datasets (in its favour: the lower end above 0).", "",
              table_row(["device", "estimator", *(f"{d}-n{n} − {b}" for d, n in DATASETS for b in ("DoRA", "darts")),
                         "verdict"]), "|---|---|" + "---|" * (2 * len(DATASETS)) + "---|"]
    for v in rule:
        cells = [v["intervals"].get(f"{d}-n{n} - {b}") for d, n in DATASETS for b in ("dora", "darts")]
        lines.append(table_row([v["device"], LABELS[v["estimator"]],
                                *(EN_DASH if i is None else f"[{i[0]:+.2f}, {i[1]:+.2f}]" for i in cells),
                                v["verdict"]]))
    if failed:
        lines += ["", "## Failed cells", ""] + [f"- {f['device']}/{f['cell']}: {f['error']}" for f in failed]
    lines += ["", "Magnitude shift: ‖m − ‖W0‖_row‖ / ‖‖W0‖_row‖ pooled over the adapted layers (utils/magnitudes.py), "
              "from each cell's adapter in runs/ or, once computed, its magnitude_shift.json; over the counted seeds "
              "that have one (\"k of n seeds\" where some have neither), n/a where none has. Wall: the "
              "cell's process, start to exit; method time: wall minus the test-split evaluations (the study's); "
              "× DoRA: method time over DoRA's. Shared cells: CPU time per wall second below 0.8 × the best on the "
              "host (the study's rule); they are left out of the medians, * = every counted cell shared the "
              "machine (times inflated). With 5 seeds the bootstrap interval is narrow and describes these seeds."]
    return "\n".join(lines) + "\n"


def estimator_json(comparisons: list[DatasetComparison], rule: list[dict], failed: list[dict]) -> dict:
    """JSON-ready summary: per dataset the counted seeds and per arm every number of the tables; the verdicts."""
    def test(t: PairedTest | None) -> dict | None:
        return None if t is None else {"mean": t.mean_diff, "ci": [t.ci_low, t.ci_high], "n": t.n}

    return {"datasets": [{"device": c.device, "dataset": c.dataset, "size": c.size, "seeds": c.seeds,
                          "not_counted": c.not_counted,
                          "arms": [{"arm": a.arm, "values": a.accuracy.values, "mean": a.accuracy.mean if a.accuracy.n
                                    else None, "std": a.accuracy.std if a.accuracy.n else None,
                                    "minus_dora": test(a.minus_dora), "minus_darts": test(a.minus_darts),
                                    "magnitude_shift": a.shifts, "median_wall_s": a.wall_s,
                                    "median_method_s": a.method_s, "only_shared_cells": a.only_shared,
                                    "shared_cells": a.shared, "cpu_per_wall": a.cpu_per_wall} for a in c.arms]}
                         for c in comparisons],
            "rule": rule, "failed": failed}
