"""A 20-step smoke run of the demo command (the README's first command) on a tiny slice of the real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_command_smoke(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SEEDS": "0",
        "TRAIN_SIZE": "80",
        "TEST_SIZE": "40",
        "ITERATIONS": "10",  # 10 search + 10 retraining steps for BiDoRA, 10 for the baselines
        "OUTPUT_ROOT": str(tmp_path / "runs"),
        "FIGURE": str(tmp_path / "demo.png"),
    }
    cmd = [
        "bash",
        str(ROOT / "examples" / "demo" / "run_demo.sh"),
        "--eval_steps",
        "5",
        "--per_device_train_batch_size",
        "8",
        "--disable_tqdm",
        "true",
        "--no_token_cache",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "runs" / "rotten_tomatoes"
    for method in ("lora", "dora", "bidora"):
        results = json.loads((out / method / "seed0" / "results.json").read_text())
        assert results["method"] == method and results["model"].endswith("model") and results["pooling"] == "mean"
        assert 0.0 <= results["eval"]["test"]["accuracy"] <= 1.0
        assert results["data_sizes"]["train"] == 80
    bidora = json.loads((out / "bidora" / "seed0" / "results.json").read_text())
    assert {h["phase"] for h in bidora["history"]} == {"search", "retrain"}
    assert any(h["split"] == "heldout" for h in bidora["history"])  # the search phase's upper split
    assert bidora["selection"] == "final" and bidora["config"]["max_grad_norm"] == 0.0
    assert (tmp_path / "demo.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    for method in ("lora", "dora", "bidora"):
        assert method in summary
