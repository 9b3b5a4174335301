"""The small-data study: its plan (examples/study/plan.py), its report (utils/study_report.py) on hand-made cell
records with explicit expected values, Holm's adjustment, and the runner end to end on the smoke study (the real
MiniLM on a sliver of the real data: every arm, resume by skipping, a failed cell recorded and retried)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

from utils import study_report
from utils.stats import holm_adjust

ROOT = Path(__file__).resolve().parents[1]
import plan  # noqa: E402


def _flag_dict(flags: list[str]) -> dict[str, str]:
    out = {}
    for i, f in enumerate(flags):
        if f.startswith("--"):
            out[f] = flags[i + 1]  # later flags win, as in argparse
    return out


# ---------------------------------------------------------------------------------------------------------- plan


def test_schedule_is_epochs_times_n_over_batch_for_every_arm():
    study = plan.build_study("full")
    by_unit = {}
    for c in study.cells:
        assert c.steps == math.ceil(c.dataset.epochs[c.size] * c.size / c.dataset.batch)
        flags = _flag_dict(c.flags())
        assert int(flags["--max_steps"]) == c.steps
        assert int(flags["--retrain_max_steps"]) == (c.steps if c.arm.method == "bidora" else 0)
        by_unit.setdefault((c.dataset.name, c.size), set()).add(flags["--max_steps"])
    assert all(len(s) == 1 for s in by_unit.values())  # the same number of lower steps for every arm
    assert plan.RT.epochs[200] == 10 and plan.ACP.epochs[200] == 10


def test_early_stopping_control_uses_bidoras_split_and_selection():
    cells = {c.id: c for c in plan.build_study("full").cells}
    es, bi = _flag_dict(cells["rt-n200/dora_es/seed3"].flags()), _flag_dict(cells["rt-n200/bidora/seed3"].flags())
    # same seed and fraction -> the same split_indices(n, 0.2, seed); evaluated at the same steps
    for key in ("--seed", "--upper_fraction", "--eval_steps", "--eval_strategy", "--max_steps"):
        assert es[key] == bi[key], key
    assert es["--method"] == "dora" and es["--retrain_max_steps"] == "0"
    lora = _flag_dict(cells["rt-n200/lora/seed3"].flags())
    assert lora["--upper_fraction"] == "0" and lora["--eval_strategy"] == "no"


def test_sensitivity_arms_change_exactly_one_setting():
    cells = [c for c in plan.build_study("full").cells if c.group == "sensitivity" and c.seed == 0]
    base = _flag_dict(next(c for c in plan.build_study("full").cells if c.id == "rt-n200/bidora/seed0").flags())
    assert {(c.arm.factor, c.arm.level) for c in cells} == {
        ("upper_fraction", "0.3"), ("upper_fraction", "0.5"), ("upper_lr", "x0.1"), ("upper_lr", "x10"),
        ("hypergradient", "first_order"), ("hypergradient", "neumann"), ("unroll_steps", "5"), ("orth_reg", "0"),
        ("orth_reg", "1e-03")}
    lr = float(plan.RT.settings()["learning_rate"])
    for c in cells:
        flags = _flag_dict(c.flags())
        changed = {k for k in set(flags) | set(base) if flags.get(k) != base.get(k)}
        if c.arm.factor == "hypergradient" and c.arm.level == "neumann":
            assert changed == {"--hypergradient", "--neumann_alpha", "--neumann_iterations"}
        else:
            assert len(changed) == 1, (c.id, changed)
        if c.arm.factor == "upper_lr":
            assert float(flags["--upper_learning_rate"]) == pytest.approx(lr * (0.1 if c.arm.level == "x0.1" else 10))
        assert c.size == 200 and c.dataset is plan.RT


def test_study_order_and_variants():
    full = plan.build_study("full")
    assert [c.id for c in full.cells[:5]] == ["rt-n200/lora/seed0", "rt-n200/dora/seed0", "rt-n200/dora_es/seed0",
                                               "rt-n200/bidora/seed0", "rt-n200/lora/seed1"]
    assert len(full.cells) == 5 * (4 * 6 + 9 + 1)
    blocks = list(dict.fromkeys((c.dataset.name, c.size, c.group) for c in full.cells))
    assert blocks == [("rt", 200, "curve"), ("acp", 200, "curve"), ("acp", 619, "curve"), ("rt", 500, "curve"),
                      ("rt", 200, "sensitivity"), ("rt", 1000, "curve"), ("acp", 200, "confirmation"),
                      ("rt", 2000, "curve")]
    confirmation = [c for c in full.cells if c.group == "confirmation"]
    assert {c.arm.name for c in confirmation} == {"bidora-upper_lr=x10"} and {c.seed for c in confirmation} == {
        c.seed for c in full.cells if c.id.startswith("acp-n200/bidora/")}
    sensitivity_seed1 = [c.arm.factor for c in full.cells if c.group == "sensitivity" and c.seed == 1]
    assert sensitivity_seed1[0] == "upper_lr" and sensitivity_seed1[-2:] == ["orth_reg", "orth_reg"]
    quick = plan.build_study("quick")
    assert {c.seed for c in quick.cells} == {0, 1} and len({(c.dataset.name, c.size) for c in quick.cells}) == 1
    with pytest.raises(ValueError, match="unknown study"):
        plan.build_study("nope")
    tiny = plan.Dataset("t", "t", plan.RT.config, {40: 1}, test_size=10, batch=16)
    with pytest.raises(ValueError, match="less than one batch"):
        plan.Study("x", [plan.Cell(tiny, 40, plan.BIDORA, 0)])  # 8 held-out examples < a batch of 16


# ------------------------------------------------------------------------------------------------------- Holm


def test_holm_adjust_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.005, None, 0.5]
    # sorted: .005*5=.025, .01*4=.04, .03*3=.09, .04*2=.08 -> .09 (monotone), .5*1=.5
    adj = holm_adjust(p)
    assert adj[4] is None
    assert [adj[i] for i in (0, 1, 2, 3, 5)] == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.5])
    rng = np.random.default_rng(0)
    for _ in range(20):
        ps = rng.uniform(0, 0.2, 7).tolist()
        a = holm_adjust(ps)
        assert all(pi <= ai <= min(1.0, 7 * pi) + 1e-15 for pi, ai in zip(ps, a))


# ------------------------------------------------------------------------------------------- report on records


def _write_cell(root: Path, *, dataset="rt", size=200, arm="dora", seed=0, value=0.7, method=None, group="curve",
                factor=None, level=None, device="cpu", search_value=None, wall=100.0, cpu=200.0, status="done",
                resumed=False):
    method = method or ("bidora" if arm.startswith("bidora") else "dora" if arm.startswith("dora") else arm)
    d = root / device / f"{dataset}-n{size}" / arm / f"seed{seed}"
    d.mkdir(parents=True)
    cell = {"cell": f"{dataset}-n{size}/{arm}/seed{seed}", "dataset": dataset, "size": size, "arm": arm,
            "method": method, "factor": factor, "level": level, "group": group, "seed": seed, "status": status,
            "wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": 10**9, "resumed": resumed, "device": device,
            "host": "h", "default_level": {"orth_reg": "1e-05", "unroll_steps": "1"}.get(factor)}
    if status != "done":
        cell["error"] = "error: diverged"
    (d / "cell.json").write_text(json.dumps(cell))
    history = [{"step": 40, "phase": "search", "split": "test", "accuracy": value, "runtime": 7.0}]
    if method == "bidora":
        # two search evaluations: held-out best at step 20, where test = search_value; 3 test evaluations of 5 s
        history = [{"step": 10, "phase": "search", "split": "heldout", "accuracy": 0.5, "runtime": 1.0},
                   {"step": 10, "phase": "search", "split": "test", "accuracy": 0.1, "runtime": 5.0},
                   {"step": 20, "phase": "search", "split": "heldout", "accuracy": 0.6, "runtime": 1.0},
                   {"step": 20, "phase": "search", "split": "test", "accuracy": search_value, "runtime": 5.0},
                   {"step": 40, "phase": "retrain", "split": "test", "accuracy": value, "runtime": 5.0}]
        (d / "log.csv").write_text("step,phase,elapsed_s\n20,search,30.0\n40,retrain,70.0\n")
    (d / "results.json").write_text(json.dumps({"method": method, "seed": seed, "eval": {"test": {"accuracy": value}},
                                                "select_metric": "accuracy", "history": history,
                                                "config": {"retrain_max_steps": 20 if method == "bidora" else 0}}))


def test_report_tables_match_explicit_statistics(tmp_path):
    rng = np.random.default_rng(1)
    truth = {}
    for size in (200, 500):
        for seed in range(5):
            for arm in ("lora", "dora", "dora_es", "bidora"):
                v = float(rng.uniform(0.6, 0.8))
                sv = float(rng.uniform(0.6, 0.8))
                truth[(size, arm, seed)] = v
                truth[(size, "bidora:search", seed)] = sv
                _write_cell(tmp_path, size=size, arm=arm, seed=seed, value=v, search_value=sv,
                            cpu=185.0 if seed else 120.0, wall=100.0 if seed else 150.0)  # seed 0 shared the machine
    text, summary, study, _ = study_report.build_report(tmp_path)
    rows = summary["curves"]["cpu/rt"]["rows"]
    for size in (200, 500):
        for row in ("lora", "dora", "dora_es", "bidora", "bidora:search"):
            vals = [100 * truth[(size, row, s)] for s in range(5)]
            got = rows[row][str(size)]
            assert got["mean"] == pytest.approx(np.mean(vals)) and got["std"] == pytest.approx(np.std(vals, ddof=1))
    # the headline pools seeds x sizes: 10 pairs, Wilcoxon on exactly those differences
    diffs = [100 * (truth[(n, "bidora", s)] - truth[(n, "dora", s)]) for n in (200, 500) for s in range(5)]
    pooled = summary["pooled"]["bidora - dora | cpu | rt"]
    assert pooled["n"] == 10 and pooled["mean"] == pytest.approx(np.mean(diffs))
    assert pooled["p_two_sided"] == pytest.approx(wilcoxon(diffs).pvalue)
    lo, hi = pooled["ci"]
    assert lo < np.mean(diffs) < hi
    # cost: seed 0 (CPU/wall 0.8 < 0.8 x 1.85) is left out of the medians; method time = wall - test evaluations;
    # the search-only row's wall is wall - retraining (log.csv), its test evaluations the search phase's
    cost = {(r["size"], r["row"]): r for r in summary["cost"]["rows"]}
    assert cost[(200, "dora")]["excluded"] == 1 and cost[(200, "dora")]["median_wall_s"] == 100.0
    assert cost[(200, "dora")]["median_method_s"] == 93.0 and cost[(200, "lora")]["method_time_vs_dora"] == 1.0
    assert cost[(200, "bidora")]["median_method_s"] == 85.0
    assert cost[(200, "bidora")]["method_time_vs_dora"] == pytest.approx(85.0 / 93.0)
    assert cost[(200, "bidora:search")]["median_wall_s"] == pytest.approx(100.0 - (70.0 - 30.0))
    assert cost[(200, "bidora:search")]["median_method_s"] == pytest.approx(60.0 - 10.0)
    assert not any(r["only_excluded_cells"] for r in summary["cost"]["rows"])
    assert "Sensitivity" in text and not summary["open"] and not summary["failed"]


def test_report_sensitivity_holm_failed_open_and_devices_kept_apart(tmp_path):
    base = [0.70, 0.71, 0.72, 0.73, 0.74]
    for s, v in enumerate(base):
        _write_cell(tmp_path, arm="bidora", seed=s, value=v, search_value=v - 0.02)
        _write_cell(tmp_path, arm="dora", seed=s, value=v)
    shifts = {"bidora-orth_reg=0": 0.01, "bidora-unroll_steps=5": -0.03}
    for arm, shift in shifts.items():
        factor, level = arm.removeprefix("bidora-").split("=")
        for s, v in enumerate(base):
            _write_cell(tmp_path, arm=arm, seed=s, value=v + shift + 0.001 * s, search_value=v, group="sensitivity",
                        factor=factor, level=level)
    _write_cell(tmp_path, arm="bidora-upper_lr=x10", seed=0, status="failed", group="sensitivity",
                factor="upper_lr", level="x10")
    _write_cell(tmp_path, arm="lora", seed=0, value=0.5)  # one seed of five: open
    _write_cell(tmp_path, arm="dora", seed=0, value=0.99, device="cuda")  # never paired with a CPU seed
    _write_cell(tmp_path, arm="bidora", seed=0, value=0.10, search_value=0.1, device="cuda")
    _, summary, _, rows = study_report.build_report(tmp_path)
    sens = {(r["factor"], r["level"]): r for r in summary["sensitivity"]["rows"]}
    assert set(sens) == {("retrain", "off"), ("orth_reg", "0"), ("unroll_steps", "5")}
    assert sens[("retrain", "off")]["diff"] == pytest.approx(-2.0)
    expected = {k: 100 * np.mean([shifts[f"bidora-{k[0]}={k[1]}"] + 0.001 * s for s in range(5)])
                for k in (("orth_reg", "0"), ("unroll_steps", "5"))}
    for k, d in expected.items():
        assert sens[k]["diff"] == pytest.approx(d)
    ps = [r["p_two_sided"] for r in summary["sensitivity"]["rows"]]
    assert [r["p_holm"] for r in summary["sensitivity"]["rows"]] == pytest.approx(holm_adjust(ps))
    assert summary["failed"] == [{"cell": "rt-n200/bidora-upper_lr=x10/seed0", "device": "cpu",
                                  "error": "error: diverged"}]
    assert any(o.startswith("cpu/rt-n200/lora: seeds [0] of 5") for o in summary["open"])
    cpu = summary["pooled"]["bidora - dora | cpu | rt"]
    assert cpu["n"] == 5 and cpu["mean"] == pytest.approx(0.0)
    assert summary["pooled"]["bidora - dora | cuda | rt"]["n"] == 1
    study_report.plot_sensitivity(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_confirmation_is_one_sided_against_the_default_and_reported_against_dora(tmp_path):
    base, dora = [0.80, 0.82, 0.85, 0.81, 0.84], [0.81, 0.80, 0.86, 0.83, 0.84]
    arm = [0.83, 0.83, 0.84, 0.85, 0.88]  # above the default on 4 of 5 seeds
    for s in range(5):
        _write_cell(tmp_path, dataset="acp", arm="bidora", seed=s, value=base[s], search_value=base[s] - 0.01)
        _write_cell(tmp_path, dataset="acp", arm="dora", seed=s, value=dora[s])
        _write_cell(tmp_path, dataset="acp", arm="bidora-upper_lr=x10", seed=s, value=arm[s], search_value=base[s],
                    group="confirmation", factor="upper_lr", level="x10")
    text, summary, _, sens_rows = study_report.build_report(tmp_path)
    (row,) = summary["confirmation"]["rows"]
    diffs = [100 * (a - b) for a, b in zip(arm, base)]
    assert row["diff"] == pytest.approx(np.mean(diffs)) and (row["seeds_above"], row["pairs"]) == (4, 5)
    assert row["p_greater"] == pytest.approx(wilcoxon(diffs, alternative="greater").pvalue)
    assert row["minus_dora"] == pytest.approx(100 * np.mean(np.subtract(arm, dora)))
    assert row["search_minus_default_search"] == pytest.approx(1.0)
    assert sens_rows == [] and "4 of 5" in text  # not a sensitivity arm: no Holm family, no forest plot


def test_sensitivity_without_its_default_is_named_not_dropped(tmp_path):
    _write_cell(tmp_path, arm="bidora-orth_reg=0", seed=0, value=0.7, search_value=0.7, group="sensitivity",
                factor="orth_reg", level="0")
    text, summary, _, _ = study_report.build_report(tmp_path)
    assert "no default BiDoRA cell to compare with yet" in text and summary["sensitivity"]["rows"] == []


def test_report_errors_are_sentences(tmp_path, capsys):
    assert study_report.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no cell.json" in capsys.readouterr().err
    bad = tmp_path / "cpu" / "x"
    bad.mkdir(parents=True)
    (bad / "cell.json").write_text("{not json")
    assert study_report.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "not a study cell record" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ end to end


def _run_study(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "examples/study/run_study.py"), "--smoke", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_smoke_study_runs_resumes_records_failures_and_reports(tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    common = ["--results", str(results), "--work", str(work)]
    proc = _run_study(*common, "--", "--no_token_cache")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = sorted(p.parent.relative_to(results / "cpu").as_posix() for p in results.rglob("cell.json"))
    assert cells == [c.id for c in sorted(plan.build_study("smoke").cells, key=lambda c: c.id)]
    for c in plan.build_study("smoke").cells:
        d = results / "cpu" / c.id
        record, res = json.loads((d / "cell.json").read_text()), json.loads((d / "results.json").read_text())
        assert record["status"] == "done" and record["wall_s"] > 0 and record["peak_rss_bytes"] > 10**8
        assert res["config"]["max_steps"] == c.steps and res["seed"] == c.seed and res["method"] == c.arm.method
        assert {p.name for p in d.iterdir()} == {"cell.json", "results.json", "log.csv"}  # small files only
    es = json.loads((results / "cpu/smoke-n48/dora_es/seed0/results.json").read_text())
    assert es["selection"] == "heldout" and es["data_sizes"]["heldout"] == round(48 * 0.2)
    # the same command again: nothing to run
    again = _run_study(*common)
    assert again.returncode == 0 and "0 to run" in again.stdout
    # a cell that fails with run_glue's error exit is recorded as failed, and the study says so
    failed = _run_study("--results", str(tmp_path / "r2"), "--work", str(work), "--only", "smoke-n48/lora/*", "--",
                        "--max_length", "100000")
    assert failed.returncode == 1 and "FAILED" in failed.stdout
    record = json.loads((tmp_path / "r2/cpu/smoke-n48/lora/seed0/cell.json").read_text())
    assert record["status"] == "failed" and "max_length" in record["error"]
    listed = _run_study("--results", str(tmp_path / "r2"), "--list")
    assert "failed  smoke-n48/lora/seed0" in listed.stdout
    # a record made with other plan flags is stale (it would run again from scratch)
    path = results / "cpu/smoke-n48/dora/seed0/cell.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record | {"plan_flags": record["plan_flags"] + ["--orth_reg", "0.5"]}))
    assert "stale   smoke-n48/dora/seed0" in _run_study(*common, "--list").stdout
    path.write_text(json.dumps(record))
    # and the report reads the real records
    assert study_report.main([str(results), "--out", str(tmp_path / "report")]) == 0
    for name in ("study.md", "study.json", "learning_curve.png", "sensitivity.png"):
        assert (tmp_path / "report" / name).stat().st_size > 100


# ------------------------------------------------------------------------------------------- magnitude shift


def test_relative_magnitude_shift_matches_its_definition():
    import magnitude_shift
    import torch
    from transformers import BertConfig, BertModel

    import loralib

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32)
    model = BertModel(config)
    loralib.apply_adapters(model, loralib.AdapterConfig(method="dora", r=2, lora_alpha=4,
                                                        target_modules=["query", "value"]))
    assert magnitude_shift.relative_magnitude_shift(model) == pytest.approx(0.0, abs=1e-6)  # m0 = ‖W0‖_row, float32
    layers = [layer for _, layer in loralib.adapter_layers(model)]
    with torch.no_grad():
        layers[0].magnitude.mul_(1.3)  # one layer of four moves by 30%
    m0 = [layer.base_weight().double().norm(dim=1) for layer in layers]
    expected = 0.3 * m0[0].norm().item() / math.sqrt(sum(v.square().sum().item() for v in m0))
    assert magnitude_shift.relative_magnitude_shift(model) == pytest.approx(expected, rel=1e-6)
    lora = BertModel(config)
    loralib.apply_adapters(lora, loralib.AdapterConfig(method="lora", r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="no DoRA / BiDoRA layer"):
        magnitude_shift.relative_magnitude_shift(lora)
