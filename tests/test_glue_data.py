"""GLUE data: local-file loading and validation, tokenisation (cached), collation, lower/upper split.

Everything offline: tiny GLUE-format files written in tmp_path, a WordLevel tokenizer built from a small vocabulary
(expected token ids are looked up by hand in that vocabulary), and a fake ``datasets.load_dataset`` for the hub path.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "NLU"))
import glue_data as gd  # noqa: E402

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


# --------------------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------------------


def test_single_sentence_csv_sst2(tmp_path):
    f = write_csv(tmp_path / "train.csv", ["idx", "sentence", "label"],
                  [[0, 'good movie, "he said"', 1], [1, "bad movie", 0], [2, "the cat", "1"]])
    splits = gd.load_raw_splits("sst2", train_file=f)
    assert list(splits) == ["train"]
    raw = splits["train"]
    assert raw.texts == [['good movie, "he said"', "bad movie", "the cat"]]  # CSV quoting undone
    assert raw.labels == [1, 0, 1]


def test_single_sentence_tsv_cola_keeps_quotes(tmp_path):
    f = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [['he said "hi', 1], ["'the cat' sat", 0]])
    raw = gd.load_raw_splits("cola", validation_file=f)["validation"]
    assert raw.texts == [['he said "hi', "'the cat' sat"]]  # TSV: no quoting, quote characters are text
    assert raw.labels == [1, 0]


def test_pair_jsonl_mrpc_and_json_rte_label_names(tmp_path):
    f = write_json(tmp_path / "train.jsonl", [
        {"sentence1": "the cat", "sentence2": "a cat", "label": 1, "idx": 0},
        {"sentence1": "dog ran", "sentence2": "the mat", "label": 0, "idx": 1}], lines=True)
    raw = gd.load_raw_splits("mrpc", train_file=f)["train"]
    assert raw.texts == [["the cat", "dog ran"], ["a cat", "the mat"]] and raw.labels == [1, 0]
    g = write_json(tmp_path / "dev.json", [
        {"sentence1": "a", "sentence2": "b", "label": "not_entailment"},
        {"sentence1": "c", "sentence2": "d", "label": "entailment"},
        {"sentence1": "e", "sentence2": "f", "label": 1.0}], lines=False)
    assert gd.load_raw_splits("rte", validation_file=g)["validation"].labels == [1, 0, 1]
    # a .json file in JSON Lines form (what datasets' to_json writes) is read too
    h = write_json(tmp_path / "lines.json", [{"sentence1": "a", "sentence2": "b", "label": 0}], lines=True)
    assert gd.load_raw_splits("rte", validation_file=h)["validation"].labels == [0]


def test_regression_stsb(tmp_path):
    f = write_csv(tmp_path / "train.csv", ["sentence1", "sentence2", "label"],
                  [["the cat", "a cat", "4.2"], ["dog", "mat", "0"], ["a", "b", "5.0"]])
    raw = gd.load_raw_splits("stsb", train_file=f)["train"]
    assert raw.labels == [4.2, 0.0, 5.0]
    ds = gd.tokenize_split(raw, make_tokenizer(), max_length=16, progress=False)
    assert ds[0]["labels"].dtype == torch.float32 and ds[0]["labels"].item() == pytest.approx(4.2)


def test_mnli_matched_mismatched_and_unlabelled_test(tmp_path):
    header = ["premise", "hypothesis", "label"]
    train = write_tsv(tmp_path / "train.tsv", header, [["the cat", "a cat", 0], ["dog", "cat", 2], ["a", "b", 1]])
    dev_m = write_csv(tmp_path / "dev_m.csv", header, [["the cat", "a mat", "neutral"], ["x", "y", "contradiction"]])
    dev_mm = write_json(tmp_path / "dev_mm.jsonl", [{"premise": "p", "hypothesis": "h", "label": 0}], lines=True)
    test = write_tsv(tmp_path / "test.tsv", header, [["p", "h", -1], ["q", "r", -1]])
    splits = gd.load_raw_splits("mnli", train_file=train, validation_file=dev_m,
                                validation_mismatched_file=dev_mm, test_file=test)
    assert set(splits) == {"train", "validation_matched", "validation_mismatched", "test_matched"}
    assert splits["train"].labels == [0, 2, 1]
    assert splits["validation_matched"].labels == [1, 2]
    assert splits["validation_mismatched"].labels == [0]
    assert splits["test_matched"].labels is None
    # a test file without a label column is unlabelled too
    nolabel = write_csv(tmp_path / "test2.csv", ["premise", "hypothesis"], [["p", "h"]])
    assert gd.load_raw_splits("mnli", test_file=nolabel)["test_matched"].labels is None


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
        gd.load_raw_splits(task, train_file=f)


def test_bad_files_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--validation_file: file not found: .*nope.tsv"):
        gd.load_raw_splits("rte", validation_file=tmp_path / "nope.tsv")
    ok = write_csv(tmp_path / "ok.csv", ["sentence1", "sentence2", "label"], [["a", "b", 0]])
    with pytest.raises(ValueError, match="only for MNLI"):
        gd.load_raw_splits("rte", validation_mismatched_file=ok)
    parquet = tmp_path / "x.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="unsupported file type '.parquet'"):
        gd.load_raw_splits("rte", train_file=parquet)
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("sentence\tlabel\nthe cat\t1\nsat\t0\textra\n")
    with pytest.raises(ValueError, match="line 3 has 3 fields, the header has 2"):
        gd.load_raw_splits("sst2", train_file=ragged)
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text('{"sentence": "a", "label": 1}\n{"sentence": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        gd.load_raw_splits("sst2", train_file=badjson)
    nulls = write_json(tmp_path / "nulls.jsonl", [{"sentence": None, "label": 1}, {"label": 0}], lines=True)
    with pytest.raises(ValueError, match="text column 'sentence' has 2 missing or non-string values"):
        gd.load_raw_splits("sst2", train_file=nulls)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        gd.load_raw_splits("sst2", train_file=empty)
    # a test file mixing real labels and -1 is neither labelled nor unlabelled
    mixed = write_csv(tmp_path / "test.csv", ["sentence", "label"], [["a", 1], ["b", -1]])
    with pytest.raises(ValueError, match="1 labels outside the label set"):
        gd.load_raw_splits("sst2", test_file=mixed)


def test_hub_path_with_fake_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name, cache_dir=None):
        calls.append((path, name))
        return datasets.DatasetDict({
            "train": datasets.Dataset.from_dict({"question": ["q1", "q2"], "sentence": ["s1", "s2"],
                                                 "label": [0, 1], "idx": [0, 1]}),
            "validation": datasets.Dataset.from_dict({"question": ["q"], "sentence": ["s"], "label": [1],
                                                      "idx": [0]}),
            "test": datasets.Dataset.from_dict({"question": ["q"], "sentence": ["s"], "label": [-1], "idx": [0]}),
        })

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = gd.load_raw_splits("qnli")
    assert calls == [("nyu-mll/glue", "qnli")]
    assert splits["train"].texts == [["q1", "q2"], ["s1", "s2"]] and splits["train"].labels == [0, 1]
    assert splits["validation"].labels == [1] and splits["test"].labels is None


# --------------------------------------------------------------------------------------------------------------
# Tokenisation and cache
# --------------------------------------------------------------------------------------------------------------


def test_tokenize_single_and_pair_against_vocab(tmp_path):
    raw = gd.build_split("sst2", "train", {"sentence": ["the cat sat", "dog ran far away zebra"], "label": [1, 0]},
                         "mem")
    ds = gd.tokenize_split(raw, make_tokenizer(token_types=False), max_length=32, progress=False)
    assert len(ds) == 2 and type(ds[0]) is dict
    assert ds[0]["input_ids"].tolist() == [CLS, *ids("the cat sat"), SEP]
    assert ds[1]["input_ids"].tolist() == [CLS, *ids("dog ran far away zebra"), SEP]  # zebra -> [UNK]
    assert ds[1]["input_ids"].tolist()[-2] == UNK
    assert ds[0]["attention_mask"].tolist() == [1] * 5
    assert "token_type_ids" not in ds[0]  # RoBERTa-like tokenizer: no token types
    assert ds[0]["labels"].dtype == torch.long and ds[0]["labels"].item() == 1

    pair = gd.build_split("mrpc", "train", {"sentence1": ["the cat"], "sentence2": ["a mat , he said"],
                                            "label": [0]}, "mem")
    item = gd.tokenize_split(pair, make_tokenizer(), max_length=32, progress=False)[0]
    a, b = ids("the cat"), ids("a mat , he said")
    assert item["input_ids"].tolist() == [CLS, *a, SEP, *b, SEP]
    assert item["token_type_ids"].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)


def test_truncation(tmp_path):
    raw = gd.build_split("sst2", "train", {"sentence": ["the cat sat on a mat"], "label": [1]}, "mem")
    item = gd.tokenize_split(raw, make_tokenizer(), max_length=5, progress=False)[0]
    assert item["input_ids"].tolist() == [CLS, *ids("the cat sat"), SEP]
    # pairs: longest first. 6 + 2 words, budget 7 - 3 specials = 4 -> the long side is cut to 2
    pair = gd.build_split("rte", "train", {"sentence1": ["the cat sat on a mat"], "sentence2": ["dog ran"],
                                           "label": [0]}, "mem")
    item = gd.tokenize_split(pair, make_tokenizer(), max_length=7, progress=False)[0]
    assert item["input_ids"].tolist() == [CLS, *ids("the cat"), SEP, *ids("dog ran"), SEP]


class CountingTokenizer:
    """Delegates to a tokenizer and counts calls (to observe cache hits)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_cache_hits_and_invalidation(tmp_path, capsys):
    cache = tmp_path / "cache"
    f = write_csv(tmp_path / "train.csv", ["sentence", "label"], [["the cat sat", 1], ["dog ran", 0]])
    tok = CountingTokenizer(make_tokenizer())
    first = gd.load_glue_datasets("sst2", tok, 16, train_file=f, cache_dir=cache, progress=False)["train"]
    assert tok.calls == 1 and len(list(cache.glob("sst2-train-*.pt"))) == 1
    again = gd.load_glue_datasets("sst2", tok, 16, train_file=f, cache_dir=cache, progress=False)["train"]
    assert tok.calls == 1  # served from the cache
    for i in range(2):
        assert {k: v.tolist() for k, v in again[i].items()} == {k: v.tolist() for k, v in first[i].items()}
    gd.load_glue_datasets("sst2", tok, 8, train_file=f, cache_dir=cache, progress=False)  # other max_length
    assert tok.calls == 2
    write_csv(f, ["sentence", "label"], [["the cat sat", 0], ["dog ran", 0]])  # changed label only
    changed = gd.load_glue_datasets("sst2", tok, 16, train_file=f, cache_dir=cache, progress=False)["train"]
    assert tok.calls == 3 and changed[0]["labels"].item() == 0
    other_vocab = dict(VOCAB, cat=VOCAB["dog"], dog=VOCAB["cat"])  # same names, different ids
    tok2 = CountingTokenizer(make_tokenizer(vocab=other_vocab))
    swapped = gd.load_glue_datasets("sst2", tok2, 16, train_file=f, cache_dir=cache, progress=False)["train"]
    assert tok2.calls == 1 and swapped[0]["input_ids"][2].item() == VOCAB["dog"]
    # a corrupt cache file is ignored and rewritten
    for p in cache.glob("*.pt"):
        p.write_bytes(b"not a torch file")
    fixed = gd.load_glue_datasets("sst2", tok, 16, train_file=f, cache_dir=cache, progress=False)["train"]
    assert "ignoring unreadable cache" in capsys.readouterr().out
    assert fixed[0]["input_ids"].tolist() == [CLS, *ids("the cat sat"), SEP]
    assert not list(cache.glob("*.tmp"))


# --------------------------------------------------------------------------------------------------------------
# Collation, subsets, lower/upper split
# --------------------------------------------------------------------------------------------------------------


def _pair_dataset(n=5):
    s1 = ["the cat sat on a mat", "dog", "a cat ran", "he said hi", "good"][:n]
    s2 = ["a mat", "the dog ran far away", "cat", "bad movie", "the"][:n]
    raw = gd.build_split("mrpc", "train", {"sentence1": s1, "sentence2": s2, "label": [i % 2 for i in range(n)]},
                         "mem")
    return gd.tokenize_split(raw, make_tokenizer(), max_length=12, progress=False)


def test_collate_dynamic_padding():
    ds = _pair_dataset()
    collate = gd.GlueCollator.from_tokenizer(make_tokenizer())
    items = [ds[0], ds[2]]
    batch = collate(items)
    assert type(batch) is dict  # not a BatchEncoding (Betty mangles those)
    longest = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == (2, longest)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == it["input_ids"].tolist()
        assert batch["input_ids"][row, n:].tolist() == [PAD] * (longest - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        assert batch["token_type_ids"][row, :n].tolist() == it["token_type_ids"].tolist()
        assert batch["token_type_ids"][row, n:].tolist() == [0] * (longest - n)
    assert batch["labels"].tolist() == [0, 0] and batch["labels"].dtype == torch.long
    assert all(v.dtype == torch.long for k, v in batch.items())


def test_collate_pad_to_max_length_and_left_padding():
    ds = _pair_dataset()
    batch = gd.GlueCollator.from_tokenizer(make_tokenizer(), pad_to_max_length=True, max_length=12)([ds[1], ds[4]])
    assert batch["input_ids"].shape == (2, 12)
    assert batch["attention_mask"].sum(1).tolist() == [len(ds[1]["input_ids"]), len(ds[4]["input_ids"])]
    left = gd.GlueCollator(PAD, padding_side="left")([ds[0], ds[4]])
    n = len(ds[4]["input_ids"])
    assert left["input_ids"][1, -n:].tolist() == ds[4]["input_ids"].tolist()
    assert left["attention_mask"][1].tolist() == [0] * (left["input_ids"].shape[1] - n) + [1] * n
    with pytest.raises(ValueError, match="needs max_length"):
        gd.GlueCollator(PAD, pad_to_max_length=True)
    with pytest.raises(ValueError, match="more than max_length=3"):
        gd.GlueCollator(PAD, pad_to_max_length=True, max_length=3)([ds[0]])


def test_dataloader_and_unlabelled_batches():
    ds = _pair_dataset()
    loader = DataLoader(ds, batch_size=2, collate_fn=gd.GlueCollator.from_tokenizer(make_tokenizer()))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert all(type(b) is dict for b in batches)
    raw = gd.build_split("sst2", "test", {"sentence": ["the cat", "dog"]}, "mem", labels_required=False)
    test = gd.tokenize_split(raw, make_tokenizer(), max_length=8, progress=False)
    assert not test.has_labels and "labels" not in gd.GlueCollator(PAD)([test[0], test[1]])


def test_subset_and_lower_upper_split():
    ds = _pair_dataset()
    sub = ds.subset([3, 1])
    for j, i in enumerate([3, 1]):
        assert {k: v.tolist() for k, v in sub[j].items()} == {k: v.tolist() for k, v in ds[i].items()}
    sentences = [f"{WORDS[i % 17]} {WORDS[(3 * i) % 17]} {WORDS[(5 * i) % 17]}" for i in range(50)]
    raw = gd.build_split("sst2", "train", {"sentence": sentences, "label": [i % 2 for i in range(50)]}, "mem")
    big = gd.tokenize_split(raw, make_tokenizer(), max_length=8, progress=False)
    lower, upper = gd.split_lower_upper(big, 0.2, seed=0)
    assert len(upper) == round(0.2 * len(big)) and len(lower) + len(upper) == len(big)
    lower2, upper2 = gd.split_lower_upper(big, 0.2, seed=0)
    assert upper2.lengths.tolist() == upper.lengths.tolist() and upper2.labels.tolist() == upper.labels.tolist()
    _, upper_other = gd.split_lower_upper(big, 0.2, seed=1)
    assert [upper_other[i]["input_ids"].tolist() for i in range(len(upper_other))] != \
        [upper[i]["input_ids"].tolist() for i in range(len(upper))]
    both = sorted(tuple(d[i]["input_ids"].tolist()) + (int(d[i]["labels"]),) for d in (lower, upper)
                  for i in range(len(d)))
    assert both == sorted(tuple(big[i]["input_ids"].tolist()) + (int(big[i]["labels"]),) for i in range(len(big)))
    with pytest.raises(ValueError, match="upper_fraction must be in"):
        gd.split_lower_upper(big, 1.0, seed=0)
    with pytest.raises(ValueError, match="empty split"):
        gd.split_lower_upper(ds.subset([0, 1]), 0.1, seed=0)
