"""Loading what runs write (docs/CONTRACTS.md): ``results.json`` as :class:`Run`, the phase ends of ``log.csv``,
BiDoRA's search-only value from ``history``, and the study's per-cell records (``cell.json``) as :class:`Point`.

Values in results.json are fractions; accuracy-like metrics are checked to be at most 1 (MSE-like ones are raw).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from utils.paper_results import normalise_method

RESULTS_NAME = "results.json"
# What each metric name our runners write means. Every metric not named here is a fraction in [-1, 1], shown in
# percent. Unbounded metrics are shown raw: MSE-like, run_clm's loss and perplexity, e2e_metrics' NIST. BLEU and
# ROUGE-L are written on sacrebleu's 0-100 scale (e2e_metrics.py), shown as they are.
RAW_METRICS = frozenset({"mse", "neg_mse", "rmse", "mae", "loss", "perplexity", "nist"})
POINT_METRICS = frozenset({"bleu", "rougeL", "rougeL_f1_max"})
LOWER_IS_BETTER = frozenset({"mse", "rmse", "mae", "loss", "perplexity"})
SHARED_FRACTION = 0.8  # CPU seconds per wall second below this fraction of the host's best: shared with other work
SEARCH = "search"  # suffix of the search-only row of a BiDoRA arm: "<arm>:search"


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


def load_runs(inputs: str | Path | Iterable[str | Path]) -> list[Run]:
    """Every results.json under ``inputs`` (:func:`find_results`), loaded."""
    return [load_run(p) for p in find_results(inputs)]


def metric_value(run: Run, split: str, metric: str) -> float:
    """``eval[split][metric]`` of a run, checked (ValueError naming the file when absent or not a fraction)."""
    if split not in run.eval:
        raise ValueError(f"{run.path}: no split {split!r} in eval (has {sorted(run.eval)}); choose --split")
    if metric not in run.eval[split]:
        raise ValueError(f"{run.path}: eval[{split!r}] has no {metric!r} (has {sorted(run.eval[split])})")
    return check_fraction(run.path, metric, float(run.eval[split][metric]))


def check_fraction(path: str, metric: str, value: float) -> float:
    """``value``, or ValueError when a fraction metric is above 1 in absolute value (percent written by mistake) or
    a 0-100 metric (:data:`POINT_METRICS`) is outside [0, 100]. :data:`RAW_METRICS` are not checked."""
    if metric in POINT_METRICS:
        if math.isfinite(value) and not 0.0 <= value <= 100.0:
            raise ValueError(f"{path}: {metric} = {value} is outside 0-100")
    elif metric not in RAW_METRICS and math.isfinite(value) and abs(value) > 1.0:
        raise ValueError(f"{path}: {metric} = {value} is not a fraction (percent written by mistake?)")
    return value


def phase_ends(run_dir: str | Path) -> dict[str, float]:
    """Elapsed seconds at the last log.csv row of each phase (``{}`` without a readable log)."""
    ends: dict[str, float] = {}
    try:
        with open(Path(run_dir) / "log.csv", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if row.get("phase") and row.get("elapsed_s"):
                    ends[row["phase"]] = float(row["elapsed_s"])
    except (OSError, ValueError, csv.Error):
        return {}
    return ends


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
    return int(best_step), {m: check_fraction(run.path, m, float(at[0][m])) for m in metrics}


def test_eval_seconds(history: list[dict]) -> float | None:
    """Seconds spent evaluating the test split (None when the history predates the ``runtime`` field)."""
    rows = [h for h in history if h.get("split") == "test"]
    if not rows or any("runtime" not in h for h in rows):
        return None
    return float(sum(h["runtime"] for h in rows))


# ---- study cells: <device>/<dataset>-n<N>/<arm>/seed<k>/{cell.json,results.json,log.csv} -----------------------


@dataclass
class Point:
    """One value of one row of a study: (device, dataset, N, row, seed) with its cell's cost."""

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
    """Every recorded cell of a study: the points of the finished ones, the failed ones, the count of records."""

    points: list[Point] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    files: int = 0


def load_study(results: str | Path, metric: str = "accuracy") -> StudyResults:
    """Every recorded cell under ``results`` (``<device>/.../cell.json``), as points per reported row (percent of
    ``metric`` on test): the arm's reported model, and for BiDoRA cells also the search phase alone
    (``<arm>:search``). Cells that shared the machine are marked (:func:`mark_shared`).

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
        run = load_run(path.parent / RESULTS_NAME)
        cost = dict(wall_s=cell.get("wall_s"), cpu_s=cell.get("cpu_s"), peak_rss_bytes=cell.get("peak_rss_bytes"),
                    test_eval_s=test_eval_seconds(run.history))
        out.points.append(Point(row=cell["arm"], value=100 * metric_value(run, "test", metric), **key, **cost))
        if cell.get("method") == "bidora":
            _, values = search_only_value(run, "test", [metric])
            search_cost = dict(cost, wall_s=_search_wall(cell, path.parent) if cost["wall_s"] else None, cpu_s=None,
                               test_eval_s=test_eval_seconds([h for h in run.history if h.get("phase") == "search"]))
            out.points.append(Point(row=f"{cell['arm']}:{SEARCH}", value=100 * values[metric], **key, **search_cost))
    mark_shared(out.points)
    return out


def _search_wall(cell: dict, run_dir: Path) -> float | None:
    """Process wall time minus the retraining phase (log.csv elapsed at the end minus at the end of the search)."""
    ends = phase_ends(run_dir)
    if "search" not in ends or cell.get("wall_s") is None:
        return None
    return cell["wall_s"] - (max(ends.values()) - ends["search"])


def mark_shared(points: list[Point]) -> None:
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
