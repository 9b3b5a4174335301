"""The faults of issue 21 (item 4) in run_glue's data path, each checked against a reference built by hand: text
read as missing ("NA", "null") or unquoted (a stray quote), columns that could not be named, a model folder without
tokenizer files, an undecodable file; plus transformers' all_results.json and the checkpoint search."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from transformers.trainer_utils import get_last_checkpoint

from tests.helpers import write_tiny_roberta

ROOT = Path(__file__).resolve().parents[1]
import glue_data as gd  # noqa: E402
import run_glue  # noqa: E402
import run_helpers  # noqa: E402

# Values pandas reads as missing by default, numbers-as-text, quotes, and the empty string.
TRICKY = ["NA", "null", "None", "N/A", "nan", "#N/A", "", "007", "1.50", 'he said "hi', '"quoted" start', "end \""]
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_steps", "2", "--save_steps", "2",
        "--logging_steps", "1", "--max_length", "32", "--seed", "0", "--no_token_cache", "--disable_tqdm", "true",
        "--snapshots", "0", "--lora_r", "2", "--lora_alpha", "4", "--method", "lora"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_roberta(tmp_path_factory.mktemp("tiny") / "model")


def test_csv_text_stays_text(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["sentence", "label"], *[[t, i % 2] for i, t in enumerate(TRICKY)]])
    with open(path, newline="", encoding="utf-8") as f:  # the reference: the csv module, every field a string
        expected = [row["sentence"] for row in csv.DictReader(f)]
    assert expected == TRICKY
    _, splits = gd.load_raw_splits("sst2", train_file=path)
    assert splits["train"]["sentence"] == expected
    # written by hand, with a byte-order mark: quotes inside unquoted fields are text, as for the csv module
    hand = tmp_path / "hand.csv"
    hand.write_bytes('\ufeffsentence,label\nhe said "hi,1\nit\'s 5" tall,0\nNA,1\n'.encode())
    with open(hand, newline="", encoding="utf-8-sig") as f:
        expected = [row["sentence"] for row in csv.DictReader(f)]
    assert expected == ['he said "hi', 'it\'s 5" tall', "NA"]
    assert gd.load_raw_splits("sst2", train_file=hand)[1]["train"]["sentence"] == expected


def test_tsv_text_stays_text_quotes_included(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(TRICKY)), encoding="utf-8")
    expected = [line.split("\t")[0] for line in path.read_text(encoding="utf-8").splitlines()[1:]]  # by hand
    assert expected == TRICKY
    _, splits = gd.load_raw_splits("sst2", train_file=path)
    assert splits["train"]["sentence"] == expected
    assert splits["train"]["label"] == [i % 2 for i in range(len(TRICKY))]


def test_named_and_inferred_columns(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("id,review,stars\n0,good movie,positive\n1,bad plot,negative\n2,NA,1\n")
    with pytest.raises(ValueError, match="missing required column 'sentence'.*--text_column / --label_column"):
        gd.load_raw_splits("sst2", train_file=path)
    task, splits = gd.load_raw_splits("sst2", train_file=path, text_columns=["review"], label_column="stars")
    assert task.text_columns == ("review",) and task.name == "sst2"
    assert splits["train"].to_dict() == {"review": ["good movie", "bad plot", "NA"], "label": [1, 0, 1]}
    task, splits = gd.load_raw_splits(None, train_file=path, label_column="stars")  # no task: all inferred
    assert task.text_columns == ("review",) and task.label_names == ("1", "negative", "positive")
    assert task.name == gd.CUSTOM and splits["train"]["label"] == [2, 1, 0]
    with pytest.raises(ValueError, match="no label column 'label'.*--label_column"):
        gd.load_raw_splits(None, train_file=path)
    pair = tmp_path / "pair.jsonl"
    pair.write_text('{"sentence1": "a", "sentence2": "b", "label": 2.5}\n{"sentence1": "c", "sentence2": "d", '
                    '"label": 1}\n')
    task, _ = gd.load_raw_splits(None, train_file=pair)
    assert task.text_columns == ("sentence1", "sentence2") and task.is_regression  # numbers, not all whole
    assert gd.infer_text_columns(["idx", "premise", "hypothesis", "label"]) == ("premise", "hypothesis")
    with pytest.raises(ValueError, match="cannot tell the text columns among a, b, c, label"):
        gd.infer_text_columns(["a", "b", "c", "label"])


def test_a_run_without_task_name_on_named_columns(model, tmp_path, capsys):
    rows = [(f"{w} movie", "fresh" if w in ("good", "great") else "rotten")
            for w in ["good", "bad", "great", "awful", "fine"] * 6]
    for name, part in (("train", rows[:20]), ("dev", rows[20:])):
        (tmp_path / f"{name}.csv").write_text("review,verdict\n" + "".join(f"{t},{y}\n" for t, y in part))
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(model), "--output_dir", str(out), "--train_file", str(tmp_path / "train.csv"),
            "--validation_file", str(tmp_path / "dev.csv"), "--test_file", str(tmp_path / "dev.csv"), "--do_predict",
            "--text_column", "review", "--label_column", "verdict", *FAST]
    assert run_glue.main(argv) == 0
    printed = capsys.readouterr().out
    assert "no --task_name, inferred from train: review -> verdict, 2 classes (fresh, rotten)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "custom" and set(results["eval"]) == {"heldout", "validation", "test"}
    assert results["config"]["text_column"] == ["review"] and results["config"]["task_name"] is None
    predictions = (out / "predict_results_test.txt").read_text().splitlines()
    assert {line.split("\t")[1] for line in predictions[1:]} <= {"fresh", "rotten"}
    # transformers' all_results.json: the reported metrics, named as the Trainer names them, and the train summary
    all_results = json.loads((out / "all_results.json").read_text())
    expected = {f"eval_{split}_{m}": v for split, values in results["eval"].items() for m, v in values.items()}
    assert {k: v for k, v in all_results.items() if k.startswith("eval_")} == expected
    assert all_results["train_samples"] == results["data_sizes"]["lower"] and "train_runtime" in all_results


def fails(capsys, argv, message):
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_a_model_folder_without_tokenizer_files_is_refused(model, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, bare / name)
    data = tmp_path / "train.csv"
    data.write_text("sentence,label\ngood movie,1\nbad movie,0\n")
    out = tmp_path / "out"
    fails(capsys, ["--model_name_or_path", str(bare), "--task_name", "sst2", "--train_file", str(data),
                   "--output_dir", str(out), *FAST], f"error: --model_name_or_path {bare} has no tokenizer files")
    assert not out.exists()


def test_a_file_that_is_not_utf8_is_named(model, tmp_path, capsys):
    latin = tmp_path / "latin.csv"
    latin.write_bytes(("sentence,label\n" + "good movie,1\n" * 3000 + "caf\xe9 movie,0\n").encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{latin} is not UTF-8 text \(byte 0xe9 on line 3002\)"):
        gd.read_file(latin)  # past the first block: the reader's own error, mapped to the file and line
    early = tmp_path / "early.tsv"
    early.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{early} is not UTF-8 text \(byte 0xe9 on line 2\)"):
        gd.read_file(early)
    lines = tmp_path / "latin.jsonl"
    lines.write_bytes('{"sentence": "caf\xe9", "label": 1}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{lines} is not UTF-8 text"):
        gd.read_file(lines)
    mixed = tmp_path / "mixed.csv"  # UTF-8 up to line 4: characters cut by the blocks must not count as errors
    mixed.write_bytes("sentence,label\ncafé ü,1\nnaïve €,0\n".encode() + "caf\xe9,1\n".encode("latin-1"))
    for block in (1, 2, 3, 5, 64):
        with pytest.raises(ValueError, match=r"byte 0xe9 on line 4\)"):
            gd.check_utf8(mixed, block=block)
    out = tmp_path / "out"
    fails(capsys, ["--model_name_or_path", str(model), "--task_name", "sst2", "--train_file", str(latin),
                   "--output_dir", str(out), *FAST], f"error: {latin} is not UTF-8 text (byte 0xe9 on line 3002)")
    assert not out.exists()


def test_the_task_and_columns_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_glue.parse_args(["--model_name_or_path", "m", "--output_dir", "o"])
    assert "--task_name is needed for a hub dataset" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("train_file: t.csv\ntext_column: review\n")  # one string in YAML: one column
    _, data_args, *_ = run_glue.parse_args(["--config", str(config), "--model_name_or_path", "m", "--output_dir", "o"])
    assert data_args.text_column == ["review"] and data_args.task is None
    with pytest.raises(SystemExit):
        run_glue.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--train_file", "t.csv",
                             "--text_column", "a", "b", "c"])
    assert "--text_column takes one or two column names, got 3" in capsys.readouterr().err


def test_incomplete_checkpoints_are_skipped(tmp_path, capsys):
    def checkpoint(step: int, *files: str) -> None:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text(json.dumps({"global_step": step}))

    checkpoint(2, "trainer_state.json", "selection.json")  # complete
    checkpoint(4, "selection.json")  # killed before trainer_state.json (the Trainer writes it last)
    checkpoint(6, "selection.json")
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text("")  # killed while writing it
    checkpoint(8, "trainer_state.json")  # killed before the selection callback wrote its file
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-8")  # transformers' helper alone would take it
    found = run_helpers.find_checkpoint(tmp_path, ("trainer_state.json", "selection.json"))
    assert found == tmp_path / "checkpoint-2"
    printed = capsys.readouterr().out
    assert all(f"checkpoint-{n}" in printed for n in (4, 6, 8)) and "skipping" in printed
    assert run_helpers.find_checkpoint(tmp_path / "none") is None
