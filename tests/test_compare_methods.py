"""utils/compare_methods.py on hand-made results.json files: statistics, BiDoRA's search-only row, missing seeds,
display units, bad input, the figure and the CLI."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from utils import compare_methods as cm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    runs = [cm.load_run(p) for p in cm.find_results(tmp_path)]
    comp = cm.compare(runs, extra_metrics=["f1"])
    rows = {r.label: r for r in comp.rows}
    assert [r.label for r in comp.rows] == ["lora", "dora"]  # paper order, not alphabetical
    assert rows["lora"].mean == pytest.approx(statistics.mean(lora))
    assert rows["lora"].std == pytest.approx(statistics.stdev(lora))
    assert rows["dora"].std == pytest.approx(statistics.stdev(dora))
    mean_f1, std_f1 = rows["lora"].extra_stats("f1")
    assert mean_f1 == pytest.approx(statistics.mean(v - 0.1 for v in lora))
    assert std_f1 == pytest.approx(statistics.stdev(v - 0.1 for v in lora))
    summary = cm.comparison_to_dict(comp)
    lora_json = next(r for r in summary["rows"] if r["label"] == "lora")
    assert lora_json["median_wall_time_s"] == statistics.median([10.0, 11.0, 12.0, 13.0])
    assert lora_json["median_peak_memory_bytes"] == statistics.median([2**20, 2 * 2**20, 3 * 2**20, 4 * 2**20])
    md = cm.render_markdown(comp)
    # Percent display with n: 100 * mean and 100 * std, two decimals.
    assert f"{100 * statistics.mean(lora):.2f} ± {100 * statistics.stdev(lora):.2f} (n=4)" in md
    assert comp.missing == {"dora": [2, 3]}
    # Asking for seeds 0 and 1 leaves the others out: lora over its first two seeds, nothing missing.
    comp01 = cm.compare(runs, seeds=[0, 1])
    assert comp01.rows[0].values == lora[:2] and comp01.missing == {}


def test_single_seed_has_no_std(tmp_path):
    write_run(tmp_path, "lora", 0, {"accuracy": 0.5})
    comp = cm.compare([cm.load_run(p) for p in cm.find_results(tmp_path)])
    assert comp.rows[0].std is None
    assert "50.00 (n=1)" in cm.render_markdown(comp)


def test_search_only_row_uses_heldout_best_step_not_test(tmp_path):
    # Held-out best at step 20 (0.8); the test-best search step is 30 (0.95) and must not be chosen.
    write_run(tmp_path, "bidora", 0, {"accuracy": 0.77, "f1": 0.385}, retrain=30,
              history=bidora_history([0.6, 0.8, 0.7], [0.5, 0.55, 0.95], 0.77),
              log_rows=[(10, "search", 5.0), (30, "search", 15.5), (60, "retrain", 30.0)])
    write_run(tmp_path, "bidora", 1, {"accuracy": 0.70, "f1": 0.35}, retrain=30,
              history=bidora_history([0.9, 0.9, 0.6], [0.61, 0.99, 0.2], 0.70))  # tie: the earliest step (10)
    comp = cm.compare([cm.load_run(p) for p in cm.find_results(tmp_path)], extra_metrics=["f1"])
    rows = {r.label: r for r in comp.rows}
    assert [r.label for r in comp.rows] == ["bidora", cm.SEARCH_ONLY]
    assert rows["bidora"].values == [0.77, 0.70]  # the reported (retrained) model
    search = rows[cm.SEARCH_ONLY]
    assert search.selected_steps == [20, 10]
    assert search.values == [0.55, 0.61]
    assert search.extra["f1"] == [0.275, 0.305]
    assert search.wall_times_s == [15.5]  # end of the search phase from log.csv (seed 1 has no log)
    md = cm.render_markdown(comp)
    assert cm.SEARCH_ONLY in md and "steps [20, 10]" in md


def test_search_only_nan_heldout_is_worst(tmp_path):
    write_run(tmp_path, "bidora", 0, {"accuracy": 0.7}, retrain=30,
              history=bidora_history([math.nan, 0.4, 0.3], [0.9, 0.1, 0.2], 0.7))
    comp = cm.compare([cm.load_run(p) for p in cm.find_results(tmp_path)])
    search = next(r for r in comp.rows if r.label == cm.SEARCH_ONLY)
    assert search.selected_steps == [20] and search.values == [0.1]


def test_bidora_without_retraining_has_no_search_row(tmp_path):
    write_run(tmp_path, "bidora", 0, {"accuracy": 0.7}, history=bidora_history([0.6, 0.8, 0.7], [0.5, 0.6, 0.7], 0.7))
    comp = cm.compare([cm.load_run(p) for p in cm.find_results(tmp_path)])
    # The helper's history has a retrain entry: the phase in history alone marks retraining.
    assert any(r.label == cm.SEARCH_ONLY for r in comp.rows)
    d = tmp_path / "plain"
    write_run(d, "bidora", 0, {"accuracy": 0.7},
              history=[{"step": 10, "phase": "search", "split": "heldout", "accuracy": 0.6}])
    comp = cm.compare([cm.load_run(p) for p in cm.find_results(d)])
    assert [r.label for r in comp.rows] == ["bidora"]


def test_missing_seeds_are_reported(tmp_path, capsys):
    for s in (0, 1, 2):
        write_run(tmp_path, "lora", s, {"accuracy": 0.8})
    for s in (0, 2):
        write_run(tmp_path, "dora", s, {"accuracy": 0.8})
    comp = cm.compare([cm.load_run(p) for p in cm.find_results(tmp_path)], methods=["lora", "dora", "bidora"])
    assert comp.expected_seeds == [0, 1, 2]
    assert comp.missing == {"dora": [1], "bidora": [0, 1, 2]}
    md = cm.render_markdown(comp)
    assert "dora: seeds [1]" in md and "bidora: seeds [0, 1, 2]" in md
    out_json = tmp_path / "summary.json"
    assert cm.main([str(tmp_path), "--methods", "lora,dora,bidora", "--seeds", "0,1,2,3", "--json",
                    str(out_json)]) == 0
    summary = json.loads(out_json.read_text())
    assert summary["missing"] == {"lora": [3], "dora": [1, 3], "bidora": [0, 1, 2, 3]}
    err = capsys.readouterr().err
    assert "dora: missing seeds [1, 3]" in err


def test_mse_is_shown_raw(tmp_path):
    for s, v in enumerate([0.31, 0.29, 0.35]):
        write_run(tmp_path, "lora", s, {"mse": v, "neg_mse": -v}, paper_metric="mse", select_metric="neg_mse")
    comp = cm.compare([cm.load_run(p) for p in cm.find_results(tmp_path)])
    assert comp.metric == "mse"  # from paper_metric
    md = cm.render_markdown(comp)
    assert f"{statistics.mean([0.31, 0.29, 0.35]):.4f} ± {statistics.stdev([0.31, 0.29, 0.35]):.4f}" in md
    assert "lower is better" in md


def test_bad_input_is_refused(tmp_path):
    write_run(tmp_path / "a", "lora", 0, {"accuracy": 0.8})
    write_run(tmp_path / "b", "lora", 0, {"accuracy": 0.7})
    with pytest.raises(ValueError, match="two results"):
        cm.compare([cm.load_run(p) for p in cm.find_results(tmp_path)])
    write_run(tmp_path / "c", "lora", 1, {"accuracy": 81.0})
    with pytest.raises(ValueError, match="not a fraction"):
        cm.compare([cm.load_run(p) for p in cm.find_results(tmp_path / "c")])
    with pytest.raises(ValueError, match="no split 'validation'"):
        cm.compare([cm.load_run(p) for p in cm.find_results(tmp_path / "a")], split="validation")
    write_run(tmp_path / "d", "lora", 0, {"accuracy": 0.8}, task="one")
    write_run(tmp_path / "d", "dora", 0, {"accuracy": 0.8}, task="two")
    with pytest.raises(ValueError, match="several tasks"):
        cm.compare([cm.load_run(p) for p in cm.find_results(tmp_path / "d")])
    assert cm.main([str(tmp_path / "nothing-here")]) == 1


def test_figure_written_and_nonempty(tmp_path):
    for s, v in enumerate([0.8, 0.85, 0.83]):
        write_run(tmp_path / "runs", "lora", s, {"accuracy": v})
        write_run(tmp_path / "runs", "bidora", s, {"accuracy": v + 0.01}, retrain=30,
                  history=bidora_history([0.6, 0.8, 0.7], [0.5, v, 0.7], v + 0.01))
    fig = tmp_path / "out" / "cmp.png"
    md = tmp_path / "out" / "cmp.md"
    assert cm.main([str(tmp_path / "runs"), "--figure", str(fig), "--markdown", str(md)]) == 0
    data = fig.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert md.read_text().startswith("### toy")
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temporary files


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cm.main(["--help"])
    assert exc.value.code == 0
    assert "--figure" in capsys.readouterr().out
