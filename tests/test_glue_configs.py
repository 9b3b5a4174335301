"""GLUE configs and scripts: the original settings (checked against original-code.md's table, not against
make_configs.py's copy of it) as run_glue.py reads them, and the run scripts (exist, executable, reference their
config, loop over seeds, find the project's .venv). The command line and the config loader themselves are tested
in tests/test_run_glue.py."""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

NLU = Path(__file__).resolve().parents[1] / "examples" / "NLU"
import run_glue  # noqa: E402

CONFIGS, SCRIPTS = NLU / "configs", NLU / "scripts"
TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")

# The reference for the original settings is the document itself, not make_configs.py's table (which was typed from
# it): original-code.md, "Settings of the original GLUE scripts", read at test time where the shared references are
# mounted, and a few of its rows typed in here (the distinctive ones) so that something runs everywhere.
# Row: (max_len, batch, lr, wd lower, wd upper, iterations, (retrain lr, iterations, wd) or None)
REFERENCE = Path("/work/shared/reference/original-code.md")
TYPED_IN = {
    ("roberta-base", "cola"): (512, 32, 5e-5, 0.1, 0.1, 20000, (3e-5, 30000, 0.1)),  # retrained
    ("roberta-base", "sst2"): (512, 32, 1e-5, 0.12, 0.0, 12000, None),  # wd 0.12 below, none above
    ("roberta-base", "stsb"): (512, 32, 1e-5, 0.1, 0.01, 12000, None),
    ("roberta-large", "qnli"): (128, 64, 1e-5, 0.5, 0.5, 60000, None),  # the one batch of 64
    ("roberta-large", "rte"): (128, 32, 1e-5, 0.5, 0.5, 15000, (1e-5, 30000, 0.3)),  # retrain wd 0.3, not 0.5
}


def reference_rows() -> dict[tuple[str, str], tuple]:
    """The table of original-code.md: (model, task) -> row; empty where the document is not mounted."""
    if not REFERENCE.exists():
        return {}
    rows = {}
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or not cells[0].startswith("roberta-"):
            continue
        model, task, max_len, batch, lr, wd, upper_wd, iters, retrain = cells
        again = None if retrain == "none" else tuple(float(x) for x in retrain.split("/"))
        if again is not None:
            again = (again[0], int(again[1]), again[2])
        rows[model, task] = (int(max_len), int(batch), float(lr), float(wd), float(upper_wd), int(iters), again)
    return rows


# The original runs' shared settings, with the TrainingArguments names: linear warmup over 10% then linear decay,
# AdamW (0.9, 0.98) and eps 1e-6, no gradient clipping (Betty never clips; the Trainer's default clips at 1.0),
# evaluation every 100 steps.
SHARED = dict(method="bidora", hypergradient="darts", unroll_steps=1, eval_steps=100, orth_reg=1e-5,
              upper_fraction=0.2, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6, warmup_steps=0.1,
              lr_scheduler_type="linear", max_grad_norm=0.0, eval_strategy="steps")
TABLE2_TASKS = {"sst2", "mrpc", "cola", "qnli", "rte", "stsb"}

REQUIRED_FIELDS = {
    "model_name_or_path", "task_name", "method", "r", "lora_alpha", "lora_dropout", "target_modules",
    "modules_to_save", "max_length", "pad_to_max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
    "learning_rate", "weight_decay", "upper_learning_rate", "upper_weight_decay", "max_steps", "retrain_max_steps",
    "retrain_learning_rate", "retrain_weight_decay", "hypergradient", "unroll_steps", "darts_alpha",
    "neumann_iterations", "neumann_alpha", "cg_iterations", "orth_reg", "upper_fraction", "lr_scheduler_type",
    "warmup_steps", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "eval_strategy", "eval_steps",
    "save_steps", "logging_steps", "seed",
}


class Config:
    """One config file as run_glue.py reads it: the five argument dataclasses, attribute access over all of them."""

    def __init__(self, path: Path) -> None:
        self.groups = run_glue.parse_args(["--config", str(path), "--output_dir", "unused"])

    def __getattr__(self, name):
        for group in self.groups:
            if name in getattr(group, "__dataclass_fields__", {}):
                value = getattr(group, name)
                return getattr(value, "value", value)  # enums (lr_scheduler_type, eval_strategy) as strings
        return getattr(self.groups[-1], name)  # BiDoRATrainingArguments' properties and methods (upper_lr, ...)


def _check_original(cfg, model, task, r, row):
    max_len, batch, lr, wd, upper_wd, iters, retrain = row
    assert cfg.model_name_or_path == model and cfg.task_name == task
    assert (cfg.max_length, cfg.per_device_train_batch_size, cfg.max_steps) == (max_len, batch, iters)
    assert cfg.learning_rate == pytest.approx(lr, rel=1e-12) and cfg.upper_lr == pytest.approx(lr, rel=1e-12)
    assert cfg.weight_decay == pytest.approx(wd) and cfg.upper_weight_decay == pytest.approx(upper_wd)
    assert cfg.upper_wd == pytest.approx(upper_wd)
    if retrain is None:
        assert cfg.retrain_max_steps == 0
    else:
        assert cfg.retrain_max_steps == retrain[1]
        assert (cfg.retrain_learning_rate or cfg.learning_rate) == pytest.approx(retrain[0], rel=1e-12)
        assert cfg.retrain_weight_decay == pytest.approx(retrain[2])
    assert (cfg.r, cfg.lora_alpha) == (r, 2 * r)
    assert cfg.target_modules == ["query", "value"] and cfg.modules_to_save == ["classifier"]
    assert cfg.pad_to_max_length is True and cfg.lora_dropout == 0.0
    assert cfg.get_warmup_steps(iters) == math.ceil(0.1 * iters)  # 10% warmup, as a ratio
    for key, value in SHARED.items():
        assert getattr(cfg, key) == (pytest.approx(value) if isinstance(value, float) else value), key


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared reference not available")
@pytest.mark.parametrize("model", ["roberta-base", "roberta-large"])
@pytest.mark.parametrize("task", TASKS)
def test_original_configs_match_table(model, task):
    name = f"{model.replace('-', '_')}_{task}"
    _check_original(Config(CONFIGS / f"{name}.yaml"), model, task, r=4, row=reference_rows()[model, task])


@pytest.mark.parametrize("model,task", list(TYPED_IN), ids=[f"{m}-{t}" for m, t in TYPED_IN])
def test_original_configs_match_the_typed_in_rows(model, task):
    """Runs without the shared references; where they are mounted, the typed-in row must be the document's."""
    if REFERENCE.exists():
        assert reference_rows()[model, task] == TYPED_IN[model, task]
    name = f"{model.replace('-', '_')}_{task}"
    _check_original(Config(CONFIGS / f"{name}.yaml"), model, task, r=4, row=TYPED_IN[model, task])


def test_the_reference_table_is_complete():
    if not REFERENCE.exists():
        pytest.skip("shared reference not available")
    assert set(reference_rows()) == {(m, t) for m in ("roberta-base", "roberta-large") for t in TASKS}


@pytest.mark.parametrize("r", [8, 16])
def test_table2_rank_configs(r):
    names = {p.stem.removeprefix(f"roberta_base_r{r}_") for p in CONFIGS.glob(f"roberta_base_r{r}_*.yaml")}
    assert names == TABLE2_TASKS
    rows = reference_rows() or TYPED_IN
    for task in sorted(TABLE2_TASKS):
        if ("roberta-base", task) in rows:
            _check_original(Config(CONFIGS / f"roberta_base_r{r}_{task}.yaml"), "roberta-base", task, r=r,
                            row=rows["roberta-base", task])


def test_deberta_configs_are_ours_and_sane():
    for task in TASKS:
        path = CONFIGS / f"deberta_v2_xxlarge_{task}.yaml"
        text = path.read_text()
        assert "OUR settings, not the authors'" in text
        cfg = Config(path)
        assert cfg.model_name_or_path == "microsoft/deberta-v2-xxlarge" and cfg.task_name == task
        assert cfg.target_modules == ["query_proj", "value_proj"] and "classifier" in cfg.modules_to_save
        assert cfg.method == "bidora" and cfg.max_steps > 0 and 0 < cfg.learning_rate < 1e-3


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
        assert "ROUGH ESTIMATE" in text and 'source "$ROOT/examples/python.sh"' in text and '"${PY[@]}"' in text
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_script_loops_over_seeds_from_any_cwd(tmp_path):
    script = SCRIPTS / "roberta_base_rte.sh"
    env = dict(os.environ, SEEDS="0 3", OUTPUT_ROOT=str(tmp_path / "out"), PYTHON=sys.executable, DRY_RUN="1")
    r = subprocess.run(["bash", str(script), "--max_steps", "5"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    runs = [shlex.split(line)[2:] for line in r.stdout.splitlines() if line.startswith("[dry run] ")]
    assert len(runs) == 2
    root = NLU.parents[1]
    for seed, words in zip(("0", "3"), runs):
        assert words[0] == sys.executable
        assert Path(words[1]).resolve() == root / "examples" / "NLU" / "run_glue.py"
        assert Path(words[words.index("--config") + 1]).resolve() == CONFIGS / "roberta_base_rte.yaml"
        assert words[words.index("--seed") + 1] == seed
        assert words[words.index("--output_dir") + 1] == str(tmp_path / "out" / "roberta_base_rte" / f"seed{seed}")
        assert words[-2:] == ["--max_steps", "5"]
    assert "roberta-base ~500 MB" in r.stdout and "h per seed" in r.stdout
    assert "overridden on the command line: --max_steps 5" in r.stdout  # the banner's settings are the config's


@pytest.mark.parametrize("venv", [True, False])
def test_scripts_use_the_project_venv_when_it_exists(tmp_path, venv):
    """After `make setup` a bare `python` has no torch: the scripts take <repo>/.venv/bin/python, else python3."""
    root = tmp_path / "repo"
    (root / "examples").mkdir(parents=True)
    (root / "examples" / "python.sh").write_text((NLU.parent / "python.sh").read_text())
    if venv:
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "python").write_text("#!/bin/sh\n")
        (root / ".venv" / "bin" / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    r = subprocess.run(["bash", "-c", f'source "{root}/examples/python.sh"; echo "${{PY[@]}}"'], env=env,
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.strip() == (str(root / ".venv" / "bin" / "python") if venv else "python3")
