"""A tiny "pretrained" RoBERTa checkpoint and tiny GLUE-format files, written to a folder (no downloads)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForMaskedLM

WORDS = "the cat sat on a mat dog ran far away he said hi good bad movie great awful fine plot".split()
VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}


def write_tiny_roberta(directory: Path, seed: int = 0) -> Path:
    """A 2-layer RoBERTa (hidden 16) and a WordLevel tokenizer, saved like a hub checkpoint."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
        type_vocab_size=1,
    )
    RobertaForMaskedLM(config).save_pretrained(directory)
    return directory


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))


def write_task_files(directory: Path, task: str, sizes=(48, 16, 16), seed: int = 0) -> dict[str, Path]:
    """GLUE-layout csv files for ``task`` (sst2, mrpc, stsb, mnli) whose labels depend on the words."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    splits = ["train", "dev", "test"] if task != "mnli" else ["train", "dev_m", "dev_mm"]
    paths = {}
    for split, n in zip(splits, sizes):
        rows = []
        for _ in range(n):
            a, b = _sentence(rng), _sentence(rng)
            positive = ("good" in a) or ("great" in a)
            if task == "sst2":
                rows.append({"sentence": a, "label": int(positive)})
            elif task == "mrpc":
                rows.append({"sentence1": a, "sentence2": b, "label": int(positive)})
            elif task == "stsb":
                rows.append(
                    {"sentence1": a, "sentence2": b, "label": round(5 * len(set(a.split()) & set(b.split())) / 8, 3)}
                )
            elif task == "mnli":
                rows.append({"premise": a, "hypothesis": b, "label": len(a.split()) % 3})
            else:
                raise ValueError(task)
        path = directory / f"{task}_{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        paths[split] = path
    return paths
