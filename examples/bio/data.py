"""Peptide / protein classification data: read, validate, de-duplicate, split into ``sequence,label`` CSV files.

Readers:

* modlAMP files (``modlamp==4.3.3``, ``<pkg>/data/*.csv``, e.g. ``ACP_CancPPD_vs_Random.csv``): one header line
  ``N,1,<class 0 name>,<class 1 name>`` (``N`` = number of rows; checked) followed by ``SEQUENCE,LABEL`` rows
  without column names. modlAMP files mix CRLF and LF line ends and some have a space before the label.
* user CSV files: a header with named columns (default ``sequence`` and ``label``, configurable).

Sequences are stripped and upper-cased; any character outside the alphabet (default: the 20 standard amino acids)
is an error naming the file line. Labels must be integers (0/1 for the binary sets here).

Cleaning (:func:`clean_sequences`): a sequence listed with two different labels is dropped entirely (every copy:
neither label can be trusted); of a sequence repeated with one label, one copy is kept. Splitting
(:func:`split_dataset`): scikit-learn ``train_test_split``, seeded, stratified by label by default, written as
``train.csv`` / ``test.csv`` (columns ``sequence,label``; raw residues, formatting per model happens at
tokenisation, see ``models.format_protein``) and ``split.json``.

CLI::

    python examples/bio/data.py modlamp --file ACP_CancPPD_vs_Random.csv --out DIR --seed 0 --test-fraction 0.25
    python examples/bio/data.py csv --file my.csv --out DIR [--sequence-column seq --label-column y]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from loralib.files import write_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (offline_packages) when run as a script
import offline_packages  # noqa: E402

__all__ = [
    "STANDARD_AMINO_ACIDS",
    "CleaningCounts",
    "load_peptide_csv",
    "clean_sequences",
    "split_dataset",
    "modlamp_file",
    "main",
]

STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


@dataclass(frozen=True)
class CleaningCounts:
    """Row counts from :func:`clean_sequences`."""

    rows_in: int
    duplicate_rows_dropped: int  # extra copies of a sequence that always carries the same label
    conflicting_sequences: int  # distinct sequences seen with more than one label
    conflicting_rows_dropped: int  # all rows of those sequences
    rows_out: int


# ---------------------------------------------------------------------------------------------------------- read


def _parse_label(raw: str, where: str) -> int:
    text = (raw or "").strip()
    if not text:
        raise ValueError(f"{where}: empty label")
    try:
        value = float(text)
    except ValueError as exc:
        raise ValueError(f"{where}: label {text!r} is not a number") from exc
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{where}: label {text!r} is not an integer class id")
    return int(value)


def _parse_sequence(raw: str, alphabet: frozenset[str], where: str) -> str:
    seq = (raw or "").strip().upper()
    if not seq:
        raise ValueError(f"{where}: empty sequence")
    bad = sorted(set(seq) - alphabet)
    if bad:
        raise ValueError(
            f"{where}: sequence {seq[:40]!r} has non-amino-acid character(s) {bad} "
            f"(allowed: {''.join(sorted(alphabet))})"
        )
    return seq


def _is_modlamp_header(fields: list[str]) -> bool:
    return len(fields) == 4 and fields[0].strip().isdigit()


def load_peptide_csv(
    path: str | os.PathLike,
    sequence_column: str = "sequence",
    label_column: str = "label",
    alphabet: str = STANDARD_AMINO_ACIDS,
    file_format: str = "auto",
) -> pd.DataFrame:
    """Read a modlAMP-style or named-column CSV into a frame with columns ``sequence`` and ``label`` (int).

    Args:
        path: the CSV file.
        sequence_column, label_column: column names of a user CSV (ignored for modlAMP files).
        alphabet: allowed residue letters (after upper-casing).
        file_format: ``"modlamp"``, ``"csv"`` or ``"auto"`` (modlAMP when the first line is ``N,1,name0,name1``).

    Returns:
        DataFrame (``sequence``, ``label``) in file order; ``df.attrs`` holds ``source``, ``format`` and, for
        modlAMP files, ``class_names`` (label id -> name from the header).

    Raises:
        ValueError: empty file, missing columns, row count not matching a modlAMP header, an empty or invalid
            sequence or label (the message names the file line).
    """
    path = Path(path)
    if file_format not in ("auto", "modlamp", "csv"):
        raise ValueError(f"file_format must be 'auto', 'modlamp' or 'csv', got {file_format!r}")
    allowed = frozenset(alphabet.upper())
    with open(path, encoding="utf-8", newline="") as f:
        lines = list(csv.reader(f))
    if not lines or not any(field.strip() for field in lines[0]):
        raise ValueError(f"{path}: empty file")
    header = [h.strip() for h in lines[0]]
    fmt = file_format
    if fmt == "auto":
        fmt = "modlamp" if _is_modlamp_header(header) and sequence_column not in header else "csv"

    sequences: list[str] = []
    labels: list[int] = []
    attrs: dict = {"source": str(path), "format": fmt}
    if fmt == "modlamp":
        if not _is_modlamp_header(header):
            raise ValueError(f"{path}: line 1 is not a modlAMP header 'N,1,<class 0>,<class 1>': {lines[0]}")
        attrs["class_names"] = {0: header[2], 1: header[3]}
        seq_idx, lab_idx = 0, 1
    else:
        missing = [c for c in (sequence_column, label_column) if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
        seq_idx, lab_idx = header.index(sequence_column), header.index(label_column)
    for line_no, fields in enumerate(lines[1:], start=2):
        if not any(x.strip() for x in fields):
            continue  # blank line (e.g. a trailing newline)
        where = f"{path}, line {line_no}"
        if len(fields) <= max(seq_idx, lab_idx):
            raise ValueError(f"{where}: expected at least {max(seq_idx, lab_idx) + 1} fields, got {fields}")
        sequences.append(_parse_sequence(fields[seq_idx], allowed, where))
        labels.append(_parse_label(fields[lab_idx], where))
    if not sequences:
        raise ValueError(f"{path}: no data rows")
    if fmt == "modlamp" and int(header[0]) != len(sequences):
        raise ValueError(f"{path}: header announces {header[0]} rows but the file has {len(sequences)}")
    df = pd.DataFrame({"sequence": sequences, "label": labels})
    df.attrs.update(attrs)
    return df


# --------------------------------------------------------------------------------------------------------- clean


def clean_sequences(
    df: pd.DataFrame, sequence_column: str = "sequence", label_column: str = "label"
) -> tuple[pd.DataFrame, CleaningCounts]:
    """Drop every copy of sequences with conflicting labels and extra copies of consistent duplicates.

    The first copy (in frame order) of each consistently labelled sequence is kept. Returns the cleaned frame
    (index reset, ``attrs`` kept) and the counts.
    """
    for col in (sequence_column, label_column):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in frame (columns: {list(df.columns)})")
    n_labels = df.groupby(sequence_column, sort=False)[label_column].nunique()
    conflicting = set(n_labels.index[n_labels > 1])
    is_conflict = df[sequence_column].isin(conflicting)
    consistent = df[~is_conflict]
    kept = consistent.drop_duplicates(subset=sequence_column, keep="first").reset_index(drop=True)
    kept.attrs = dict(df.attrs)
    counts = CleaningCounts(
        rows_in=len(df),
        duplicate_rows_dropped=len(consistent) - len(kept),
        conflicting_sequences=len(conflicting),
        conflicting_rows_dropped=int(is_conflict.sum()),
        rows_out=len(kept),
    )
    return kept, counts


# --------------------------------------------------------------------------------------------------------- split


def _label_counts(labels: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(labels.value_counts().items())}


def split_dataset(
    df: pd.DataFrame,
    test_fraction: float = 0.25,
    seed: int = 0,
    stratify: bool = True,
    out_dir: str | os.PathLike | None = None,
    cleaning: CleaningCounts | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded train/test split (scikit-learn ``train_test_split``), optionally stratified by ``label``.

    With ``out_dir`` writes ``train.csv`` and ``test.csv`` (``sequence,label``) and ``split.json`` (seed, fraction,
    sizes, label counts per split, the ``cleaning`` counts and the source), each atomically; ``split.json`` last.

    Raises:
        ValueError: fraction outside (0, 1), duplicate sequences left in ``df`` (clean first), or a class too small
            to stratify.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    for col in ("sequence", "label"):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in frame (columns: {list(df.columns)})")
    if df["sequence"].duplicated().any():
        # A sequence in both splits would leak the answer: refuse instead of splitting silently.
        raise ValueError("duplicate sequences in the frame; run clean_sequences first")
    try:
        train, test = train_test_split(
            df[["sequence", "label"]],
            test_size=test_fraction,
            random_state=seed,
            shuffle=True,
            stratify=df["label"] if stratify else None,
        )
    except ValueError as exc:
        raise ValueError(f"cannot split {len(df)} rows with test_fraction={test_fraction}: {exc}") from exc
    train, test = train.reset_index(drop=True), test.reset_index(drop=True)
    if out_dir is not None:
        info = {
            "source": df.attrs.get("source"),
            "class_names": {str(k): v for k, v in df.attrs.get("class_names", {}).items()},
            "columns": {"sequence": "amino acids, one letter each, no spaces", "label": "integer class id"},
            "seed": seed,
            "test_fraction": test_fraction,
            "stratified": stratify,
            "sizes": {"train": len(train), "test": len(test)},
            "label_counts": {"train": _label_counts(train["label"]), "test": _label_counts(test["label"])},
            "cleaning": asdict(cleaning) if cleaning is not None else None,
        }
        write_split(out_dir, {"test.csv": test.to_csv(index=False, lineterminator="\n"),
                              "train.csv": train.to_csv(index=False, lineterminator="\n")}, info)
    return train, test


def modlamp_file(name: str) -> Path:
    """Path of a data file shipped with modlAMP (e.g. ``ACP_CancPPD_vs_Random.csv``); an existing path is kept."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = offline_packages.modlamp_data_dir() / name
    if not candidate.is_file():
        available = sorted(p.name for p in offline_packages.modlamp_data_dir().glob("*.csv"))
        raise FileNotFoundError(f"no modlAMP data file {name!r}; available: {available}")
    return candidate


# ----------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    sub = parser.add_subparsers(dest="source", required=True)
    for name in ("modlamp", "csv"):
        p = sub.add_parser(name, help=f"{name} file")
        p.add_argument("--file", required=True, help="data file (modlamp: a name in modlAMP's data folder or a path)")
        p.add_argument("--out", required=True, help="output folder for train.csv, test.csv, split.json")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--test-fraction", type=float, default=0.25)
        p.add_argument("--no-stratify", action="store_true")
        p.add_argument("--alphabet", default=STANDARD_AMINO_ACIDS, help="allowed residues (default: the 20 standard)")
    sub.choices["csv"].add_argument("--sequence-column", default="sequence")
    sub.choices["csv"].add_argument("--label-column", default="label")
    args = parser.parse_args(argv)
    try:
        if args.source == "modlamp":
            df = load_peptide_csv(modlamp_file(args.file), alphabet=args.alphabet, file_format="modlamp")
        else:
            df = load_peptide_csv(args.file, args.sequence_column, args.label_column, args.alphabet, "csv")
        clean, counts = clean_sequences(df)
        print(
            f"{df.attrs['source']}: {counts.rows_in} rows, {counts.duplicate_rows_dropped} duplicate rows and "
            f"{counts.conflicting_rows_dropped} rows of {counts.conflicting_sequences} conflicting sequences "
            f"dropped, {counts.rows_out} kept"
        )
        train, test = split_dataset(clean, args.test_fraction, args.seed, not args.no_stratify, args.out, counts)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    for split, part in (("train", train), ("test", test)):
        print(f"{split}: {len(part)} sequences, labels {_label_counts(part['label'])}")
    return train, test


if __name__ == "__main__":
    main()
