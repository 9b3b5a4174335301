"""GLUE configs and scripts: the original settings (table re-typed here from original-code.md), the config loader
and command line, and the run scripts (exist, executable, reference their config, loop over seeds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

NLU = Path(__file__).resolve().parents[1] / "examples" / "NLU"
sys.path.insert(0, str(NLU))
import config as gc  # noqa: E402

CONFIGS, SCRIPTS = NLU / "configs", NLU / "scripts"
TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")

# original-code.md, "Settings of the original GLUE scripts", typed in independently of make_configs.py:
# model -> task -> (max_len, batch, lr, wd lower, wd upper, iterations, (retrain lr, iters, wd) or None)
TABLE = {
    "roberta-base": {
        "cola": (512, 32, 5e-5, 0.1, 0.1, 20000, (3e-5, 30000, 0.1)),
        "mnli": (512, 32, 5e-5, 0.1, 0.1, 30000, (7e-5, 40000, 0.1)),
        "mrpc": (512, 32, 2e-5, 0.1, 0.1, 28000, None),
        "qnli": (512, 32, 2e-5, 0.1, 0.0, 20000, None),
        "qqp": (512, 32, 5e-5, 0.1, 0.1, 30000, (5e-5, 30000, 0.1)),
        "rte": (512, 32, 1e-5, 0.1, 0.1, 15000, (3e-5, 15000, 0.1)),
        "sst2": (512, 32, 1e-5, 0.12, 0.0, 12000, None),
        "stsb": (512, 32, 1e-5, 0.1, 0.01, 12000, None),
    },
    "roberta-large": {
        "cola": (128, 32, 1e-5, 1.0, 1.0, 20000, (1e-5, 40000, 1.0)),
        "mnli": (128, 32, 1e-5, 0.5, 0.5, 55000, None),
        "mrpc": (128, 32, 1e-5, 0.0, 0.0, 40000, None),
        "qnli": (128, 64, 1e-5, 0.5, 0.5, 60000, None),
        "qqp": (128, 32, 1e-5, 0.5, 0.5, 50000, None),
        "rte": (128, 32, 1e-5, 0.5, 0.5, 15000, (1e-5, 30000, 0.3)),
        "sst2": (128, 32, 1e-5, 0.5, 0.5, 20000, None),
        "stsb": (128, 32, 1e-5, 0.5, 0.5, 14000, None),
    },
}
SHARED = dict(method="bidora", hypergradient="darts", unroll_steps=1, eval_every=100, orth_reg=1e-5,
              upper_fraction=0.2, betas=[0.9, 0.98], eps=1e-6, warmup_ratio=0.1)
TABLE2_TASKS = {"sst2", "mrpc", "cola", "qnli", "rte", "stsb"}

REQUIRED_FIELDS = {
    "model_name_or_path", "task_name", "method", "r", "lora_alpha", "lora_dropout", "target_modules",
    "modules_to_save", "max_length", "pad_to_max_length", "batch_size", "eval_batch_size", "lr", "weight_decay",
    "upper_lr", "upper_weight_decay", "iterations", "retrain_iterations", "retrain_lr", "retrain_weight_decay",
    "hypergradient", "unroll_steps", "darts_alpha", "orth_reg", "upper_fraction", "warmup_ratio", "betas", "eps",
    "eval_every", "checkpoint_every", "seed",
}
EXTRA_FIELDS = {"output_dir", "overwrite", "train_file", "validation_file", "validation_mismatched_file",
                "test_file", "select_on_dev", "device", "bf16", "num_workers", "snapshots", "pooling",
                "space_residues", "neumann_iterations", "cg_iterations", "retrain_reinit", "no_token_cache",
                "no_progress"}


def _check_original(cfg, model, task, r):
    max_len, batch, lr, wd, upper_wd, iters, retrain = TABLE[model][task]
    assert cfg.model_name_or_path == model and cfg.task_name == task
    assert (cfg.max_length, cfg.batch_size, cfg.iterations) == (max_len, batch, iters)
    assert cfg.lr == pytest.approx(lr, rel=1e-12) and cfg.effective_upper_lr == pytest.approx(lr, rel=1e-12)
    assert cfg.weight_decay == pytest.approx(wd) and cfg.upper_weight_decay == pytest.approx(upper_wd)
    assert cfg.effective_upper_weight_decay == pytest.approx(upper_wd)
    if retrain is None:
        assert cfg.retrain_iterations == 0
    else:
        assert cfg.retrain_iterations == retrain[1]
        assert cfg.effective_retrain_lr == pytest.approx(retrain[0], rel=1e-12)
        assert cfg.effective_retrain_weight_decay == pytest.approx(retrain[2])
    assert (cfg.r, cfg.lora_alpha) == (r, 2 * r)
    assert cfg.target_modules == ["query", "value"] and cfg.modules_to_save == ["classifier"]
    assert cfg.pad_to_max_length is True and cfg.lora_dropout == 0.0
    for key, value in SHARED.items():
        assert getattr(cfg, key) == (pytest.approx(value) if isinstance(value, float) else value), key


@pytest.mark.parametrize("model", ["roberta-base", "roberta-large"])
@pytest.mark.parametrize("task", TASKS)
def test_original_configs_match_table(model, task):
    name = f"{model.replace('-', '_')}_{task}"
    _check_original(gc.load_config(CONFIGS / f"{name}.yaml"), model, task, r=4)


@pytest.mark.parametrize("r", [8, 16])
def test_table2_rank_configs(r):
    names = {p.stem.removeprefix(f"roberta_base_r{r}_") for p in CONFIGS.glob(f"roberta_base_r{r}_*.yaml")}
    assert names == TABLE2_TASKS
    for task in TABLE2_TASKS:
        _check_original(gc.load_config(CONFIGS / f"roberta_base_r{r}_{task}.yaml"), "roberta-base", task, r=r)


def test_deberta_configs_are_ours_and_sane():
    for task in TASKS:
        path = CONFIGS / f"deberta_v2_xxlarge_{task}.yaml"
        text = path.read_text()
        assert "OUR settings, not the authors'" in text
        cfg = gc.load_config(path)
        assert cfg.model_name_or_path == "microsoft/deberta-v2-xxlarge" and cfg.task_name == task
        assert cfg.target_modules == ["query_proj", "value_proj"] and "classifier" in cfg.modules_to_save
        assert cfg.method == "bidora" and cfg.iterations > 0 and 0 < cfg.lr < 1e-3


def test_every_config_file_is_complete_and_has_a_script():
    yamls = sorted(CONFIGS.glob("*.yaml"))
    assert len(yamls) == 8 * 3 + 6 * 2
    for path in yamls:
        data = yaml.safe_load(path.read_text())
        assert set(data) == REQUIRED_FIELDS, path.name  # every setting spelled out, nothing else
        assert (SCRIPTS / f"{path.stem}.sh").is_file()
    assert {p.stem for p in SCRIPTS.glob("*.sh")} == {p.stem for p in yamls}


def test_generated_files_are_up_to_date():
    r = subprocess.run([sys.executable, str(NLU / "make_configs.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_executable_and_reference_their_config():
    for path in SCRIPTS.glob("*.sh"):
        text = path.read_text()
        assert os.access(path, os.X_OK), path.name
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
        assert f'--config "$HERE/../configs/{path.stem}.yaml"' in text
        assert "ROUGH ESTIMATE" in text and "${PYTHON:-python}" in text
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_script_loops_over_seeds_from_any_cwd(tmp_path):
    script = SCRIPTS / "roberta_base_rte.sh"
    env = dict(os.environ, SEEDS="0 3", OUTPUT_ROOT=str(tmp_path / "out"), PYTHON="echo RUN")
    r = subprocess.run(["bash", str(script), "--iterations", "5"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    runs = [line.split() for line in r.stdout.splitlines() if line.startswith("RUN ")]
    assert len(runs) == 2
    root = NLU.parents[1]
    for seed, words in zip(("0", "3"), runs):
        assert Path(words[1]).resolve() == root / "examples" / "NLU" / "run_glue.py"
        assert Path(words[words.index("--config") + 1]).resolve() == CONFIGS / "roberta_base_rte.yaml"
        assert words[words.index("--seed") + 1] == seed
        assert words[words.index("--output_dir") + 1] == str(tmp_path / "out" / "roberta_base_rte" / f"seed{seed}")
        assert words[-2:] == ["--iterations", "5"]
    assert "roberta-base ~500 MB" in r.stdout and "h per seed" in r.stdout


# --------------------------------------------------------------------------------------------------------------
# GlueRunConfig, load_config, command line
# --------------------------------------------------------------------------------------------------------------


def test_dataclass_fields():
    assert set(gc.FIELD_NAMES) == REQUIRED_FIELDS | EXTRA_FIELDS
    d = gc.GlueRunConfig()
    assert (d.select_on_dev, d.device, d.snapshots, d.pad_to_max_length) == (False, "auto", 4, False)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_load_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'weight_decy'; did you mean 'weight_decay'\?"):
        gc.load_config(_write(tmp_path, "task_name: rte\nweight_decy: 0.1\n"))
    with pytest.raises(ValueError, match=r"iterations expects int, got str 'many'"):
        gc.load_config(_write(tmp_path, "task_name: rte\niterations: many\n"))
    with pytest.raises(ValueError, match=r"r expects int, got bool True"):
        gc.load_config(_write(tmp_path, "task_name: rte\nr: true\n"))
    with pytest.raises(ValueError, match=r"iterations expects int, got float 2.5"):
        gc.load_config(_write(tmp_path, "task_name: rte\niterations: 2.5\n"))
    with pytest.raises(ValueError, match=r"target_modules\b.*got"):
        gc.load_config(_write(tmp_path, "task_name: rte\ntarget_modules: [query, 3]\n"))
    with pytest.raises(ValueError, match="expected a mapping"):
        gc.load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ValueError, match="unknown task 'rtx'; valid tasks: cola"):
        gc.load_config(_write(tmp_path, "task_name: rtx\n"))
    with pytest.raises(ValueError, match="method must be one of"):
        gc.load_config(_write(tmp_path, "task_name: rte\nmethod: adapter\n"))
    with pytest.raises(ValueError, match="betas must be two numbers"):
        gc.load_config(_write(tmp_path, "task_name: rte\nbetas: [0.9]\n"))
    with pytest.raises(ValueError, match="bidora needs upper_fraction > 0"):
        gc.load_config(_write(tmp_path, "task_name: rte\nupper_fraction: 0\n"))
    assert gc.load_config(_write(tmp_path, "task_name: rte\nmethod: lora\nupper_fraction: 0\n")).upper_fraction == 0
    with pytest.raises(ValueError, match="hypergradient must be one of darts, neumann, cg, first_order"):
        gc.load_config(_write(tmp_path, "task_name: rte\nhypergradient: sama\n"))
    with pytest.raises(ValueError, match="task_name is required"):
        gc.load_config(_write(tmp_path, "lr: 0.1\n"))
    with pytest.raises(FileNotFoundError, match="config file not found"):
        gc.load_config(tmp_path / "missing.yaml")


def test_load_config_yaml11_floats_and_regex_targets(tmp_path):
    # PyYAML reads 1e-5 (no dot) as a string; it must still mean the number
    cfg = gc.load_config(_write(tmp_path, "task_name: rte\nlr: 1e-5\niterations: 1e3\ntarget_modules: '.*q'\n"))
    assert cfg.lr == 1e-5 and type(cfg.lr) is float
    assert cfg.iterations == 1000 and type(cfg.iterations) is int
    assert cfg.target_modules == ".*q"


def test_parse_args_precedence_and_overrides(tmp_path):
    path = CONFIGS / "roberta_large_rte.yaml"
    cfg = gc.parse_args(["--config", str(path), "--seed", "3", "--lr", "2e-5", "--no-pad_to_max_length",
                         "--target_modules", "query", "key", "value", "--upper_lr", "none", "--betas", "0.8",
                         "0.9", "--output_dir", str(tmp_path)])
    assert cfg.seed == 3 and cfg.lr == 2e-5 and cfg.pad_to_max_length is False
    assert cfg.target_modules == ["query", "key", "value"] and cfg.upper_lr is None and cfg.betas == [0.8, 0.9]
    assert cfg.effective_upper_lr == 2e-5
    assert cfg.iterations == 15000 and cfg.retrain_weight_decay == pytest.approx(0.3)  # from the YAML
    assert gc.parse_args(["--task_name", "cola"]).lr == gc.GlueRunConfig().lr  # defaults without a config


@pytest.mark.parametrize("argv, match", [
    (["--task_name", "rtx"], "valid tasks"),
    (["--task_name", "rte", "--r", "2.5"], "expected int"),
    (["--task_name", "rte", "--method", "loha"], "method must be one of"),
    (["--task_name", "rte", "--validation_mismatched_file", "x.tsv"], "only for MNLI"),
    (["--config", "nope.yaml"], "config file not found"),
])
def test_parse_args_errors_exit_with_message(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    parser = gc.build_arg_parser()
    for name in gc.FIELD_NAMES:
        assert f"--{name}" in out
    helps = {a.dest: a.help for a in parser._actions}
    assert all(helps[name] and len(helps[name]) > 15 for name in gc.FIELD_NAMES)


def test_save_config_round_trip(tmp_path):
    cfg = gc.load_config(CONFIGS / "deberta_v2_xxlarge_mnli.yaml")
    cfg.validation_mismatched_file = "mm.tsv"
    gc.save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert gc.load_config(tmp_path / "sub" / "config.yaml") == cfg
