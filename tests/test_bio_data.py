"""Bio example data (modlAMP peptide files, user CSV files) and model helpers (AntiBERTy tokenizer and weights,
ESM-2 module names), on the real files shipped by modlamp==4.3.3 and antiberty==0.1.3."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers import load_example

ROOT = Path(__file__).resolve().parents[1]


bio = load_example("bio_data", "examples/bio/data.py")
models = load_example("bio_models", "examples/bio/models.py")
offline = bio.offline_packages


def _raw_modlamp(name: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Independent reader: header fields and (sequence, label) rows with the plain csv module."""
    with open(offline.modlamp_data_dir() / name, newline="") as f:
        lines = list(csv.reader(f))
    return lines[0], [(r[0].strip(), int(r[1])) for r in lines[1:] if r]


# --------------------------------------------------------------------------------------------------- cleaning


def test_clean_sequences_handmade_exact_counts():
    df = pd.DataFrame(
        {
            "sequence": ["AAA", "CCC", "AAA", "DDD", "CCC", "EEE", "AAA", "EEE", "EEE", "FFF"],
            "label": [1, 0, 1, 0, 1, 0, 1, 0, 1, 1],
        }
    )
    # AAA x3 same label -> keep 1 (2 dropped); CCC 0/1 and EEE 0/0/1 conflict -> all 5 rows dropped.
    clean, counts = bio.clean_sequences(df)
    assert counts == bio.CleaningCounts(rows_in=10, duplicate_rows_dropped=2, conflicting_sequences=2,
                                        conflicting_rows_dropped=5, rows_out=3)
    assert clean["sequence"].tolist() == ["AAA", "DDD", "FFF"]
    assert clean["label"].tolist() == [1, 0, 1]


def test_real_acp_random_file():
    header, raw = _raw_modlamp("ACP_CancPPD_vs_Random.csv")
    df = bio.load_peptide_csv(offline.modlamp_data_dir() / "ACP_CancPPD_vs_Random.csv")
    assert df.attrs["format"] == "modlamp" and df.attrs["class_names"] == {0: header[2], 1: header[3]}
    assert len(df) == 826 == int(header[0]) == len(raw)
    assert list(zip(df["sequence"], df["label"])) == raw
    clean, counts = bio.clean_sequences(df)
    labels_of: dict[str, set[int]] = {}
    for s, y in raw:
        labels_of.setdefault(s, set()).add(y)
    expected = sum(1 for ys in labels_of.values() if len(ys) == 1)
    assert counts.rows_out == len(clean) == expected  # 826: no duplicates or conflicts in this file
    assert clean["label"].value_counts().to_dict() == {0: 413, 1: 413}


def test_real_amp_uniprot_duplicates_and_conflicts():
    _, raw = _raw_modlamp("AMPvsUniProt.csv")  # labels written as " 1" here
    labels_of: dict[str, set[int]] = {}
    for s, y in raw:
        labels_of.setdefault(s, set()).add(y)
    n_conflicting = sum(1 for ys in labels_of.values() if len(ys) > 1)
    clean, counts = bio.clean_sequences(bio.load_peptide_csv(offline.modlamp_data_dir() / "AMPvsUniProt.csv"))
    assert counts.conflicting_sequences == n_conflicting
    assert counts.rows_out == len(labels_of) - n_conflicting == len(clean)
    assert not clean["sequence"].duplicated().any()


# ------------------------------------------------------------------------------------------------- validation


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_user_csv_columns_and_validation(tmp_path):
    ok = _write(tmp_path / "ok.csv", "id,seq,y\n1,acdk ,1\n2,WYV,0\n\n")
    df = bio.load_peptide_csv(ok, sequence_column="seq", label_column="y")
    assert df["sequence"].tolist() == ["ACDK", "WYV"] and df["label"].tolist() == [1, 0]
    cases = {
        "id,seq,y\n1,ACD,1\n2,AC1D,0\n": r"line 3.*non-amino-acid.*\['1'\]",
        "id,seq,y\n1,ACD,1\n2, ,0\n": "line 3: empty sequence",
        "id,seq,y\n1,ACD,\n": "line 2: empty label",
        "id,seq,y\n1,ACD,0.5\n": "line 2: label '0.5' is not an integer",
        "id,sequence,y\n1,ACD,1\n": r"missing column\(s\) \['seq'\]",
        "": "empty file",
        "id,seq,y\n": "no data rows",
    }
    for i, (text, message) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=message):
            bio.load_peptide_csv(_write(tmp_path / f"bad{i}.csv", text), sequence_column="seq", label_column="y")


def test_modlamp_header_count_checked(tmp_path):
    path = _write(tmp_path / "m.csv", "3,1,Neg,Pos\nKLAK,1\nGIGA,0\n")
    with pytest.raises(ValueError, match="announces 3 rows but the file has 2"):
        bio.load_peptide_csv(path)
    df = bio.load_peptide_csv(_write(tmp_path / "m2.csv", "2,1,Neg,Pos\r\nKLAK, 1\r\nGIGA,0\r\n"))
    assert df["label"].tolist() == [1, 0] and df.attrs["class_names"] == {0: "Neg", 1: "Pos"}


# ------------------------------------------------------------------------------------------------------ split


def test_split_dataset_stratified_seeded_and_written(tmp_path):
    clean, counts = bio.clean_sequences(bio.load_peptide_csv(bio.modlamp_file("ACP_CancPPD_vs_Random.csv")))
    train, test = bio.split_dataset(clean, 0.25, seed=0, out_dir=tmp_path / "a", cleaning=counts)
    assert len(test) == math.ceil(0.25 * len(clean)) and len(train) + len(test) == len(clean)
    assert not set(train["sequence"]) & set(test["sequence"])
    assert set(train["sequence"]) | set(test["sequence"]) == set(clean["sequence"])
    # stratified: each class's share of the test split within one example of 25%
    for y in (0, 1):
        n_y = int((clean["label"] == y).sum())
        assert abs(int((test["label"] == y).sum()) - 0.25 * n_y) <= 1
    on_disk = pd.read_csv(tmp_path / "a" / "test.csv")
    assert list(on_disk.columns) == ["sequence", "label"] and on_disk.equals(test)
    info = json.loads((tmp_path / "a" / "split.json").read_text())
    assert info["sizes"] == {"train": len(train), "test": len(test)}
    assert info["label_counts"]["test"] == {str(k): int(v) for k, v in sorted(test["label"].value_counts().items())}
    assert info["cleaning"]["rows_out"] == len(clean) and info["class_names"] == {"0": "Random", "1": "ACP"}
    train_b, _ = bio.split_dataset(clean, 0.25, seed=0, out_dir=tmp_path / "b", cleaning=counts)
    assert (tmp_path / "a" / "train.csv").read_bytes() == (tmp_path / "b" / "train.csv").read_bytes()
    _, test_c = bio.split_dataset(clean, 0.25, seed=1)
    assert set(test_c["sequence"]) != set(test["sequence"])


def test_split_refuses_duplicates_and_bad_fraction():
    df = pd.DataFrame({"sequence": ["AAA", "AAA", "CCC", "DDD"], "label": [1, 1, 0, 0]})
    with pytest.raises(ValueError, match="clean_sequences"):
        bio.split_dataset(df, 0.25)
    with pytest.raises(ValueError, match="test_fraction"):
        bio.split_dataset(df.drop_duplicates("sequence"), 1.0)


def test_cli_modlamp(tmp_path, capsys):
    bio.main(["modlamp", "--file", "AMPvsTMset.csv", "--out", str(tmp_path), "--seed", "0", "--test-fraction", "0.25"])
    assert len(pd.read_csv(tmp_path / "train.csv")) + len(pd.read_csv(tmp_path / "test.csv")) == 412
    assert "412 kept" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="available"):
        bio.main(["modlamp", "--file", "nope.csv", "--out", str(tmp_path / "x")])


# -------------------------------------------------------------------------------------------- tokenizers, models


@pytest.fixture(scope="module")
def antiberty_tokenizer():
    return models.load_antiberty_tokenizer()


def test_antiberty_tokenizer_maps_every_residue(antiberty_tokenizer):
    vocab_lines = models.antiberty_paths().vocab.read_text().split()
    tok = antiberty_tokenizer
    assert len(tok) == len(vocab_lines) == 25
    ids = tok(models.format_protein("acdefghiklmnpqrstvwy", "antiberty"))["input_ids"]
    # [CLS] + one id per residue, equal to its line number in vocab.txt + [SEP]
    assert ids == [tok.cls_token_id] + [vocab_lines.index(a) for a in models.AMINO_ACIDS] + [tok.sep_token_id]
    assert tok.unk_token_id not in ids


def test_check_catches_the_tokenizer_traps(antiberty_tokenizer):
    from transformers import BertTokenizer

    vocab = str(models.antiberty_paths().vocab)
    trap = BertTokenizer(vocab_file=vocab)  # transformers 5: ignores the file, 5 special tokens only
    with pytest.raises(ValueError, match="only 5 tokens"):
        models.assert_tokenizer_covers_residues(trap)
    lower = BertTokenizer.from_pretrained(str(models.antiberty_paths().trained_models))  # do_lower_case=True
    with pytest.raises(ValueError, match="do_lower_case"):
        models.assert_tokenizer_covers_residues(lower)
    with pytest.raises(ValueError, match="do_lower_case"):  # unspaced input: one [UNK] for the whole peptide
        models.assert_tokenizer_covers_residues(antiberty_tokenizer, model_family="esm")
    models.assert_tokenizer_covers_residues(antiberty_tokenizer)  # the right one passes


def test_esm_tokenizer_raw_format_passes_check(tmp_path):
    from transformers import EsmTokenizer

    # ESM-2's published 33-token vocabulary (the hub is unreachable; written here to build the tokenizer)
    vocab = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = EsmTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    models.assert_tokenizer_covers_residues(tok, model_family="esm")
    assert tok(models.format_protein("kla k", "esm"), add_special_tokens=False)["input_ids"] == [
        vocab.index(a) for a in "KLAK"
    ]


def test_format_protein():
    assert models.format_protein(" kl ak\n", "antiberty") == "K L A K"
    assert models.format_protein(" kl ak\n", "esm") == "KLAK"
    with pytest.raises(ValueError, match="model family"):
        models.format_protein("KLAK", "bert")
    with pytest.raises(ValueError, match="empty"):
        models.format_protein("  ", "esm")


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_esm_adapter_targets_match_module_names():
    from transformers import EsmConfig, EsmForSequenceClassification

    cfg = EsmConfig(vocab_size=33, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                    pad_token_id=1, mask_token_id=32, max_position_embeddings=64, num_labels=2)
    model = EsmForSequenceClassification(cfg)
    targets = [n for n in _linear_names(model) if n.split(".")[-1] in models.ADAPTER_TARGETS["esm"]]
    assert targets == [f"esm.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    assert all(type(model.get_submodule(n.rsplit(".", 1)[0])).__name__ == "EsmSelfAttention" for n in targets)
    for head in models.MODULES_TO_SAVE["esm"]:
        model.get_submodule(head)


def test_antiberty_classifier_loads_offline_with_weights_only(monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model, info = models.load_antiberty_for_classification(2, output_loading_info=True)
    monkeypatch.undo()
    assert calls and all(w is True for w in calls)  # the pickle is only ever read with weights_only=True
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]  # only the head is new
    assert not info["mismatched_keys"]
    state = torch.load(models.antiberty_paths().weights, map_location="cpu", weights_only=True)
    for name in ("bert.encoder.layer.7.attention.self.value.weight", "bert.pooler.dense.weight"):
        assert torch.equal(model.get_parameter(name), state[name])
    targets = [n for n in _linear_names(model) if n.split(".")[-1] in models.ADAPTER_TARGETS["antiberty"]]
    assert len(targets) == 2 * model.config.num_hidden_layers == 16
    tok = models.load_antiberty_tokenizer()
    batch = tok([models.format_protein(s, "antiberty") for s in ("KLAKLAK", "GIGAVL")], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        assert model.eval()(**batch).logits.shape == (2, 2)
