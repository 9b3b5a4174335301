"""The examples' shared modules: examples/grid.py (per-method flags, the method × seed runner, with a stand-in runner)
and examples/run_common.py (what the training scripts share)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grid
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for run_glue.py: records its argv in OUTPUT_DIR/argv.json and writes results.json; fails for seed 13.
FAKE_RUNNER = textwrap.dedent(
    """
    import json, os, sys
    argv = sys.argv[1:]
    out = argv[argv.index("--output_dir") + 1]
    os.makedirs(out, exist_ok=True)
    runs = os.path.join(out, "argv.json")
    history = json.load(open(runs)) if os.path.exists(runs) else []
    json.dump(history + [argv], open(runs, "w"))
    if argv[argv.index("--seed") + 1] == "13":
        sys.exit("error: seed 13 fails")
    json.dump({"threads": os.environ.get("OMP_NUM_THREADS")}, open(os.path.join(out, "results.json"), "w"))
    """
)


@pytest.fixture()
def runner(tmp_path):
    path = tmp_path / "fake_runner.py"
    path.write_text(FAKE_RUNNER)
    return path


def calls(folder: Path) -> list[list[str]]:
    return json.loads((folder / "argv.json").read_text())


# The flags each script wrote by hand before grid.py (the demo, run_antiberty_acp.sh, esm2_table4_common.sh, the
# study's plan.py), written out here as the reference: as sets of (flag, value) pairs, since their order differed.
@pytest.mark.parametrize("method,protocol,kw,expected", [
    ("lora", "all-of-train", {}, {"--upper_fraction": "0", "--retrain_max_steps": "0"}),
    ("dora", "all-of-train", {"steps": 10, "retrain_steps": 10},
     {"--upper_fraction": "0", "--retrain_max_steps": "0", "--max_steps": "10"}),
    ("bidora", "all-of-train", {"steps": 10, "retrain_steps": 10}, {"--max_steps": "10", "--retrain_max_steps": "10"}),
    ("ft", "all-of-train", {"steps": 93, "search_steps": 31, "retrain_steps": 93, "ft_lr": "5e-5"},
     {"--max_steps": "93", "--learning_rate": "5e-5", "--upper_fraction": "0", "--retrain_max_steps": "0"}),
    ("bidora", "all-of-train", {"steps": 93, "search_steps": 31, "retrain_steps": 93, "ft_lr": "5e-5"},
     {"--max_steps": "31", "--retrain_max_steps": "93"}),
    ("ft", "held-out", {"steps": 4, "retrain_steps": 5, "ft_lr": "2e-5"},
     {"--max_steps": "4", "--learning_rate": "2e-5"}),
    ("lora", "held-out", {"steps": 4, "retrain_steps": 5, "ft_lr": "2e-5"}, {"--max_steps": "4"}),
    ("bidora", "held-out", {"steps": 4, "retrain_steps": 5}, {"--max_steps": "4", "--retrain_max_steps": "5"}),
    ("lora", "held-out", {"ft_lr": "1e-4", "adapter_lr": "1e-3"}, {"--learning_rate": "1e-3"}),
])
def test_method_flags_equal_what_each_script_wrote_by_hand(method, protocol, kw, expected):
    flags = grid.method_flags(method, protocol, **kw)
    assert len(flags) % 2 == 0
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs == expected and len(pairs) == len(flags) // 2  # no flag twice


def test_the_study_baseline_flags_are_the_recorded_ones():
    # results/study cell.json files record these verbatim ("plan_flags"): the order is part of the record
    assert grid.ALL_OF_TRAIN == ("--upper_fraction", "0", "--retrain_max_steps", "0")
    cells = ROOT / "results/estimators/cpu/rt-n200"
    dora = json.loads((cells / "dora/seed0/cell.json").read_text())["plan_flags"]
    assert dora[-6:] == [*grid.ALL_OF_TRAIN, "--eval_strategy", "no"]
    bidora = json.loads((cells / "bidora/seed0/cell.json").read_text())["plan_flags"]
    i = bidora.index("--retrain_max_steps")
    assert bidora[i:i + 2] == grid.method_flags("bidora", retrain_steps=int(bidora[i + 1]))


@pytest.mark.parametrize("script", ["NER/run_ner.py", "NLG/run_clm.py"])
def test_runners_without_retraining_accept_their_all_of_train_flags(script, tmp_path, capsys):
    """run_ner.py and run_clm.py have no --retrain_max_steps: the grid leaves it out for them (their own parsers are
    the reference) and refuses --retrain-steps with a sentence."""
    runner = ROOT / "examples" / script
    assert runner.name in grid.WITHOUT_RETRAINING
    module = __import__(runner.stem)
    assert grid.main([str(runner), "--out", str(tmp_path), "--methods", "lora bidora", "--dry-run"]) == 0
    commands = [line.split() for line in capsys.readouterr().out.splitlines() if str(runner) in line]
    lora = commands[0][commands[0].index(str(runner)) + 1:]
    assert lora[lora.index("--upper_fraction") + 1] == "0" and "--retrain_max_steps" not in lora
    data = ["--train_file", str(tmp_path / "train.txt"), "--model_name_or_path", "m"]
    args = module.parse_args([*lora, *data])[-1]
    assert args.upper_fraction == 0
    with pytest.raises(SystemExit):  # what the grid would have passed before: refused by the runner's parser
        module.parse_args([*lora, "--retrain_max_steps", "0", *data])
    assert "unrecognized arguments: --retrain_max_steps" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no retraining phase"):
        grid.method_flags("bidora", retrain_steps=3, retraining=False)
    assert grid.main([str(runner), "--out", str(tmp_path), "--methods", "bidora", "--retrain-steps", "3",
                      "--dry-run"]) == 2
    assert "no retraining phase" in capsys.readouterr().err


def test_bad_methods_protocols_and_lists_are_sentences():
    with pytest.raises(ValueError, match="unknown method 'qlora'"):
        grid.method_flags("qlora")
    with pytest.raises(ValueError, match="unknown protocol"):
        grid.method_flags("lora", "all")
    with pytest.raises(ValueError, match="without repeats"):
        grid.plan_grid("x", ["lora"], [0, 0])
    with pytest.raises(ValueError, match="without repeats"):
        grid.plan_grid("x", ["lora", "lora"], [0])


def test_order_once_and_folders(tmp_path):
    runs = grid.plan_grid(tmp_path, ["bidora", "base", "lora"], [0, 1], once=["base"])
    assert [(r.method, r.seed) for r in runs] == [("bidora", 0), ("base", 0), ("lora", 0), ("bidora", 1), ("lora", 1)]
    by_method = grid.plan_grid(tmp_path, ["bidora", "base", "lora"], [0, 1], once=["base"], order="method")
    assert [(r.method, r.seed) for r in by_method] == [("bidora", 0), ("bidora", 1), ("base", 0), ("lora", 0),
                                                       ("lora", 1)]
    assert runs[0].out == tmp_path / "bidora" / "seed0"
    assert [r.out for r in grid.plan_grid(tmp_path, None, [3])] == [tmp_path / "seed3"]


def test_cli_runs_the_grid_skips_finished_runs_and_puts_common_flags_last(tmp_path, runner):
    out = tmp_path / "out"
    argv = [str(runner), "--out", str(out), "--methods", "lora,bidora", "--seeds", "0 1", "--steps", "7",
            "--retrain-steps", "9", "--", "--config", "c.yaml", "--max_steps", "3"]
    assert grid.main(argv) == 0
    lora = calls(out / "lora" / "seed1")
    assert lora == [["--method", "lora", "--seed", "1", "--output_dir", str(out / "lora" / "seed1"),
                     "--upper_fraction", "0", "--retrain_max_steps", "0", "--max_steps", "7",
                     "--config", "c.yaml", "--max_steps", "3"]]  # the user's --max_steps comes last: it wins
    assert calls(out / "bidora" / "seed0")[0][6:10] == ["--max_steps", "7", "--retrain_max_steps", "9"]
    # the same command again: every run is finished and skipped; --finished redo asks the runner to overwrite
    assert grid.main(argv) == 0 and len(calls(out / "lora" / "seed1")) == 1
    assert grid.main([*argv[:-5], "--finished", "redo", *argv[-5:]]) == 0
    assert calls(out / "lora" / "seed1")[1][-1] == "--overwrite_output_dir"
    # --overwrite_output_dir given to the runner directly is not defeated by the skip
    assert grid.main([*argv, "--overwrite_output_dir"]) == 0 and len(calls(out / "lora" / "seed1")) == 3


def test_a_failing_run_stops_the_grid_with_status_1(tmp_path, runner, capsys):
    out = tmp_path / "out"
    assert grid.main([str(runner), "--out", str(out), "--methods", "dora", "--seeds", "13 2"]) == 1
    assert "dora seed 13: FAILED" in capsys.readouterr().err
    assert not (out / "dora" / "seed2").exists()  # nothing after the failure
    assert grid.main([str(runner), "--out", str(out), "--methods", "qlora"]) == 2
    assert "unknown method 'qlora'" in capsys.readouterr().err


def test_parallel_jobs_log_to_files_and_set_threads(tmp_path, runner):
    out = tmp_path / "out"
    assert grid.main([str(runner), "--out", str(out), "--methods", "lora dora", "--seeds", "0 1", "--jobs", "2",
                      "--threads", "1"]) == 0
    for method in ("lora", "dora"):
        for seed in (0, 1):
            assert json.loads((out / method / f"seed{seed}" / "results.json").read_text()) == {"threads": "1"}
            assert (out / method / f"seed{seed}.log").read_text().startswith("$ ")
    assert grid.main([str(runner), "--out", str(out), "--methods", "lora", "--seeds", "13", "--jobs", "2"]) == 1


def test_dry_run_prints_commands_on_stdout_and_runs_nothing(tmp_path, runner):
    proc = subprocess.run([sys.executable, str(ROOT / "examples/grid.py"), str(runner), "--out", str(tmp_path / "o"),
                           "--methods", "ft", "--ft-lr", "2e-5", "--dry-run", "--", "--x", "a b"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    line, = proc.stdout.splitlines()
    assert line.startswith("[dry run] ") and line.endswith("--learning_rate 2e-5 --x 'a b'")
    assert not (tmp_path / "o").exists()


def test_position_limit_of_the_encoders_is_what_their_positions_can_read():
    """run_glue and run_ner share run_common.position_limit; the references are the published models' limits."""
    from run_common import position_limit
    from transformers import BertConfig, DebertaV2Config, MPNetConfig, RobertaConfig

    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # roberta-base
    assert position_limit(MPNetConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # all-mpnet-base-v2
    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(DebertaV2Config(position_biased_input=False)) is None  # relative positions only
    assert position_limit(BertConfig(position_embedding_type="relative_key")) is None


def test_skipping_a_finished_run_completes_its_interrupted_cleanup(tmp_path, runner, capsys):
    """A kill inside a runner's final clean-up leaves checkpoints beside results.json: the grid's skip removes them
    (the run recorded keep_checkpoints false), and only them."""
    out = tmp_path / "out"
    argv = [str(runner), "--out", str(out), "--methods", "lora", "--seeds", "0"]
    assert grid.main(argv) == 0
    run = out / "lora" / "seed0"
    (run / "run_config.json").write_text(json.dumps({"keep_checkpoints": False}))
    for name in ("checkpoint-3", "retrain"):
        (run / name).mkdir()
    (run / "search_state.json").write_text("{}")
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    assert grid.main([*argv, "--dry-run"]) == 0 and sorted(p.name for p in run.iterdir()) == before  # reads only
    assert grid.main(argv) == 0
    assert "clean-up had been interrupted: removed checkpoint-3, retrain, search_state.json" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == sorted(set(before) - {"checkpoint-3", "retrain",
                                                                          "search_state.json"})
    assert len(calls(run)) == 1  # skipped, not run again


def test_a_finished_run_made_with_other_settings_is_not_skipped_silently(tmp_path, runner, capsys):
    out = tmp_path / "out"
    base = [str(runner), "--out", str(out), "--methods", "lora", "--seeds", "0 1", "--steps", "4"]
    assert grid.main(base) == 0
    assert json.loads((out / "lora" / "seed0.grid.json").read_text())["settings"][0] == runner.name
    capsys.readouterr()
    # the same settings: skipped; other steps or other flags after --: the grid stops before running anything
    assert grid.main(base) == 0 and "skip lora seed 0" in capsys.readouterr().err
    for other in ([*base[:-1], "6"], [*base, "--", "--learning_rate", "1e-4"]):
        assert grid.main(other) == 1
        err = capsys.readouterr().err
        assert "lora seed 0: the finished run" in err and "other settings" in err and "OVERWRITE=1" in err
        assert len(calls(out / "lora" / "seed0")) == 1 and len(calls(out / "lora" / "seed1")) == 1
    assert grid.main([*base[:-1], "6", "--finished", "redo"]) == 0  # redone, and recorded with the new settings
    assert grid.main([*base[:-1], "6"]) == 0 and len(calls(out / "lora" / "seed0")) == 2


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "a b"], "--seeds takes whole numbers"),
    (["--methods", "lora", "--once", "base"], "--once base: every such method must also be in --methods"),
    (["--steps", "0"], "--steps must be positive"),
    (["--methods", "lora", "--", "--seed", "7"], "--seed after -- would override every run's own value"),
    (["--", "--output_dir=/tmp/x"], "--output_dir after -- would override"),
    (["--python", "no-such-python-here"], "no such interpreter"),
])
def test_bad_grid_commands_are_one_sentence_and_status_2(tmp_path, runner, capsys, argv, message):
    cut = argv.index("--") if "--" in argv else len(argv)
    assert grid.main([str(runner), "--out", str(tmp_path / "o"), *argv[:cut], *argv[cut:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_the_training_scripts_bad_flag_is_one_line(capsys):
    """run_glue, run_ner and run_clm parse through run_common.script_parser: an unknown option is one sentence, not
    argparse's usage of every TrainingArguments option above it."""
    import run_ner

    with pytest.raises(SystemExit) as stop:
        run_ner.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--no_such_flag"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.endswith(": error: unrecognized arguments: --no_such_flag (--help lists every option)\n")


@pytest.mark.parametrize("recorded, removed", [({"keep_checkpoints": False}, True), ({"keep_checkpoints": True}, False),
                                               (None, False)])
def test_a_finished_run_whose_cleanup_a_kill_interrupted_is_cleaned_then_refused(tmp_path, recorded, removed):
    """run_ner / run_clm (check_output_dir) and run_glue (run_helpers.inspect_output_dir, with its own leftovers):
    the leftovers go only when the run's run_config.json says it did not keep its checkpoints."""
    import run_helpers
    from run_common import RunError, check_output_dir

    for script, leftovers in (("ner", ["checkpoint-4", "checkpoint-2"]),
                              ("glue", ["checkpoint-3", "retrain", "search_adapter", "search_state.json"])):
        out = tmp_path / script
        (out / "adapter").mkdir(parents=True)
        for name in leftovers:
            if "." in name:
                (out / name).write_text("{}")
            else:
                (out / name).mkdir()
                (out / name / "trainer_state.json").write_text("{}")
        (out / "results.json").write_text("{}")
        if recorded is not None:
            (out / "run_config.json").write_text(json.dumps(recorded))
        with pytest.raises(RunError, match="already holds a finished run") as err:
            check_output_dir(out, False) if script == "ner" else run_helpers.inspect_output_dir(out, False)
        assert ("clean-up had been interrupted" in str(err.value)) == removed
        left = sorted(p.name for p in out.iterdir())
        kept = ["adapter", "results.json"] + (["run_config.json"] if recorded is not None else [])
        assert left == sorted(kept if removed else kept + leftovers)


@pytest.mark.parametrize(
    ("overwrite", "dry_run", "flags", "dry"),
    [
        (None, None, "--finished skip", ""),
        ("0", "0", "--finished skip", ""),
        ("1", None, "--finished redo", ""),
        (None, "1", "--finished skip --dry-run", "echo [dry run]"),
        ("1", "1", "--finished redo --dry-run", "echo [dry run]"),
    ],
)
def test_grid_env_turns_the_switches_into_grid_flags(overwrite, dry_run, flags, dry):
    env = {k: v for k, v in os.environ.items() if k not in ("OVERWRITE", "DRY_RUN")}
    env.update({k: v for k, v in (("OVERWRITE", overwrite), ("DRY_RUN", dry_run)) if v is not None})
    script = f'set -euo pipefail; source "{ROOT}/examples/grid_env.sh"; echo "${{GRID_FLAGS[*]}}|${{DRY[*]}}"'
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{flags}|{dry}"


@pytest.mark.parametrize(("name", "value"), [("OVERWRITE", "yes"), ("DRY_RUN", "true"), ("OVERWRITE", "2")])
def test_grid_env_refuses_other_values(name, value):
    """OVERWRITE=yes used to be read as 0: the finished runs were kept without a word."""
    env = dict(os.environ, **{name: value})
    r = subprocess.run(["bash", "-c", f'source "{ROOT}/examples/grid_env.sh"; echo reached'], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "reached" not in r.stdout
    assert f"{name} must be 0 or 1, not '{value}'" in r.stderr


def test_every_grid_script_takes_its_switches_from_grid_env():
    """One place reads OVERWRITE / DRY_RUN; the demo alone redoes every run by design and has no switches."""
    scripts = [p for p in (ROOT / "examples").rglob("*.sh")
               if "examples/grid.py" in p.read_text() and p.name != "grid_env.sh"]
    assert len(scripts) >= 40
    for path in scripts:
        text = path.read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        if path.name == "run_demo.sh":
            assert "grid_env.sh" not in code and "--finished redo" in code
            continue
        assert 'examples/grid_env.sh"' in code and '"${GRID_FLAGS[@]}"' in code, path
        assert "${OVERWRITE" not in code and "${DRY_RUN" not in code, path
