"""End-to-end runs of examples/NLU/run_glue.py (BiDoRATrainer) on a tiny RoBERTa and tiny GLUE-format files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, DataCollatorWithPadding

import loralib
from tests.helpers import write_task_files, write_tiny_roberta

ROOT = Path(__file__).resolve().parents[1]
import run_glue  # noqa: E402

from utils import report  # noqa: E402

FAST = ["--max_steps", "6", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3",
        "--max_length", "32", "--seed", "0", "--no_token_cache", "--disable_tqdm", "true", "--snapshots", "2",
        "--lora_r", "4", "--lora_alpha", "8"]  # --lora_r: the spelling of --r that torchrun's parser lets through


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    model = write_tiny_roberta(root / "model")
    files = {task: write_task_files(root / "data", task) for task in ("sst2", "mrpc", "stsb", "mnli")}
    return model, files


def args_for(model, files, task, method, out, *extra):
    f = files[task]
    if task == "mnli":
        data = ["--train_file", f["train"], "--validation_file", f["dev_m"],
                "--validation_mismatched_file", f["dev_mm"]]
    else:
        data = ["--train_file", f["train"], "--validation_file", f["dev"], "--test_file", f["test"]]
    argv = ["--model_name_or_path", model, "--task_name", task, "--method", method, "--output_dir", out, *data, *FAST]
    return [str(a) for a in [*argv, *extra]]


def results_of(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def evaluate(model, dataset, collate) -> float:
    """Accuracy by a plain loop, independent of the Trainer's evaluation."""
    model.eval()
    right = 0
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=collate):
            labels = batch.pop("labels")
            right += int((model(**batch).logits.argmax(-1) == labels).sum())
    return right / len(dataset)


@pytest.mark.parametrize("method", ["ft", "lora", "dora", "bidora"])
def test_every_method_runs_end_to_end(assets, tmp_path, capsys, method):
    model, files = assets
    out = tmp_path / method
    assert run_glue.main(args_for(model, files, "sst2", method, out)) == 0
    results = results_of(out)
    assert results["task"] == "sst2" and results["method"] == method and results["seed"] == 0
    assert results["selection"] == "heldout"  # selected on held-out training data, never on dev/test
    assert results["selected_step"] in (3, 6) and results["select_metric"] == "accuracy"
    assert set(results["eval"]) == {"heldout", "validation", "test"}
    assert results["data_sizes"] == {"train": 48, "lower": 38, "heldout": 10, "validation": 16, "test": 16}
    for metrics in results["eval"].values():
        assert 0.0 <= metrics["accuracy"] <= 1.0
    assert {h["split"] for h in results["history"]} == {"heldout", "validation", "test"}
    assert results["trainable_parameters"] > 0 and results["world_size"] == 1
    assert results["config"]["learning_rate"] == 1e-3 and results["config"]["method"] == method
    assert results["config"]["neumann_alpha"] == 1.0  # every bi-level setting is recorded (and passed on)
    assert (out / "log.csv").is_file() and not list(out.glob("checkpoint-*"))  # checkpoints go once finished
    assert (out / "snapshots" / "base_weights.safetensors").is_file() and (out / "snapshots" / "step_6").is_dir()
    if not torch.cuda.is_available():
        assert "note: no GPU found: running on the CPU" in capsys.readouterr().err
    if method == "ft":
        assert results["rank"] is None and results["trainable_parameters"] == results["total_parameters"]
        return
    assert results["rank"] == 4
    assert loralib.read_adapter_config(out / "adapter")["config"]["method"] == method
    # the reported numbers are those of the saved adapter: reload it and re-evaluate the test split
    fresh = run_glue.load_classifier(str(model), 2)
    loralib.load_adapters(fresh, out / "adapter")
    _, data_args, _, _, _ = run_glue.parse_args(args_for(model, files, "sst2", method, tmp_path / "unused"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    _, data = run_glue.load_datasets(data_args, tokenizer)
    accuracy = evaluate(fresh, data["test"], DataCollatorWithPadding(tokenizer))
    assert accuracy == pytest.approx(results["eval"]["test"]["accuracy"])


@pytest.mark.parametrize(
    "task,method,metric",
    [("mrpc", "lora", "f1"), ("stsb", "dora", "pearson"), ("mnli", "bidora", "accuracy")],
)
def test_pair_regression_and_mnli(assets, tmp_path, task, method, metric):
    model, files = assets
    out = tmp_path / task
    assert run_glue.main(args_for(model, files, task, method, out)) == 0
    results = results_of(out)
    if task == "mnli":  # matched and mismatched reported separately, never pooled
        assert set(results["eval"]) - {"heldout"} == {"validation_matched", "validation_mismatched"}
    for metrics in results["eval"].values():
        assert metric in metrics
    if task == "stsb":
        assert {"pearson", "spearman"} <= set(results["eval"]["validation"])


@pytest.mark.parametrize("extra,selection", [
    (["--select_on_dev"], "dev_best_over_time"),
    (["--metric_for_best_model", "validation_accuracy"], "dev_best_over_time"),  # the user named the dev split
    (["--upper_fraction", "0"], "final"),  # no held-out split: the final model
])
def test_selection_is_labelled(assets, tmp_path, extra, selection):
    model, files = assets
    out = tmp_path / "sel"
    assert run_glue.main(args_for(model, files, "sst2", "lora", out, *extra)) == 0
    results = results_of(out)
    assert results["selection"] == selection
    if selection == "final":
        assert results["selected_step"] == 6 and "heldout" not in results["eval"]
        assert results["eval"] == results["final_eval"]
    else:  # the reported numbers are the dev split's best over time
        best = max(h["accuracy"] for h in results["history"] if h["split"] == "validation")
        assert results["eval"]["validation"]["accuracy"] == best


def test_retraining_evaluates_only_the_final_model_when_asked(assets, tmp_path):
    model, files = assets
    out = tmp_path / "retrain_final_eval"
    assert run_glue.main(args_for(model, files, "sst2", "bidora", out, "--retrain_max_steps", "4",
                                  "--retrain_eval_strategy", "no")) == 0
    results = results_of(out)
    assert {h["step"] for h in results["history"] if h["phase"] == "retrain"} == {10}
    assert results["eval"] == results["final_eval"] and set(results["eval"]) == {"validation", "test"}
    assert any(h["phase"] == "search" and h["split"] == "test" and h["step"] < 6 for h in results["history"])


def test_bidora_retraining_reports_both_phases(assets, tmp_path):
    model, files = assets
    out = tmp_path / "retrain"
    assert run_glue.main(args_for(model, files, "sst2", "bidora", out, "--retrain_max_steps", "4")) == 0
    results = results_of(out)
    assert results["selection"] == "final" and results["selected_step"] == 10
    assert {h["phase"] for h in results["history"]} == {"search", "retrain"}
    assert not any(h["split"] == "heldout" for h in results["history"] if h["phase"] == "retrain")
    assert sorted((out / "snapshots").glob("step_*")) == [out / "snapshots" / "step_10", out / "snapshots" / "step_5"]
    run = report.load_run(out / "results.json")  # utils/report.py reads both rows: with retraining, search only
    assert run.has_retrain
    step, values = report.search_only_value(run, "test", ["accuracy"])
    assert step in (3, 6) and 0 <= values["accuracy"] <= 1
    assert not (out / "retrain").exists() and not (out / "search_adapter").exists()


class Interrupted(BaseException):
    """What a kill looks like to the run: it stops between two steps, after the checkpoint at step 3."""


def interrupt_at(phase: str, step: int):
    def on_step_end(self, args, state, control, **kwargs):
        if self.phase == phase and state.global_step == step:
            raise Interrupted
    return on_step_end


@pytest.mark.parametrize("phase,extra", [
    ("search", ["--method", "lora", "--pooling", "mean"]),  # the mean-pooling head checkpoints and resumes too
    ("retrain", ["--retrain_max_steps", "6"]),
])
def test_the_same_command_resumes_an_interrupted_run(assets, tmp_path, monkeypatch, capsys, phase, extra):
    model, files = assets
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_glue.main(args_for(model, files, "sst2", "bidora", whole, *extra)) == 0
    with monkeypatch.context() as m:
        m.setattr(run_glue.CsvLogCallback, "on_step_end", interrupt_at(phase, 4), raising=False)
        with pytest.raises(Interrupted):
            run_glue.main(args_for(model, files, "sst2", "bidora", cut, *extra))
    assert not (cut / "results.json").exists()
    (cut / ".results.json.k2j4x.tmp").write_text("{")  # a kill while results.json was written leaves this
    checkpoints = cut / "retrain" if phase == "retrain" else cut
    (checkpoints / "checkpoint-5").mkdir()  # a kill while a checkpoint was written: no trainer_state.json
    capsys.readouterr()
    assert run_glue.main(args_for(model, files, "sst2", "bidora", cut, *extra)) == 0
    printed = capsys.readouterr().out
    assert f"resuming the unfinished run in {cut} from {checkpoints / 'checkpoint-3'}" in printed
    assert "skipping" in printed and "checkpoint-5" in printed
    a, b = results_of(whole), results_of(cut)
    for key in ("selection", "selected_step", "eval", "final_eval"):
        assert a[key] == b[key], key
    timeless = [[{k: v for k, v in h.items() if k != "runtime"} for h in r["history"]] for r in (a, b)]
    assert timeless[0] == timeless[1]  # every evaluation equal; only how long each took differs
    assert all(h["runtime"] > 0 for h in a["history"])
    assert [r["step"] for r in _log_rows(cut)] == [r["step"] for r in _log_rows(whole)]
    expected = load_file(whole / "adapter" / "adapter_model.safetensors")
    got = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def _log_rows(out: Path) -> list[dict]:
    import csv

    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_finished_and_foreign_folders_are_refused(assets, tmp_path, capsys):
    model, files = assets
    done = tmp_path / "done"
    assert run_glue.main(args_for(model, files, "sst2", "lora", done)) == 0
    before = results_of(done)
    capsys.readouterr()
    assert run_glue.main(args_for(model, files, "sst2", "lora", done)) == 1
    assert "finished run (results.json); pass --overwrite_output_dir" in capsys.readouterr().err
    assert results_of(done) == before
    assert run_glue.main(args_for(model, files, "sst2", "lora", done, "--overwrite_output_dir")) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for flag in ((), ("--overwrite_output_dir",)):
        assert run_glue.main(args_for(model, files, "sst2", "lora", foreign, *flag)) == 1
        assert "holds files this script did not write (notes.txt)" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


def fails(capsys, argv, code, message, out=None):
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            run_glue.main(argv)
        assert exc.value.code == 2
    else:
        assert run_glue.main(argv) == code
    err = capsys.readouterr().err
    assert message in err, err
    if code == 1:  # one clear line, no library traceback
        assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    if out is not None:
        assert not Path(out).exists()  # nothing half-written
    return err


def test_bad_inputs_fail_cleanly(assets, tmp_path, capsys):
    model, files = assets
    out = tmp_path / "o"
    argv = args_for(model, files, "sst2", "lora", out)
    fails(capsys, [*argv, "--task_name", "rtx"], 2, "unknown task", out)
    fails(capsys, [*argv, "--iterations", "6"], 2, "--iterations is now --max_steps", out)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhi there,1\n")
    fails(capsys, [*argv, "--train_file", str(bad)], 1, "sentence", out)
    bad.write_text("sentence,label\nhi there,7\n")
    fails(capsys, [*argv, "--train_file", str(bad)], 1, "label", out)
    fails(capsys, [*argv, "--target_modules", "q_proj"], 1, "no module matched", out)
    fails(capsys, [*argv, "--validation_file", str(tmp_path / "nope.csv")], 1, "not found", out)
    fails(capsys, [*argv, "--retrain_max_steps", "3"], 2, "BiDoRA's retraining phase", out)
    fails(capsys, [*argv, "--method", "bidora", "--upper_fraction", "0"], 2, "needs --upper_fraction > 0", out)
    # the model: a bad path, an empty folder, a folder without config.json, more tokens than it has positions
    fails(capsys, [*argv, "--model_name_or_path", str(tmp_path / "no-such-model")], 1, "no such folder", out)
    (tmp_path / "empty").mkdir()
    fails(capsys, [*argv, "--model_name_or_path", str(tmp_path / "empty")], 1, "is an empty folder", out)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.txt").write_text("a\n")
    fails(capsys, [*argv, "--model_name_or_path", str(tmp_path / "half")], 1, "has no config.json", out)
    fails(capsys, [*argv, "--max_length", "128"], 1, "--max_length 128 is beyond the 63 positions", out)
    # the config file
    config = tmp_path / "c.yaml"
    config.write_text("task_name: sst2\nlr: 0.1\n")
    fails(capsys, ["--config", str(config), "--output_dir", str(out)], 2, "'lr' is now 'learning_rate'", out)
    config.write_text("task_name: sst2\nweight_decy: 0.1\n")
    fails(capsys, ["--config", str(config), "--output_dir", str(out)], 2, "did you mean 'weight_decay'?", out)
    config.write_text("task_name: sst2\nr: true\n")
    fails(capsys, [*argv, "--config", str(config)], 2, "r: expected", out)
    fails(capsys, [*argv, "--config", str(tmp_path / "missing.yaml")], 2, "missing.yaml", out)


def test_a_damaged_checkpoint_is_named(assets, tmp_path, monkeypatch, capsys):
    model, files = assets
    out = tmp_path / "cut"
    argv = args_for(model, files, "sst2", "lora", out)
    with monkeypatch.context() as m:
        m.setattr(run_glue.CsvLogCallback, "on_step_end", interrupt_at("search", 4), raising=False)
        with pytest.raises(Interrupted):
            run_glue.main(argv)
    weights = out / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short (disk full, bad copy)
    capsys.readouterr()
    err = fails(capsys, argv, 1, f"checkpoint {out / 'checkpoint-3'} is damaged (model.safetensors")
    assert f"delete {out / 'checkpoint-3'} to resume from" in err and "--overwrite_output_dir to start afresh" in err
    assert not (out / "results.json").exists()
    assert run_glue.main([*argv, "--overwrite_output_dir"]) == 0  # the way out


def test_config_file_is_defaults_the_command_line_overrides(tmp_path):
    path = ROOT / "examples" / "NLU" / "configs" / "roberta_large_rte.yaml"
    model_args, data_args, adapter_config, run_args, args = run_glue.parse_args(
        ["--config", str(path), "--seed", "3", "--learning_rate", "2e-5", "--pad_to_max_length", "false",
         "--target_modules", "query", "key", "value", "--output_dir", str(tmp_path)])
    assert args.seed == 3 and args.learning_rate == 2e-5 and data_args.pad_to_max_length is False
    assert adapter_config.target_modules == ["query", "key", "value"]
    assert (adapter_config.r, adapter_config.lora_alpha) == (4, 8.0)  # from the YAML
    assert args.max_steps == 15000 and run_args.retrain_weight_decay == pytest.approx(0.3)  # from the YAML
    assert args.adam_beta2 == 0.98 and args.max_grad_norm == 0.0 and args.upper_learning_rate == 1e-5
    *_, args = run_glue.parse_args(["--config", str(path), "--output_dir", str(tmp_path), "--hypergradient",
                                         "neumann", "--neumann_alpha", "0.05", "--neumann_iterations", "7"])
    assert (args.hypergradient, args.neumann_alpha, args.neumann_iterations) == ("neumann", 0.05, 7)
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\ntask_name: rte\nlearning_rate: 1e-5\nmax_steps: 1e3\n"
                      "target_modules: '.*q'\nlr_scheduler_kwargs: {}\n")
    _, _, adapter_config, _, args = run_glue.parse_args(["--config", str(config), "--output_dir", str(tmp_path)])
    assert args.learning_rate == 1e-5 and args.max_steps == 1000 and type(args.max_steps) is int  # YAML 1.1 strings
    assert adapter_config.target_modules == ".*q"  # one string in YAML: a regular expression
    # this script's defaults for the Trainer: train, evaluate every 100 steps, keep two checkpoints
    _, _, adapter_config, _, args = run_glue.parse_args(["--model_name_or_path", "m", "--task_name", "rte",
                                                         "--output_dir", "o"])
    assert (args.do_train, args.do_eval, args.eval_strategy, args.eval_steps, args.save_total_limit) == (
        True, True, "steps", 100, 2)
    # the adapter options: the library's defaults, but for the task head this script creates, which trains
    assert adapter_config == loralib.AdapterConfig(modules_to_save=["classifier"])


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        run_glue.parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for dataclass in (run_glue.ModelArguments, run_glue.DataTrainingArguments, loralib.AdapterConfig,
                      run_glue.RunArguments):
        for name, f in dataclass.__dataclass_fields__.items():
            if not f.init:
                continue  # RunArguments.method: filled from --method
            assert f"--{name}" in out
            assert len(f.metadata.get("help", "")) > 15, name
    bilevel = ("upper_fraction", "upper_learning_rate", "upper_weight_decay", "upper_batch_size", "hypergradient",
               "unroll_steps", "darts_alpha", "neumann_iterations", "neumann_alpha", "cg_iterations", "orth_reg")
    trainer = ("per_device_train_batch_size", "learning_rate", "max_steps", "num_train_epochs", "warmup_steps",
               "do_train", "do_eval", "do_predict", "report_to", "output_dir", "max_grad_norm", "adam_beta2")
    for name in (*bilevel, *trainer, "config"):
        assert f"--{name} " in out, name  # every bi-level setting is exposed (neumann_alpha used not to be)


def test_predictions_for_test_splits(assets, tmp_path):
    model, files = assets
    out = tmp_path / "pred"
    assert run_glue.main(args_for(model, files, "sst2", "lora", out, "--do_predict", "--max_steps", "2")) == 0
    lines = (out / "predict_results_test.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 17
    assert {line.split("\t")[1] for line in lines[1:]} <= {"negative", "positive"}


def test_torchrun_two_processes(assets, tmp_path):
    model, files = assets
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "examples" / "NLU" / "run_glue.py"),
        *args_for(model, files, "sst2", "bidora", out, "--per_device_train_batch_size", "4", "--use_cpu", "true"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = results_of(out)
    assert results["method"] == "bidora" and results["world_size"] == 2 and "validation" in results["eval"]
    assert "upper_loss" in (out / "log.csv").read_text()


# ---- the command line: AdapterConfig parsed directly, torchrun-safe, strict YAML ---------------------------------
BASE = ["--model_name_or_path", "m", "--task_name", "rte", "--output_dir", "o"]


def test_every_adapter_option_reaches_the_command_line():
    _, _, adapter_config, run_args, _ = run_glue.parse_args(
        [*BASE, "--method", "dora", "--lora_r", "6", "--lora_alpha", "12", "--lora_dropout", "0.1",
         "--target_modules_regex", r".*layer\.0\..*(query|value)", "--modules_to_save", "classifier", "pooler",
         "--use_rslora", "--init_lora_weights", "gaussian", "--rank_pattern", '{"value": 2}',
         "--alpha_pattern", '{"query": 3.5}', "--detach_norm", "true", "--no_autocast_adapter_dtype"])
    expected = loralib.AdapterConfig(  # built by hand: the reference
        method="dora", r=6, lora_alpha=12.0, lora_dropout=0.1, target_modules=r".*layer\.0\..*(query|value)",
        modules_to_save=["classifier", "pooler"], use_rslora=True, init_lora_weights="gaussian",
        rank_pattern={"value": 2}, alpha_pattern={"query": 3.5}, detach_norm=True, autocast_adapter_dtype=False)
    assert adapter_config == expected and run_args.method == "dora"
    options = {f.name for f in dataclasses.fields(loralib.AdapterConfig)}
    assert {a.dest for a in run_glue.make_parser()._actions} >= options  # nothing left out
    _, _, adapter_config, _, _ = run_glue.parse_args([*BASE, "--r", "3", "--target_modules", "all-linear"])
    assert (adapter_config.r, adapter_config.target_modules) == (3, "all-linear")  # PEFT's --r still works
    _, _, adapter_config, _, _ = run_glue.parse_args([*BASE, "--target_modules", "query"])
    assert adapter_config.target_modules == ["query"]  # a suffix list, never a regex


def test_ft_is_a_method_of_the_runner_only(capsys):
    _, _, adapter_config, run_args, _ = run_glue.parse_args([*BASE, "--method", "ft", "--upper_fraction", "0"])
    assert run_args.method == "ft" and adapter_config.method in loralib.config.METHODS
    with pytest.raises(SystemExit):
        run_glue.parse_args([*BASE, "--method", "adalora"])
    assert "invalid choice: 'adalora'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_glue.parse_args([*BASE, "--rank_pattern", "{query: 2}"])
    assert "rank_pattern is not valid JSON" in capsys.readouterr().err


def test_every_option_survives_torchrun():
    """torchrun parses its own options (with abbreviations) before the script's arguments: each run_glue option must
    reach run_glue unchanged, e.g. `torchrun ... run_glue.py --r 8` dies with "ambiguous option: --r"."""
    import contextlib
    import io

    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser()
    lost: dict[str, set[str]] = {}
    actions = [a for a in run_glue.make_parser()._actions if a.option_strings]
    for action in actions:
        for option in action.option_strings:
            for flags in ([option, "x"], [option], [f"{option}=x"]):
                try:
                    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                        parsed = torchrun.parse_args(["run_glue.py", *flags])
                    if parsed.training_script_args == flags:
                        continue
                except SystemExit:
                    pass
                lost.setdefault(action.dest, set()).add(option)
    assert lost == {"r": {"--r"}}  # PEFT's name; the documented torchrun spelling is --lora_r
    r_action = next(a for a in actions if a.dest == "r")
    assert "--lora_r" in r_action.option_strings and "--lora_r" in r_action.help


def test_a_key_given_twice_in_the_config_is_an_error(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("task_name: rte\nr: 4\nlora_alpha: 8\nr: 16\n")
    with pytest.raises(SystemExit) as exc:
        run_glue.parse_args(["--config", str(config), "--model_name_or_path", "m", "--output_dir", "o"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--config {config}: the key 'r' is given twice (lines 2 and 4)" in err
    config.write_text("task_name: rte\nrank_pattern: {query: 2, query: 3}\n")  # nested mappings too
    with pytest.raises(SystemExit):
        run_glue.parse_args(["--config", str(config), "--model_name_or_path", "m", "--output_dir", "o"])
    assert "the key 'query' is given twice" in capsys.readouterr().err
    config.write_text("task_name: rte\nrank_pattern: {query: 2}\nr: 4\n")  # a YAML dict feeds the JSON option
    _, _, adapter_config, _, _ = run_glue.parse_args(["--config", str(config), "--model_name_or_path", "m",
                                                      "--output_dir", "o", "--lora_r", "5"])
    assert (adapter_config.rank_pattern, adapter_config.r) == ({"query": 2}, 5)  # the command line overrides


def test_selection_never_lands_on_the_test_split(assets, tmp_path, capsys):
    model, files = assets
    out = tmp_path / "o"
    f = files["sst2"]
    no_dev = ["--model_name_or_path", model, "--task_name", "sst2", "--method", "lora", "--output_dir", out,
              "--train_file", f["train"], "--test_file", f["test"], *FAST]  # a labelled test file, no dev file
    fails(capsys, [str(a) for a in [*no_dev, "--select_on_dev"]], 1,
          "--select_on_dev selects on a labelled dev split and this run has none", out)
    argv = args_for(model, files, "sst2", "lora", out)
    fails(capsys, [*argv, "--metric_for_best_model", "test_accuracy"], 1,
          "--metric_for_best_model test_accuracy selects the model on the test split", out)


def test_a_resume_checks_the_checkpoint_and_skips_a_half_written_one(assets, tmp_path, monkeypatch, capsys):
    model, files = assets
    out = tmp_path / "cut"
    argv = args_for(model, files, "sst2", "lora", out)
    with monkeypatch.context() as m:
        m.setattr(run_glue.CsvLogCallback, "on_step_end", interrupt_at("search", 4), raising=False)
        with pytest.raises(Interrupted):
            run_glue.main(argv)
    assert json.loads((out / "loralib_run.json").read_text())["base"]["name_or_path"] == str(model)
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "trainer_state.json").write_bytes(b"")  # a kill while it was written: skipped
    optimizer = out / "checkpoint-3" / "optimizer.pt"
    optimizer.rename(tmp_path / "optimizer.pt")
    capsys.readouterr()
    err = fails(capsys, argv, 1, f"cannot resume from {out / 'checkpoint-3'}: {optimizer} is missing")
    assert "--overwrite_output_dir to start afresh" in err
    (tmp_path / "optimizer.pt").rename(optimizer)
    assert run_glue.main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipping" in printed and "checkpoint-5" in printed
    assert f"resuming the unfinished run in {out} from {out / 'checkpoint-3'}" in printed
    assert "holding out 20% of train (10 of 48 examples) as the heldout split: the model is selected on it" in printed
    results = results_of(out)
    assert results["selection"] == "heldout" and results["selection_split"] == "heldout"
    assert results["config"]["heldout_fraction"] == 0.2
    # the finished run's folder loads as the trained model on the recorded base: the base's own weights, the adapter
    loaded = loralib.load_checkpoint(out)
    base = load_file(Path(model) / "model.safetensors")
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items() if k in state and "classifier" not in k)
    fresh = run_glue.load_classifier(str(model), 2)  # what the existing end-to-end test reloads
    loralib.load_adapters(fresh, out / "adapter")
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())
