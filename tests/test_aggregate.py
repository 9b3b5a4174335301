"""Aggregation of hand-made results.json files: means, sample stds, missing runs, paper columns, Wilcoxon, figure."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from utils.aggregate_plot import plot_task_bars
from utils.aggregate_results import (
    collect,
    glue_average,
    load_run_scores,
    missing_runs,
    paper_average,
    render_markdown,
    summarise,
)
from utils.paper_results import load_paper_data
from utils.significance import format_wilcoxon_markdown, wilcoxon_test

REPO = Path(__file__).resolve().parent.parent
PAPER_MD = Path("/work/shared/reference/paper-results.md")
TASKS = ["cola", "stsb", "mnli", "sst2", "mrpc"]
METHODS = ["lora", "dora", "bidora"]
SEEDS = [1, 2, 3]
ABSENT = ("bidora", "sst2", 3)  # the one run we do not write
GLUE = ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"]


def fraction(method: str, task: str, seed: int) -> float:
    """A distinct, deterministic score in [0.5, 0.95] for every run."""
    rng = np.random.default_rng([METHODS.index(method) if method in METHODS else 9, TASKS.index(task), seed])
    return round(float(rng.uniform(0.5, 0.95)), 6)


def eval_block(task: str, value: float) -> dict:
    """The metrics a trainer would write, with decoys the aggregation must not pick."""
    if task == "cola":
        return {"validation": {"matthews_correlation": value, "accuracy": 0.99}}
    if task == "stsb":
        return {"validation": {"pearson": value, "spearmanr": 0.01}}
    if task == "mrpc":
        return {"validation": {"accuracy": value, "f1": 0.02}}
    if task == "mnli":
        return {"validation_matched": {"accuracy": value}, "validation_mismatched": {"accuracy": value - 0.01}}
    return {"validation": {"accuracy": value}}


def write_result(root: Path, model: str, method: str, rank, task: str, seed: int, evals: dict) -> Path:
    path = root / f"{model.replace('/', '_')}-{method}-r{rank}-{task}-s{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"task": task, "model": model, "method": method, "rank": rank, "seed": seed,
                                "selection": "heldout", "eval": evals}))
    return path


@pytest.fixture
def grid(tmp_path) -> Path:
    root = tmp_path / "runs"
    for method in METHODS:
        for task in TASKS:
            for seed in SEEDS:
                if (method, task, seed) != ABSENT:
                    write_result(root, "FacebookAI/roberta-base", method, 4, task, seed,
                                 eval_block(task, fraction(method, task, seed)))
    return root


def expected_percent(method: str, task: str) -> list[float]:
    return [100 * fraction(method, task, s) for s in SEEDS if (method, task, s) != ABSENT]


def test_means_stds_and_metric_choice(grid):
    summary = summarise(collect([grid]).scores)
    assert set(summary) == {("roberta-base", m, 4) for m in METHODS}
    for method in METHODS:
        for task in TASKS:
            cell = summary[("roberta-base", method, 4)][task]
            values = expected_percent(method, task)
            assert cell.n == len(values)
            assert cell.mean == pytest.approx(statistics.mean(values), rel=1e-12)
            assert cell.std == pytest.approx(statistics.stdev(values), rel=1e-12)  # sample std
        mm = summary[("roberta-base", method, 4)]["mnli-mm"]
        assert mm.mean == pytest.approx(statistics.mean(expected_percent(method, "mnli")) - 1.0, rel=1e-9)


def test_missing_runs_are_reported(grid):
    collection = collect([grid])
    missing = missing_runs(collection.scores)
    assert missing == [{"model": "roberta-base", "method": "bidora", "rank": 4, "task": "sst2", "seed": 3}]
    # An explicit grid with a seed nobody ran reports it for every method and task.
    more = missing_runs(collection.scores, tasks=["cola"], seeds=[1, 4])
    assert {(m["method"], m["task"], m["seed"]) for m in more} == {(m, "cola", 4) for m in METHODS}
    md = render_markdown(collection, missing)
    assert "- roberta-base / BiDoRA / r=4: sst2, seed 3" in md
    assert "(n=2)" in md  # the incomplete cell shows its n


def table_row(md: str, label: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_paper_columns_and_glue_average(grid):
    collection = collect([grid])
    md = render_markdown(collection, missing_runs(collection.scores))
    row = table_row(md, "DoRA")
    # Columns: method, r, then (ours, paper, Δ) for MNLI, MNLI-mm, SST-2, MRPC, CoLA, STS-B, then the GLUE average.
    assert row[:2] == ["DoRA", "4"]
    cola = expected_percent("dora", "cola")
    i = 2 + 3 * 4  # CoLA is the fifth task column in the paper's order
    assert row[i] == f"{statistics.mean(cola):.2f} ± {statistics.stdev(cola):.2f} (n=3)"
    assert row[i + 1] == "60.5"  # Table 1, RoBERTa-base DoRA, CoLA
    assert row[i + 2] == f"{statistics.mean(cola) - 60.5:+.2f}"
    # GLUE average over the 5 tasks present, against the paper's numbers for the same 5 tasks (typed from Table 1).
    ours = statistics.mean(statistics.mean(expected_percent("dora", t)) for t in TASKS)
    paper = statistics.mean([60.5, 90.2, 86.8, 94.2, 89.2])  # CoLA, STS-B, MNLI, SST-2, MRPC
    assert row[-3:] == [f"{ours:.2f} (5/8)", f"{paper:.2f}", f"{ours - paper:+.2f}"]
    assert "GLUE average over 5 of 8 tasks" in md
    assert "accuracy on validation_matched" in md and "matthews_correlation on validation (9)" in md


def test_paper_average_uses_published_value_when_complete():
    data = load_paper_data()
    row = data.lookup("roberta-base", "bidora", 4)
    assert paper_average(row, GLUE, data) == (85.2, "published")
    row8 = data.lookup("roberta-base", "bidora", 8)
    assert paper_average(row8, ["sst2", "mrpc", "cola", "qnli", "rte", "stsb"], data)[0] == 85.83
    assert paper_average(row8, ["mnli"], data) == (None, "")  # Table 2 has no MNLI


def test_glue_average_ignores_non_glue_columns(grid):
    cells = summarise(collect([grid]).scores)[("roberta-base", "lora", 4)]
    avg, used = glue_average(cells, load_paper_data())
    assert sorted(used) == sorted(TASKS)  # MNLI-mm is shown but not averaged
    assert avg == pytest.approx(statistics.mean(statistics.mean(expected_percent("lora", t)) for t in TASKS))


def test_paper_lookup_by_rank():
    data = load_paper_data()
    assert data.lookup("roberta-base", "dora", 4).table == "table1"
    assert data.lookup("roberta-base", "dora", 16).scores["rte"] == 81.9
    assert data.lookup("roberta-base", "dora", 2) is None
    assert data.lookup("roberta-large", "ft", None).scores["cola"] == 68.0
    assert data.lookup("deberta-v2-xxlarge", "bidora", 8).scores["cola"] == 72.3  # paper rank not stated


def test_paper_data_is_consistent():
    """Each published average equals the mean of its row's numbers up to the paper's rounding."""
    data = load_paper_data()
    for row in data.rows:
        if row.avg is None:
            continue
        decimals = len(str(row.avg).split(".")[1])
        assert abs(np.mean(list(row.scores.values())) - row.avg) <= 0.5 * 10**-decimals + 1e-9, row


@pytest.mark.skipif(not PAPER_MD.exists(), reason="shared reference not available")
def test_paper_data_matches_reference_markdown():
    data = load_paper_data()
    keys = {"MNLI": "mnli", "SST-2": "sst2", "MRPC": "mrpc", "CoLA": "cola", "QNLI": "qnli", "QQP": "qqp",
            "RTE": "rte", "STS-B": "stsb"}
    models = {"RoBERTa-base": "roberta-base", "RoBERTa-large": "roberta-large",
              "DeBERTa-v2-xxlarge": "deberta-v2-xxlarge"}
    checked = 0
    header = None
    lines = PAPER_MD.read_text().splitlines() + [""]
    for line, following in zip(lines, lines[1:]):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or set(line) <= set("|-"):
            continue
        if set(following) <= set("|-") and following:  # a header line sits above the |---| line
            header = cells
            continue
        if header is None or header[0] not in ("model", "method"):  # Table 4 (task, metric, ...) is not parsed
            continue
        if header[0] == "model":
            model, method, rank = models[cells[0]], cells[1].lower(), None
        else:
            m = re.fullmatch(r"(\w+)(?: r=(\d+))?", cells[0])
            model, method, rank = "roberta-base", m.group(1).lower(), int(m.group(2) or 8)
        if method in ("ft", "adapter"):
            rank = None
        elif header[0] == "model" and model != "deberta-v2-xxlarge":
            rank = 4
        row = data.lookup(model, method, rank)
        for name, value in zip(header, cells):
            if name in keys:
                assert row.scores[keys[name]] == float(value), (model, method, name)
            if name == "avg":
                assert row.avg == float(value)
        checked += 1
    assert checked == 17  # Table 1 (12 rows) and Table 2 (5 rows)


@pytest.mark.skipif(not PAPER_MD.exists(), reason="shared reference not available")
def test_table4_matches_reference_markdown():
    data = load_paper_data()
    tasks = {"thermostability": "thermostability", "blood-brain": "bbp", "antimicrobial": "mic"}
    checked = 0
    for line in PAPER_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = next((v for k, v in tasks.items() if cells[0].startswith(k)), None)
        if key is None:
            continue
        for method, text in zip(["ft", "lora", "dora", "bidora"], cells[2:6]):
            row = data.lookup("esm2-650m", method, None)
            numbers = [float(x) for x in text.split("/")]
            assert row.scores[key] == numbers[0], (key, method)
            if len(numbers) == 4:
                other = row.extra[key]
                assert [other["precision"], other["recall"], other["f1"]] == numbers[1:], (key, method)
            checked += 1
    assert checked == 12


def test_bad_files_fail_or_are_listed(tmp_path):
    root = tmp_path / "r"
    p = write_result(root, "roberta-base", "dora", 4, "rte", 1, {"validation": {"accuracy": 73.2}})
    with pytest.raises(ValueError, match="not a fraction"):
        load_run_scores(p)
    p2 = write_result(root, "roberta-base", "dora", 4, "cola", 1, {"validation": {"accuracy": 0.8}})
    with pytest.raises(ValueError, match="matthews_correlation"):
        load_run_scores(p2)
    p3 = write_result(root, "roberta-base", "dora", 4, "rte", 2, {"dev": {"accuracy": 0.7}, "test": {"accuracy": 0.7}})
    with pytest.raises(ValueError, match="none of the splits"):
        load_run_scores(p3)

    ok = tmp_path / "ok"
    write_result(ok, "roberta-base", "dora", 4, "rte", 1, {"validation": {"accuracy": 0.7}})
    write_result(ok, "roberta-base", "dora", 4, "imdb", 1, {"test": {"accuracy": 0.9}})
    collection = collect([ok])
    assert len(collection.scores) == 1 and len(collection.skipped) == 1 and "imdb" in collection.skipped[0]
    assert "## Files not used" in render_markdown(collection, [])

    dup = tmp_path / "dup"
    write_result(dup, "roberta-base", "dora", 4, "rte", 1, {"validation": {"accuracy": 0.7}})
    write_result(dup, "FacebookAI/roberta-base", "DoRA", 4, "RTE", 1, {"validation": {"accuracy": 0.71}})
    with pytest.raises(ValueError, match="two results"):
        collect([dup])


def test_full_finetuning_rank_is_ignored(tmp_path):
    p = write_result(tmp_path, "roberta-base", "ft", 8, "rte", 1, {"validation": {"accuracy": 0.8}})
    (score,) = load_run_scores(p)
    assert score.rank is None and score.value == pytest.approx(80.0)


def exact_signed_rank_p(diffs: list[float]) -> tuple[float, float]:
    """Exact (two-sided, greater) p of the signed-rank statistic W+ by counting subsets of ranks (no ties)."""
    order = sorted(range(len(diffs)), key=lambda i: abs(diffs[i]))
    ranks = {i: r + 1 for r, i in enumerate(order)}
    w_plus = sum(ranks[i] for i, d in enumerate(diffs) if d > 0)
    n = len(diffs)
    counts = [1] + [0] * (n * (n + 1) // 2)  # counts[s] = number of rank subsets summing to s
    for r in range(1, n + 1):
        for s in range(len(counts) - 1, r - 1, -1):
            counts[s] += counts[s - r]
    total = 2**n
    greater = sum(counts[w_plus:]) / total
    less = sum(counts[: w_plus + 1]) / total
    return min(1.0, 2 * min(greater, less)), greater


def test_wilcoxon_pairs_by_seed(grid):
    scores = collect([grid]).scores
    report = wilcoxon_test(scores, tasks=GLUE)
    assert report.pair_by == "seed"
    pairs = {(p["task"], p["seed"]) for p in report.pairs}
    assert pairs == {(t, s) for t in TASKS for s in SEEDS} - {("sst2", 3)}  # mnli-mm is not a separate pair
    assert report.n == 14 and report.unpaired == ["roberta-base r=4 sst2 seed 3: only dora"]
    diffs = [100 * (fraction("bidora", t, s) - fraction("dora", t, s)) for t, s in sorted(pairs)]
    two, greater = exact_signed_rank_p(diffs)
    assert report.p_two_sided == pytest.approx(two, rel=1e-9)
    assert report.p_greater == pytest.approx(greater, rel=1e-9)
    md = format_wilcoxon_markdown(report, load_paper_data().method_names, 2.4e-4)
    assert "one per (model, r, task, seed)" in md and "n = 14 pairs" in md


def test_wilcoxon_small_n_and_fallbacks(tmp_path):
    root = tmp_path / "r"
    for i, task in enumerate(["rte", "mrpc", "cola"]):
        write_result(root, "roberta-base", "dora", 4, task, 1, eval_block(task, 0.6 + 0.01 * i))
        write_result(root, "roberta-base", "bidora", 4, task, 1, eval_block(task, 0.65 + 0.02 * i))
    report = wilcoxon_test(collect([root]).scores, tasks=GLUE)
    assert report.n == 3 and report.p_two_sided == pytest.approx(0.25)  # 2 / 2^3: all three positive
    assert any("2/2^3" in m for m in report.messages)

    # Seeds that never coincide: pairs fall back to per-task means.
    other = tmp_path / "o"
    for seed in (1, 2):
        write_result(other, "roberta-base", "dora", 4, "rte", seed, eval_block("rte", 0.6 + 0.1 * seed))
    for seed in (3, 4):
        write_result(other, "roberta-base", "bidora", 4, "rte", seed, eval_block("rte", 0.65 + 0.1 * (seed - 2)))
    report = wilcoxon_test(collect([other]).scores, tasks=GLUE)
    assert report.pair_by == "task-mean" and report.n == 1
    assert report.pairs[0]["diff"] == pytest.approx(100 * ((0.75 + 0.85) / 2 - (0.7 + 0.8) / 2))
    assert wilcoxon_test(collect([other]).scores, tasks=GLUE, pair_by="seed").messages[0].startswith("no pairs")


def test_bar_chart_is_written(grid, tmp_path):
    out = plot_task_bars(summarise(collect([grid]).scores), tmp_path / "assets" / "glue.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_from_another_directory(grid, tmp_path):
    script = REPO / "utils" / "aggregate_results.py"
    help_ = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert help_.returncode == 0 and "--markdown" in help_.stdout
    proc = subprocess.run([sys.executable, str(script), str(grid), "--markdown", "out/report.md", "--figure",
                           "assets/glue.png"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## roberta-base" in md and "## Wilcoxon signed-rank test: BiDoRA vs DoRA" in md
    assert "Paper: p = 0.00024" in md
    assert (tmp_path / "assets" / "glue.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "nowhere")], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no such file" in bad.stderr
