"""End-to-end runs of examples/NLU/run_glue.py on a tiny RoBERTa and tiny GLUE-format files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import loralib
from tests.glue_fixtures import write_task_files, write_tiny_roberta

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "NLU"))
import run_glue  # noqa: E402

FAST = [
    "--iterations",
    "6",
    "--batch_size",
    "8",
    "--eval_batch_size",
    "16",
    "--eval_every",
    "3",
    "--lr",
    "1e-3",
    "--no_token_cache",
    "--no_progress",
    "--snapshots",
    "2",
    "--checkpoint_every",
    "3",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    model = write_tiny_roberta(root / "model")
    files = {task: write_task_files(root / "data", task) for task in ("sst2", "mrpc", "stsb", "mnli")}
    return model, files


def args_for(model, files, task, method, out, *extra):
    f = files[task]
    if task == "mnli":
        data = [
            "--train_file",
            f["train"],
            "--validation_file",
            f["dev_m"],
            "--validation_mismatched_file",
            f["dev_mm"],
        ]
    else:
        data = ["--train_file", f["train"], "--validation_file", f["dev"], "--test_file", f["test"]]
    return [
        str(a)
        for a in [
            "--model_name_or_path",
            model,
            "--task_name",
            task,
            "--method",
            method,
            "--output_dir",
            out,
            *data,
            *FAST,
            *extra,
        ]
    ]


@pytest.mark.parametrize("method", ["ft", "lora", "dora", "bidora"])
def test_every_method_runs_end_to_end(assets, tmp_path, method):
    model, files = assets
    out = tmp_path / method
    assert run_glue.main(args_for(model, files, "sst2", method, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "sst2" and results["method"] == method and results["seed"] == 0
    assert results["selection"] == "heldout"  # selected on held-out training data, never on dev/test
    assert set(results["eval"]) >= {"validation", "test"}
    for metrics in results["eval"].values():
        assert 0.0 <= metrics["accuracy"] <= 1.0
    assert results["trainable_parameters"] > 0
    if method == "ft":
        assert results["rank"] is None
    else:
        assert results["rank"] == 4
        assert (out / "adapter" / "adapter_config.json").exists()
        assert loralib.read_adapter_config(out / "adapter")["config"]["method"] == method
    # the reported numbers are reproducible from the saved adapter: reload and re-evaluate the test split
    if method in ("lora", "bidora"):
        fresh = run_glue.load_classifier(str(model), 2)
        loralib.load_adapters(fresh, out / "adapter")
        from transformers import AutoTokenizer

        cfg = run_glue.parse_args(args_for(model, files, "sst2", method, tmp_path / "unused"))
        tokenizer = AutoTokenizer.from_pretrained(model)
        data = run_glue.load_datasets(cfg, run_glue.get_task("sst2"), tokenizer)
        collate = run_glue.GlueCollator.from_tokenizer(tokenizer)
        metrics = run_glue.make_evaluate(run_glue.get_task("sst2"), collate, 16, False)(fresh, data["test"])
        assert metrics["accuracy"] == pytest.approx(results["eval"]["test"]["accuracy"])


@pytest.mark.parametrize(
    "task,method,metric",
    [("mrpc", "lora", "f1"), ("stsb", "dora", "pearson"), ("mnli", "bidora", "accuracy")],
)
def test_pair_regression_and_mnli(assets, tmp_path, task, method, metric):
    model, files = assets
    out = tmp_path / task
    assert run_glue.main(args_for(model, files, task, method, out)) == 0
    results = json.loads((out / "results.json").read_text())
    if task == "mnli":  # matched and mismatched reported separately, never pooled
        assert set(results["eval"]) - {"heldout"} == {"validation_matched", "validation_mismatched"}
    for metrics in results["eval"].values():
        assert metric in metrics
    if task == "stsb":
        assert {"pearson", "spearman"} <= set(results["eval"]["validation"])


def test_select_on_dev_is_labelled(assets, tmp_path):
    model, files = assets
    out = tmp_path / "dev"
    assert run_glue.main(args_for(model, files, "sst2", "lora", out, "--select_on_dev")) == 0
    assert json.loads((out / "results.json").read_text())["selection"] == "dev_best_over_time"


def test_bad_inputs_fail_cleanly(assets, tmp_path, capsys):
    model, files = assets

    def fails(argv, code, message, out):
        if code == 2:
            with pytest.raises(SystemExit) as exc:
                run_glue.main(argv)
            assert exc.value.code == 2
        else:
            assert run_glue.main(argv) == code
        assert message in capsys.readouterr().err
        assert not Path(out).exists()  # nothing half-written

    out = tmp_path / "o"
    fails(
        args_for(model, files, "sst2", "lora", out)[:3] + ["rtx"] + args_for(model, files, "sst2", "lora", out)[4:],
        2,
        "unknown task",
        out,
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhi there,1\n")
    argv = args_for(model, files, "sst2", "lora", out)
    argv[argv.index("--train_file") + 1] = str(bad)
    fails(argv, 1, "sentence", out)
    bad.write_text("sentence,label\nhi there,7\n")
    fails(argv, 1, "label", out)
    fails(args_for(model, files, "sst2", "lora", out, "--target_modules", "q_proj"), 1, "no module matched", out)
    config = tmp_path / "typo.yaml"
    config.write_text("task_name: sst2\nlearning_rate: 0.1\n")
    fails(["--config", str(config), "--output_dir", str(out)], 2, "unknown key", out)
    missing = args_for(model, files, "sst2", "lora", out)
    missing[missing.index("--validation_file") + 1] = str(tmp_path / "nope.csv")
    fails(missing, 1, "not found", out)

    done = tmp_path / "done"
    assert run_glue.main(args_for(model, files, "sst2", "lora", done)) == 0
    capsys.readouterr()
    assert run_glue.main(args_for(model, files, "sst2", "lora", done)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run_glue.main(args_for(model, files, "sst2", "lora", done, "--overwrite")) == 0


def test_torchrun_two_processes(assets, tmp_path):
    model, files = assets
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port
        "--nproc_per_node",
        "2",
        str(ROOT / "examples" / "NLU" / "run_glue.py"),
        *args_for(model, files, "sst2", "bidora", out, "--batch_size", "4"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "bidora" and "validation" in results["eval"]
