"""GLUE data through ``datasets``: local-file reading and checks, the hub path, tokenisation, the token cache, and the
batches transformers' ``DataCollatorWithPadding`` makes of them.

Everything offline: tiny GLUE-format files written in tmp_path, a WordLevel tokenizer built from a small vocabulary
(expected token ids are looked up by hand in that vocabulary), and a fake ``datasets.load_dataset`` for the hub path.
The faults of issue 21 (text read as missing, unnamed columns, undecodable files) are in tests/test_glue_datasets.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import glue_data as gd  # noqa: E402
import pytest
import torch
from glue_tasks import get_task  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

WORDS = "the cat sat on a mat dog ran far away he said hi , good bad movie".split()
VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
CLS, SEP, PAD, UNK = 2, 3, 0, 1


def make_tokenizer(token_types: bool = True, vocab: dict | None = None) -> PreTrainedTokenizerFast:
    vocab = vocab or VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    names = ["input_ids", "token_type_ids", "attention_mask"] if token_types else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_input_names=names)


def ids(text: str) -> list[int]:
    """Hand reference: whitespace/punctuation split, vocabulary lookup."""
    return [VOCAB.get(w, UNK) for w in text.replace(",", " , ").split()]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def write_json(path: Path, records: list[dict], lines: bool) -> Path:
    text = "\n".join(json.dumps(r) for r in records) + "\n" if lines else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return path


def load(task, **files):
    return gd.load_raw_splits(task, **files)[1]


def split(task: str, columns: dict, name: str = "train", labels_required: bool = True) -> datasets.Dataset:
    return gd.check_split(get_task(task), datasets.Dataset.from_dict(columns), name, labels_required=labels_required)


# ---- loading and checks ---------------------------------------------------------------------------------------------
def test_single_sentence_csv_sst2(tmp_path):
    f = write_csv(tmp_path / "train.csv", ["idx", "sentence", "label"],
                  [[0, 'good movie, "he said"', 1], [1, "bad movie", 0], [2, "the cat", "1"]])
    splits = load("sst2", train_file=f)
    assert list(splits) == ["train"]
    assert splits["train"].to_dict() == {"sentence": ['good movie, "he said"', "bad movie", "the cat"],  # unquoted
                                         "label": [1, 0, 1]}  # other columns are left out


def test_single_sentence_tsv_cola_keeps_quotes(tmp_path):
    f = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [['he said "hi', 1], ["'the cat' sat", 0]])
    raw = load("cola", validation_file=f)["validation"]
    assert raw["sentence"] == ['he said "hi', "'the cat' sat"]  # TSV: no quoting, quote characters are text
    assert raw["label"] == [1, 0]


def test_pair_jsonl_mrpc_and_json_rte_label_names(tmp_path):
    f = write_json(tmp_path / "train.jsonl", [
        {"sentence1": "the cat", "sentence2": "a cat", "label": 1, "idx": 0},
        {"sentence1": "dog ran", "sentence2": "the mat", "label": 0, "idx": 1}], lines=True)
    raw = load("mrpc", train_file=f)["train"]
    assert raw.to_dict() == {"sentence1": ["the cat", "dog ran"], "sentence2": ["a cat", "the mat"], "label": [1, 0]}
    g = write_json(tmp_path / "dev.json", [
        {"sentence1": "a", "sentence2": "b", "label": "not_entailment"},
        {"sentence1": "c", "sentence2": "d", "label": "entailment"},
        {"sentence1": "e", "sentence2": "f", "label": 1.0}], lines=False)
    assert load("rte", validation_file=g)["validation"]["label"] == [1, 0, 1]
    # a .json file in JSON Lines form (what datasets' to_json writes) is read too
    h = write_json(tmp_path / "lines.json", [{"sentence1": "a", "sentence2": "b", "label": 0}], lines=True)
    assert load("rte", validation_file=h)["validation"]["label"] == [0]


def test_regression_stsb(tmp_path):
    f = write_csv(tmp_path / "train.csv", ["sentence1", "sentence2", "label"],
                  [["the cat", "a cat", "4.2"], ["dog", "mat", "0"], ["a", "b", "5.0"]])
    raw = load("stsb", train_file=f)["train"]
    assert raw["label"] == [4.2, 0.0, 5.0]
    ds = gd.tokenize(raw, get_task("stsb"), make_tokenizer(), max_length=16)
    batch = DataCollatorWithPadding(make_tokenizer())([ds[0], ds[1]])
    assert batch["labels"].dtype == torch.float32 and batch["labels"][0].item() == pytest.approx(4.2)


def test_mnli_matched_mismatched_and_unlabelled_test(tmp_path):
    header = ["premise", "hypothesis", "label"]
    train = write_tsv(tmp_path / "train.tsv", header, [["the cat", "a cat", 0], ["dog", "cat", 2], ["a", "b", 1]])
    dev_m = write_csv(tmp_path / "dev_m.csv", header, [["the cat", "a mat", "neutral"], ["x", "y", "contradiction"]])
    dev_mm = write_json(tmp_path / "dev_mm.jsonl", [{"premise": "p", "hypothesis": "h", "label": 0}], lines=True)
    test = write_tsv(tmp_path / "test.tsv", header, [["p", "h", -1], ["q", "r", -1]])
    splits = load("mnli", train_file=train, validation_file=dev_m, validation_mismatched_file=dev_mm, test_file=test)
    assert set(splits) == {"train", "validation_matched", "validation_mismatched", "test_matched"}
    assert splits["train"]["label"] == [0, 2, 1]
    assert splits["validation_matched"]["label"] == [1, 2]
    assert splits["validation_mismatched"]["label"] == [0]
    assert "label" not in splits["test_matched"].column_names  # -1 throughout: unlabelled
    # a test file without a label column is unlabelled too
    nolabel = write_csv(tmp_path / "test2.csv", ["premise", "hypothesis"], [["p", "h"]])
    assert "label" not in load("mnli", test_file=nolabel)["test_matched"].column_names


@pytest.mark.parametrize(
    "task, header, rows, match",
    [
        ("mrpc", ["sentence1", "label"], [["a", 1]], r"missing required column 'sentence2'.*present: sentence1, label"),
        ("sst2", ["sentence"], [["a"]], r"missing required column 'label'"),
        ("sst2", ["sentence", "label"], [["a", 2], ["b", 1], ["c", "2"], ["d", "neutral"]],
         r"3 labels outside the label set of sst2 \(0=negative, 1=positive\): found '2' \(x2\), 'neutral' \(x1\)"),
        ("mnli", ["premise", "hypothesis", "label"], [["a", "b", "-1"]], r"1 labels outside the label set"),
        ("stsb", ["sentence1", "sentence2", "label"], [["a", "b", "high"], ["c", "d", "1"]],
         r"1 non-numeric labels .*row 1: 'high'"),
        ("stsb", ["sentence1", "sentence2", "label"], [["a", "b", "5.5"], ["c", "d", "nan"]],
         r"2 labels outside \[0, 5\]"),
        ("cola", ["sentence", "label"], [], r"no examples"),
    ],
)
def test_bad_content_is_rejected(tmp_path, task, header, rows, match):
    f = write_csv(tmp_path / "train.csv", header, rows)
    with pytest.raises(ValueError, match=match):
        load(task, train_file=f)


def test_bad_files_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--validation_file: file not found: .*nope.tsv"):
        load("rte", validation_file=tmp_path / "nope.tsv")
    ok = write_csv(tmp_path / "ok.csv", ["sentence1", "sentence2", "label"], [["a", "b", 0]])
    with pytest.raises(ValueError, match="only for MNLI"):
        load("rte", validation_mismatched_file=ok)
    parquet = tmp_path / "x.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="unsupported file type '.parquet'"):
        load("rte", train_file=parquet)
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("sentence\tlabel\nthe cat\t1\nsat\t0\textra\n")
    with pytest.raises(ValueError, match=r"ragged.tsv: .*Expected 2 fields in line 3, saw 3"):
        load("sst2", train_file=ragged)
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text('{"sentence": "a", "label": 1}\n{"sentence": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl: .*JSON"):
        load("sst2", train_file=badjson)
    nulls = write_json(tmp_path / "nulls.jsonl", [{"sentence": None, "label": 1}, {"sentence": 3, "label": 0}],
                       lines=True)
    with pytest.raises(ValueError, match="text column 'sentence' has 2 missing or non-string values"):
        load("sst2", train_file=nulls)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        load("sst2", train_file=empty)
    twice = tmp_path / "twice.csv"
    twice.write_text("sentence,label,sentence\na,1,b\n")
    with pytest.raises(ValueError, match=r"twice.csv: the header names the columns \['sentence'\] twice"):
        load("sst2", train_file=twice)
    # a test file mixing real labels and -1 is neither labelled nor unlabelled
    mixed = write_csv(tmp_path / "test.csv", ["sentence", "label"], [["a", 1], ["b", -1]])
    with pytest.raises(ValueError, match="1 labels outside the label set"):
        load("sst2", test_file=mixed)


def test_hub_path_with_fake_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, cache_dir=None, **kwargs):
        calls.append((path, name))
        return datasets.DatasetDict({
            "train": datasets.Dataset.from_dict({"question": ["q1", "q2"], "sentence": ["s1", "s2"],
                                                 "label": [0, 1], "idx": [0, 1]}),
            "validation": datasets.Dataset.from_dict({"question": ["q"], "sentence": ["s"], "label": [1],
                                                      "idx": [0]}),
            "test": datasets.Dataset.from_dict({"question": ["q"], "sentence": ["s"], "label": [-1], "idx": [0]}),
        })

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task, splits = gd.load_raw_splits("qnli")
    assert calls == [("nyu-mll/glue", "qnli")] and task.name == "qnli"
    assert splits["train"].to_dict() == {"question": ["q1", "q2"], "sentence": ["s1", "s2"], "label": [0, 1]}
    assert splits["validation"]["label"] == [1] and "label" not in splits["test"].column_names
    with pytest.raises(ValueError, match="give --task_name for a hub dataset"):
        gd.load_raw_splits(None)
    with pytest.raises(ValueError, match="'protein_regression' has no hub dataset"):
        gd.load_raw_splits("protein_regression")


# ---- tokenisation and cache -----------------------------------------------------------------------------------------
def test_tokenize_single_and_pair_against_vocab():
    raw = split("sst2", {"sentence": ["the cat sat", "dog ran far away zebra"], "label": [1, 0]})
    ds = gd.tokenize(raw, get_task("sst2"), make_tokenizer(token_types=False), max_length=32)
    assert len(ds) == 2 and set(ds.column_names) == {"input_ids", "attention_mask", "label"}
    assert ds[0]["input_ids"] == [CLS, *ids("the cat sat"), SEP]
    assert ds[1]["input_ids"] == [CLS, *ids("dog ran far away zebra"), SEP]  # zebra -> [UNK]
    assert ds[1]["input_ids"][-2] == UNK and ds[0]["attention_mask"] == [1] * 5 and ds[0]["label"] == 1

    pair = split("mrpc", {"sentence1": ["the cat"], "sentence2": ["a mat , he said"], "label": [0]})
    item = gd.tokenize(pair, get_task("mrpc"), make_tokenizer(), max_length=32)[0]
    a, b = ids("the cat"), ids("a mat , he said")
    assert item["input_ids"] == [CLS, *a, SEP, *b, SEP]
    assert item["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)


def test_truncation_and_space_residues():
    task = get_task("sst2")
    raw = split("sst2", {"sentence": ["the cat sat on a mat"], "label": [1]})
    assert gd.tokenize(raw, task, make_tokenizer(), max_length=5)[0]["input_ids"] == [CLS, *ids("the cat sat"), SEP]
    # pairs: longest first. 6 + 2 words, budget 7 - 3 specials = 4 -> the long side is cut to 2
    pair = split("rte", {"sentence1": ["the cat sat on a mat"], "sentence2": ["dog ran"], "label": [0]})
    item = gd.tokenize(pair, get_task("rte"), make_tokenizer(), max_length=7)[0]
    assert item["input_ids"] == [CLS, *ids("the cat"), SEP, *ids("dog ran"), SEP]
    letters = make_tokenizer(vocab={**VOCAB, "M": 30, "K": 31, "V": 32})
    residues = split("sst2", {"sentence": ["MK V"], "label": [0]})
    assert gd.tokenize(residues, task, letters, 8, space_residues=True)[0]["input_ids"] == [CLS, 30, 31, 32, SEP]


def _arrow_files(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*.arrow")}


def test_token_cache_hits_and_invalidation(tmp_path):
    cache = str(tmp_path / "cache")
    f = write_csv(tmp_path / "train.csv", ["sentence", "label"], [["the cat sat", 1], ["dog ran", 0]])

    def run(max_length=16, vocab=None):
        return gd.load_glue_datasets("sst2", make_tokenizer(vocab=vocab), max_length, train_file=f, cache=True,
                                     cache_dir=cache)[1]["train"]

    first = run()
    files = _arrow_files(tmp_path / "cache")
    assert first.cache_files and len(files) == 2  # the parsed file and its tokens
    again = run()
    assert again.cache_files == first.cache_files and _arrow_files(tmp_path / "cache") == files  # served from cache
    assert again.to_dict() == first.to_dict()
    run(max_length=8)  # another max_length: tokenised anew
    assert len(_arrow_files(tmp_path / "cache")) == 3
    swapped = run(vocab=dict(VOCAB, cat=VOCAB["dog"], dog=VOCAB["cat"]))  # same token names, other ids
    assert swapped[0]["input_ids"][2] == VOCAB["dog"]
    write_csv(f, ["sentence", "label"], [["the cat sat", 0], ["dog ran", 0]])  # a changed label only
    assert run()["label"] == [0, 0]
    # without the cache nothing is written: the datasets live in memory
    assert gd.load_glue_datasets("sst2", make_tokenizer(), 16, train_file=f)[1]["train"].cache_files == []


# ---- batches: transformers' DataCollatorWithPadding on these datasets ------------------------------------------------
def _pair_dataset() -> datasets.Dataset:
    s1, s2 = ["the cat sat on a mat", "dog", "a cat ran", "he said hi", "good"], ["a mat", "the dog ran", "cat",
                                                                                  "bad movie", "the"]
    raw = split("mrpc", {"sentence1": s1, "sentence2": s2, "label": [i % 2 for i in range(5)]})
    return gd.tokenize(raw, get_task("mrpc"), make_tokenizer(), max_length=12)


def test_collator_pads_to_the_longest_or_to_max_length():
    ds, tok = _pair_dataset(), make_tokenizer()
    items = [ds[0], ds[2]]
    batch = DataCollatorWithPadding(tok)(items)
    longest = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == (2, longest)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        assert batch["input_ids"][row].tolist() == it["input_ids"] + [PAD] * (longest - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        assert batch["token_type_ids"][row].tolist() == it["token_type_ids"] + [0] * (longest - n)
    assert batch["labels"].tolist() == [0, 0] and all(v.dtype == torch.long for v in batch.values())
    fixed = DataCollatorWithPadding(tok, padding="max_length", max_length=12)([ds[1], ds[4]])
    assert fixed["input_ids"].shape == (2, 12)
    assert fixed["attention_mask"].sum(1).tolist() == [len(ds[1]["input_ids"]), len(ds[4]["input_ids"])]
    test = gd.tokenize(split("sst2", {"sentence": ["the cat", "dog"]}, "test", labels_required=False),
                       get_task("sst2"), tok, 8)
    assert "labels" not in DataCollatorWithPadding(tok)([test[0], test[1]])  # an unlabelled split
