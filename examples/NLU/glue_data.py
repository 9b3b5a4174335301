"""GLUE data through ``datasets``: read (hub or local files), check, tokenise. Batches are padded by transformers'
``DataCollatorWithPadding``.

    task, data = load_glue_datasets("mrpc", tokenizer, 128, train_file="train.csv", validation_file="dev.tsv")
    DataLoader(data["train"], batch_size=32, collate_fn=DataCollatorWithPadding(tokenizer))

Sources. Without a local file the task comes from the hub (``datasets.load_dataset("nyu-mll/glue", task)``). With
any of ``train_file`` / ``validation_file`` / ``validation_mismatched_file`` / ``test_file`` only the given files are
read (hub and local splits are never mixed), by ``datasets``' own ``csv`` and ``json`` builders, by extension:

* ``.csv``: comma-separated with a header, standard CSV quoting;
* ``.tsv``: tab-separated with a header and *no* quote processing (the GLUE distribution's convention: quote
  characters are text; fields cannot contain tabs or newlines);
* ``.json``: a JSON array of objects, or JSON Lines (what ``Dataset.to_json`` writes); ``.jsonl``: JSON Lines.

Every CSV/TSV column is read as text and no value is read as missing (``keep_default_na=False``): ``NA``, ``null``,
``None`` and empty fields stay the strings they are. Files must be UTF-8; for one that is not, the file and the line
of the first undecodable byte are named.

Columns. A task reads the hub's column names (``sentence1``, ``sentence2`` ...) unless ``text_columns`` names others,
and its labels from ``label_column`` (default ``label``); other columns are ignored. Without a task (local files
only) the text columns are inferred (:func:`infer_text_columns`) and so is the task (:func:`infer_task`):
classification over the distinct labels of train, or regression when they are numbers not all whole.

Split names: ``train_file`` -> ``train``; ``validation_file`` -> ``validation`` (MNLI: ``validation_matched``);
``validation_mismatched_file`` -> ``validation_mismatched`` (MNLI only); ``test_file`` -> ``test`` (MNLI:
``test_matched``). Labels: classification labels are integer ids (``1``, ``"1"``, ``1.0``) or the class names of the
task (``"entailment"``); regression labels are numbers (STS-B: in [0, 5]). A test file may omit the label column or
use ``-1`` / empty labels throughout (unlabelled, the GLUE test convention); any other split needs valid labels.

Each split becomes a ``datasets.Dataset`` of ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
tokenizer makes them), unpadded, plus ``label`` (ids, or floats for regression; absent for an unlabelled split).
With ``cache=True`` the parsed files and the tokens stay in ``datasets``' cache (``HF_DATASETS_CACHE``; keyed by the
file and its modification time, the tokenizer's whole state and ``max_length``, so a changed input is never served
stale), otherwise everything is kept in memory and nothing is written.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
from glue_tasks import TASKS, GlueTask, get_task

HUB_DATASET = "nyu-mll/glue"
# extension -> (datasets builder, its reading options)
READERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE}),
    ".json": ("json", {}), ".jsonl": ("json", {}),
}
FILE_OPTIONS = ("train_file", "validation_file", "validation_mismatched_file", "test_file")
CUSTOM = "custom"  # the name of a task inferred from local files


# ---- reading --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """``datasets`` logs a reader's error before raising it; the caller reports it, once."""
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)


def check_utf8(path: Path, block: int = 1 << 24) -> None:
    """A ValueError naming the file and the line of its first byte that is not UTF-8. Checked before reading: pandas'
    error names no file, and pyarrow's JSON reader takes any bytes (a bad string fails later, when it is read)."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as bad:  # bad.object: the bytes held from the last block, then this block
                line += bad.object.count(b"\n", 0, bad.start)
                raise ValueError(f"{path} is not UTF-8 text (byte 0x{bad.object[bad.start]:02x} on line {line}); "
                                 "save it as UTF-8, e.g. with iconv -f latin1 -t utf-8") from None
            if not chunk:
                return
            line += chunk.count(b"\n")


def read_file(path: str | os.PathLike, cache: bool = False, cache_dir: str | None = None) -> datasets.Dataset:
    """One local file as a ``Dataset``, every column of a CSV/TSV file a string (see the module docstring).

    ``cache=False`` parses in a temporary folder and keeps the result in memory; ``cache=True`` keeps it in
    ``cache_dir`` (None: ``datasets``' default).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unsupported extension, an empty file or a header naming a column twice, a file that is not
            UTF-8 or that the reader refuses (ragged rows, invalid JSON), each naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    builder, options = READERS.get(path.suffix.lower(), (None, {}))
    if builder is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(READERS)}")
    check_utf8(path)
    if builder == "csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=options.get("sep", ","), quoting=options.get("quoting", csv.QUOTE_MINIMAL))
            header, first = next(reader, None), next((row for row in reader if row), None)
        if not header or first is None:
            raise ValueError(f"{path}: " + ("no examples" if header else "empty file (expected a header line)"))
        twice = [name for name, n in Counter(header).items() if n > 1]
        if twice:
            raise ValueError(f"{path}: the header names the columns {twice} twice")
        options = {**options, "keep_default_na": False,
                   "features": datasets.Features({name: datasets.Value("string") for name in header})}
    folder = contextlib.nullcontext(cache_dir) if cache else tempfile.TemporaryDirectory()
    try:
        with folder as where, _quiet():
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=where,
                                         keep_in_memory=not cache, **options)
    except Exception as err:  # the readers' errors are of many kinds (pandas, pyarrow, json, datasets' own)
        cause = err.__cause__ or err  # datasets wraps the reader's own error in a DatasetGenerationError
        raise ValueError(f"{path}: {(str(cause).strip().splitlines() or [type(cause).__name__])[0]}") from None


def file_splits(task: GlueTask | None) -> dict[str, str]:
    """Option -> split name for local files."""
    if task is not None and task.name == "mnli":
        return {"train_file": "train", "validation_file": "validation_matched",
                "validation_mismatched_file": "validation_mismatched", "test_file": "test_matched"}
    return {"train_file": "train", "validation_file": "validation", "test_file": "test"}


def read_splits(task: GlueTask | None, files: dict[str, str | os.PathLike | None], cache: bool = False,
                cache_dir: str | None = None) -> dict[str, tuple[datasets.Dataset, str]]:
    """``{split: (dataset, source)}``: the given local files, or the task's hub dataset when no file is given."""
    given = {option: path for option, path in files.items() if path is not None}
    if given:
        names = file_splits(task)
        for option, path in given.items():
            if option not in names:
                raise ValueError(f"--{option} is only for MNLI (matched/mismatched dev sets), not "
                                 f"{task.name if task else 'a task without --task_name'}")
            if not Path(path).is_file():
                raise FileNotFoundError(f"--{option}: file not found: {path}")
        return {names[o]: (read_file(p, cache, cache_dir), str(p)) for o, p in given.items()}
    if task is None:
        raise ValueError("give --task_name for a hub dataset, or local files (--train_file ...)")
    if task.local_only:
        raise ValueError(f"task {task.name!r} has no hub dataset: give local files (--train_file, --test_file, ...)")
    hub = datasets.load_dataset(HUB_DATASET, task.name, cache_dir=cache_dir)
    return {split: (ds, f"{HUB_DATASET}/{task.name}/{split}") for split, ds in hub.items()}


# ---- columns, task and labels ---------------------------------------------------------------------------------------
def infer_text_columns(columns: Sequence[str], label_column: str = "label") -> tuple[str, ...]:
    """The text columns of a file: a known task's (pairs first), else the one or two columns besides the label and
    an index (``idx`` / ``id``)."""
    known = sorted(dict.fromkeys(t.text_columns for t in TASKS.values()), key=len, reverse=True)
    found = next((cols for cols in known if set(cols) <= set(columns)), None)
    rest = tuple(c for c in columns if c != label_column and c.lower() not in ("idx", "id", "index"))
    if found is None and len(rest) not in (1, 2):
        raise ValueError(f"cannot tell the text columns among {', '.join(columns) or 'no columns'}; name one or two "
                         "with --text_column")
    return found or rest


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError):
        return None


def _key(v: Any) -> str:
    """A label value as a class name: ``1``, ``"1"`` and ``1.0`` are all ``"1"``."""
    x = _number(v)
    return str(int(x)) if x is not None and x.is_integer() else str(v).strip()


def infer_task(train: datasets.Dataset, text_columns: Sequence[str], label_column: str = "label",
               source: str = "train") -> GlueTask:
    """A task for local files without ``--task_name``: regression when every label of train is a number and not
    all are whole, else classification over the distinct labels (numbers in numeric order, then names)."""
    if label_column not in train.column_names:
        raise ValueError(f"{source}: no label column {label_column!r} (columns present: "
                         f"{', '.join(train.column_names)}); name it with --label_column")
    values = [v for v in train[label_column] if not _is_unlabelled(v)]
    numbers = [_number(v) for v in values]
    if values and None not in numbers and not all(x.is_integer() for x in numbers):
        return GlueTask(CUSTOM, tuple(text_columns), (), ("validation",), ("test",), ("pearson", "spearman", "mse"),
                        "pearson", local_only=True)
    names = sorted({_key(v) for v in values}, key=lambda k: (_number(k) is None, _number(k) or 0.0, k))
    if len(names) < 2:
        raise ValueError(f"{source}: the labels of {label_column!r} take {len(names)} distinct value(s); a task "
                         "needs two classes or numeric targets")
    return GlueTask(CUSTOM, tuple(text_columns), tuple(names), ("validation",), ("test",),
                    ("accuracy", "f1_weighted"), "accuracy", local_only=True)


def _examples(values: Iterable[tuple[int, Any]], limit: int = 3) -> str:
    return ", ".join(f"row {i}: {v!r}" for i, v in list(values)[:limit])


def _is_unlabelled(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() in ("", "-1")) or (
        isinstance(v, int | float) and not isinstance(v, bool) and v == -1)


def _parse_labels(task: GlueTask, raw: list[Any], source: str) -> list[int] | list[float]:
    if task.is_regression:
        numbers = [_number(v) for v in raw]
        bad = [(i, v) for i, (v, x) in enumerate(zip(raw, numbers), 1) if x is None]
        if bad:
            raise ValueError(f"{source}: {len(bad)} non-numeric labels for the regression task {task.name} "
                             f"({_examples(bad)})")
        lo, hi = task.label_range or (-math.inf, math.inf)
        bad = [(i, x) for i, x in enumerate(numbers, 1) if not (math.isfinite(x) and lo <= x <= hi)]
        if bad:
            raise ValueError(f"{source}: {len(bad)} labels outside [{lo:g}, {hi:g}] for task {task.name} "
                             f"({_examples(bad)})")
        return numbers
    by_name = {name: i for i, name in enumerate(task.label_names)}
    ids = [None if isinstance(v, bool) or v is None else by_name.get(_key(v), _whole(_number(v))) for v in raw]
    bad = [(i, v) for i, (v, label) in enumerate(zip(raw, ids), 1) if label not in task.label_set]
    if bad:
        found = ", ".join(f"{v} (x{c})" for v, c in Counter(repr(v) for _, v in bad).most_common(5))
        valid = ", ".join(f"{i}={name}" for i, name in enumerate(task.label_names))
        raise ValueError(f"{source}: {len(bad)} labels outside the label set of {task.name} ({valid}): found "
                         f"{found}; first at {_examples(bad, 1)}")
    return ids


def _whole(x: float | None) -> int | None:
    return int(x) if x is not None and x.is_integer() else None


def check_split(task: GlueTask, ds: datasets.Dataset, source: str, label_column: str = "label",
                labels_required: bool = True) -> datasets.Dataset:
    """The task's text columns of ``ds`` and its labels as ids (``label``; floats for regression), checked.

    Raises:
        ValueError: a missing column (with the columns present), a missing or non-string text, no examples, labels
            outside the label set (which values, how many, the first row), non-numeric or out-of-range targets.
    """
    needed = [*task.text_columns, label_column]
    missing = [c for c in (needed if labels_required else task.text_columns) if c not in ds.column_names]
    if missing:
        raise ValueError(f"{source}: missing required column {missing[0]!r} for task {task.name} (needs "
                         f"{', '.join(needed)}); columns present: {', '.join(ds.column_names) or 'none'}; name "
                         "others with --text_column / --label_column")
    for column in task.text_columns:
        bad = [(i, v) for i, v in enumerate(ds[column], 1) if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{source}: text column {column!r} has {len(bad)} missing or non-string values "
                             f"({_examples(bad)})")
    if len(ds) == 0:
        raise ValueError(f"{source}: no examples")
    labels = None
    if label_column in ds.column_names:
        raw = list(ds[label_column])
        if labels_required or not all(_is_unlabelled(v) for v in raw):
            labels = _parse_labels(task, raw, source)
    ds = ds.select_columns(list(task.text_columns))
    return ds if labels is None else ds.add_column("label", labels)


def load_raw_splits(task: str | GlueTask | None, *, text_columns: Sequence[str] | None = None,
                    label_column: str = "label", cache: bool = False, cache_dir: str | None = None,
                    **files: str | os.PathLike | None) -> tuple[GlueTask, dict[str, datasets.Dataset]]:
    """``(task, {split: checked dataset of text columns and labels})`` from local files (``train_file=...``, see
    :data:`FILE_OPTIONS`) or the hub; ``task=None`` infers the task from ``train_file``."""
    unknown = set(files) - set(FILE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown file options {sorted(unknown)}; use {', '.join(FILE_OPTIONS)}")
    task = get_task(task) if task is not None else None
    raw = read_splits(task, files, cache, cache_dir)
    if task is None:
        if "train" not in raw:
            raise ValueError("without --task_name the task is inferred from the training data: give --train_file")
        train, source = raw["train"]
        task = infer_task(train, text_columns or infer_text_columns(train.column_names, label_column),
                          label_column, source)
    elif text_columns:
        task = dataclasses.replace(task, text_columns=tuple(text_columns))
    return task, {split: check_split(task, ds, source, label_column, labels_required=not split.startswith("test"))
                  for split, (ds, source) in raw.items()}


# ---- tokenising -----------------------------------------------------------------------------------------------------
def tokenize(ds: datasets.Dataset, task: GlueTask, tokenizer: Any, max_length: int, *, space_residues: bool = False,
             cache: bool = False, desc: str = "tokenising") -> datasets.Dataset:
    """Token ids of every example, truncated to ``max_length`` (pairs longest first), unpadded; ``label`` kept.
    ``space_residues`` puts a space between the characters of each text (protein models, one token per residue)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    columns = list(task.text_columns)

    def encode(batch: dict[str, list]) -> Any:
        texts = [batch[c] for c in columns]
        if space_residues:  # "MKV" -> "M K V"
            texts = [[" ".join("".join(t.split())) for t in column] for column in texts]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    return ds.map(encode, batched=True, remove_columns=columns, load_from_cache_file=cache, keep_in_memory=not cache,
                  desc=desc)


def load_glue_datasets(task: str | GlueTask | None, tokenizer: Any, max_length: int, *,
                       text_columns: Sequence[str] | None = None, label_column: str = "label",
                       space_residues: bool = False, cache: bool = False, cache_dir: str | None = None,
                       **files: str | os.PathLike | None) -> tuple[GlueTask, dict[str, datasets.Dataset]]:
    """:func:`load_raw_splits` then :func:`tokenize` on every split: ``(task, {split: dataset})``."""
    task, raw = load_raw_splits(task, text_columns=text_columns, label_column=label_column, cache=cache,
                                cache_dir=cache_dir, **files)
    return task, {split: tokenize(ds, task, tokenizer, max_length, space_residues=space_residues, cache=cache,
                                  desc=f"tokenising {task.name}/{split}") for split, ds in raw.items()}
