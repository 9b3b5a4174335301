"""GLUE data: read (hub or local files), validate, tokenise (cached), pad and batch.

Pipeline::

    raw = load_raw_splits("mrpc", train_file=..., validation_file=...)   # {split: RawSplit}, validated
    data = {s: tokenize_split(r, tokenizer, max_length=128, cache_dir=...) for s, r in raw.items()}
    collate = GlueCollator.from_tokenizer(tokenizer, pad_to_max_length=False, max_length=128)
    DataLoader(data["train"], batch_size=32, collate_fn=collate)          # batches are plain dicts

or all at once with :func:`load_glue_datasets`.

Sources. Without any local file the task is downloaded with ``datasets.load_dataset("nyu-mll/glue", task)``.
With at least one of ``train_file`` / ``validation_file`` / ``validation_mismatched_file`` / ``test_file`` only the
given files are read (hub and local splits are never mixed). Local files use the hub's column layout (the task's
text columns, e.g. ``sentence1,sentence2``, plus ``label``; other columns are ignored) and are read by extension:

* ``.csv``: comma-separated with a header, standard CSV quoting;
* ``.tsv``: tab-separated with a header and *no* quoting (the GLUE distribution's convention: quote characters are
  text; fields cannot contain tabs or newlines);
* ``.json``: a JSON array of objects, or JSON Lines (what ``datasets.Dataset.to_json`` writes);
* ``.jsonl``: JSON Lines.

Split names: ``train_file`` -> ``train``; ``validation_file`` -> ``validation`` (MNLI: ``validation_matched``);
``validation_mismatched_file`` -> ``validation_mismatched`` (MNLI only); ``test_file`` -> ``test``
(MNLI: ``test_matched``).

Labels: classification labels are integer ids (``1``, ``"1"``, ``1.0``) or the class names of the task
(``"entailment"``); STS-B labels are numbers in [0, 5]. A test file may omit the label column or use ``-1`` / empty
labels throughout (unlabelled, the GLUE test convention); any other split needs valid labels for every row.

Examples are tokenised without padding and cached (``torch.save`` of flat int32 tensors, loaded with
``weights_only=True``) under a key made of the task, split, data content, tokenizer contents and ``max_length``, so
a changed file, tokenizer or length never reuses a stale cache. Padding happens per batch in :class:`GlueCollator`:
to the longest example (default) or to ``max_length`` (``pad_to_max_length``, the original scripts' setting).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from glue_tasks import GlueTask, get_task
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from loralib.files import atomic_write

HUB_DATASET = "nyu-mll/glue"
SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl")
_CACHE_VERSION = 1
_UNLABELLED = (-1, "-1", "", None)


# ---------------------------------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RawSplit:
    """One validated split before tokenisation.

    Attributes:
        task: the task.
        name: split name (``"train"``, ``"validation_matched"``, ``"test"``...).
        source: where it came from (a file path or ``"nyu-mll/glue/<task>/<split>"``), for messages.
        texts: one list of strings per text column of the task, all of the same length.
        labels: ``list[int]`` (classification), ``list[float]`` (STS-B), or ``None`` for an unlabelled split.
    """

    task: GlueTask
    name: str
    source: str
    texts: list[list[str]]
    labels: list[int] | list[float] | None

    def __len__(self) -> int:
        return len(self.texts[0])

    def content_hash(self) -> str:
        """SHA-256 of the texts and labels (the data part of the cache key)."""
        h = hashlib.sha256()
        for column in self.texts:
            h.update(json.dumps(column, ensure_ascii=False).encode("utf-8"))
        h.update(json.dumps(self.labels).encode("utf-8"))
        return h.hexdigest()


def read_table(path: str | os.PathLike) -> tuple[list[str], list[dict[str, Any]]]:
    """Read a ``.csv`` / ``.tsv`` / ``.json`` / ``.jsonl`` file into ``(column names, rows)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported extension, malformed content (ragged rows, invalid JSON, duplicate header names).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(f"{path}: unsupported file type {ext!r}; use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    if ext in (".csv", ".tsv"):
        return _read_delimited(path, ext == ".tsv")
    return _read_json(path, lines=ext == ".jsonl")


def _read_delimited(path: Path, tsv: bool) -> tuple[list[str], list[dict[str, Any]]]:
    kwargs: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, **kwargs)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty file (expected a header line)")
        header = [h.strip() for h in header]
        dup = [h for h, c in Counter(header).items() if c > 1]
        if dup:
            raise ValueError(f"{path}: duplicate column names in the header: {dup}")
        rows = []
        for fields in reader:
            if not fields:  # blank line
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path}: line {reader.line_num} has {len(fields)} fields, the header has "
                                 f"{len(header)} ({'tab' if tsv else 'comma'}-separated)")
            rows.append(dict(zip(header, fields)))
    return header, rows


def _read_json(path: Path, lines: bool) -> tuple[list[str], list[dict[str, Any]]]:
    text = path.read_text(encoding="utf-8-sig")
    if not lines and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
    else:  # JSON Lines
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {lineno} is not valid JSON ({e}); expected a JSON array of "
                                     "objects or one object per line") from None
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: record {bad} is not a JSON object")
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    return list(columns), rows


def _examples(values: Iterable[tuple[int, Any]], limit: int = 3) -> str:
    return ", ".join(f"row {i}: {v!r}" for i, v in list(values)[:limit])


def build_split(
    task: str | GlueTask,
    name: str,
    columns: Mapping[str, Sequence[Any]],
    source: str,
    labels_required: bool = True,
) -> RawSplit:
    """Validate column data of one split and return a :class:`RawSplit`.

    Args:
        task: task name or :class:`GlueTask`.
        name: split name.
        columns: ``{column name: values}`` (extra columns are ignored).
        source: file path or hub id, used in error messages.
        labels_required: False for test splits, which may be unlabelled (no ``label`` column, or all ``-1``).

    Raises:
        ValueError: missing column (named, with the columns present), non-string text, labels outside the label
            set (which values and how many), non-numeric / non-finite / out-of-range STS-B scores.
    """
    task = get_task(task)
    present = list(columns)
    needed = [*task.text_columns, "label"] if labels_required else list(task.text_columns)
    for col in needed:
        if col not in columns:
            raise ValueError(f"{source}: missing required column {col!r} for task {task.name} (needs "
                             f"{', '.join([*task.text_columns, 'label'])}); columns present: "
                             f"{', '.join(map(str, present)) or 'none'}")
    n = len(columns[task.text_columns[0]])
    texts = []
    for col in task.text_columns:
        values = list(columns[col])
        if len(values) != n:
            raise ValueError(f"{source}: column {col!r} has {len(values)} values, expected {n}")
        bad = [(i, v) for i, v in enumerate(values, 1) if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{source}: text column {col!r} has {len(bad)} missing or non-string values "
                             f"({_examples(bad)})")
        texts.append(values)
    if n == 0:
        raise ValueError(f"{source}: no examples")
    labels = None
    if "label" in columns:
        raw_labels = list(columns["label"])
        if len(raw_labels) != n:
            raise ValueError(f"{source}: column 'label' has {len(raw_labels)} values, expected {n}")
        unlabelled = all(_is_unlabelled(v) for v in raw_labels)
        if not (unlabelled and not labels_required):
            labels = _parse_labels(task, raw_labels, source)
    return RawSplit(task, name, source, texts, labels)


def _is_unlabelled(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() in ("", "-1")) or (
        isinstance(v, int | float) and not isinstance(v, bool) and v == -1)


def _parse_labels(task: GlueTask, raw: list[Any], source: str) -> list[int] | list[float]:
    if task.is_regression:
        out, bad = [], []
        for i, v in enumerate(raw, 1):
            try:
                if isinstance(v, bool):
                    raise TypeError
                x = float(v.strip() if isinstance(v, str) else v)
            except (TypeError, ValueError):
                bad.append((i, v))
                continue
            out.append(x)
        if bad:
            raise ValueError(f"{source}: {len(bad)} non-numeric labels for the regression task {task.name} "
                             f"({_examples(bad)})")
        lo, hi = task.label_range or (-math.inf, math.inf)
        bad = [(i, x) for i, x in enumerate(out, 1) if not (math.isfinite(x) and lo <= x <= hi)]
        if bad:
            raise ValueError(f"{source}: {len(bad)} labels outside [{lo:g}, {hi:g}] for task {task.name} "
                             f"({_examples(bad)})")
        return out
    by_name = {name: i for i, name in enumerate(task.label_names)}
    out_ids: list[int] = []
    bad_values: Counter = Counter()
    first_bad: list[tuple[int, Any]] = []
    for i, v in enumerate(raw, 1):
        label = _class_id(v, by_name)
        if label is None or label not in task.label_set:
            bad_values[repr(v)] += 1
            first_bad.append((i, v))
            continue
        out_ids.append(label)
    if bad_values:
        found = ", ".join(f"{v} (x{c})" for v, c in bad_values.most_common(5))
        valid = ", ".join(f"{i}={name}" for i, name in enumerate(task.label_names))
        raise ValueError(f"{source}: {sum(bad_values.values())} labels outside the label set of {task.name} "
                         f"({valid}): found {found}; first at {_examples(first_bad, 1)}")
    return out_ids


def _class_id(v: Any, by_name: dict[str, int]) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    if isinstance(v, str):
        s = v.strip()
        if s in by_name:
            return by_name[s]
        try:
            x = float(s)
        except ValueError:
            return None
        return int(x) if x.is_integer() else None
    return None


def _file_splits(task: GlueTask) -> dict[str, str]:
    """Config option -> split name for local files."""
    if task.name == "mnli":
        return {"train_file": "train", "validation_file": "validation_matched",
                "validation_mismatched_file": "validation_mismatched", "test_file": "test_matched"}
    return {"train_file": "train", "validation_file": "validation", "test_file": "test"}


def load_local_splits(
    task: str | GlueTask,
    *,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    validation_mismatched_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
) -> dict[str, RawSplit]:
    """Read and validate the given local files (see the module docstring for formats and split names).

    Raises:
        FileNotFoundError: a given file does not exist (the option is named).
        ValueError: invalid content, or ``validation_mismatched_file`` for a task other than MNLI.
    """
    task = get_task(task)
    given = {"train_file": train_file, "validation_file": validation_file,
             "validation_mismatched_file": validation_mismatched_file, "test_file": test_file}
    mapping = _file_splits(task)
    splits = {}
    for option, path in given.items():
        if path is None:
            continue
        if option not in mapping:
            raise ValueError(f"--{option} is only for MNLI (matched/mismatched dev sets), not {task.name}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--{option}: file not found: {path}")
        header, rows = read_table(path)
        # A JSON record lacking a key gets None, reported below as a missing value of that column.
        columns = {c: [r.get(c) for r in rows] for c in header}
        split = mapping[option]
        splits[split] = build_split(task, split, columns, str(path), labels_required=option != "test_file")
    return splits


def load_hub_splits(task: str | GlueTask, cache_dir: str | None = None) -> dict[str, RawSplit]:
    """Download ``nyu-mll/glue/<task>`` with ``datasets`` and validate every split (test splits unlabelled)."""
    import datasets  # imported here: only this path needs it

    task = get_task(task)
    if task.local_only:
        raise ValueError(f"task {task.name!r} has no hub dataset: give local files (--train_file, --test_file, ...)")
    dsd = datasets.load_dataset(HUB_DATASET, task.name, cache_dir=cache_dir)
    splits = {}
    for split, ds in dsd.items():
        cols = [*task.text_columns, "label"]
        columns = {c: list(ds[c]) for c in cols if c in ds.column_names}
        splits[split] = build_split(task, split, columns, f"{HUB_DATASET}/{task.name}/{split}",
                                    labels_required=not split.startswith("test"))
    return splits


def load_raw_splits(
    task: str | GlueTask,
    *,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    validation_mismatched_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    hub_cache_dir: str | None = None,
) -> dict[str, RawSplit]:
    """Local files when any is given, else the hub. Returns ``{split name: RawSplit}``."""
    files = dict(train_file=train_file, validation_file=validation_file,
                 validation_mismatched_file=validation_mismatched_file, test_file=test_file)
    if any(v is not None for v in files.values()):
        return load_local_splits(task, **files)
    return load_hub_splits(task, cache_dir=hub_cache_dir)


# ---------------------------------------------------------------------------------------------------------------
# Tokenised dataset
# ---------------------------------------------------------------------------------------------------------------


class GlueDataset(Dataset):
    """Tokenised, unpadded examples stored as flat tensors; ``ds[i]`` is a dict of tensors.

    Items: ``input_ids`` (long, 1-D), ``attention_mask`` (ones, long), ``token_type_ids`` (when the tokenizer makes
    them), ``labels`` (0-d long, or 0-d float32 for STS-B; absent for an unlabelled split).
    """

    def __init__(
        self,
        task: GlueTask,
        split: str,
        input_ids: torch.Tensor,
        offsets: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        n = len(offsets) - 1
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} examples")
        self.task, self.split = task, split
        self._ids, self._offsets, self._types, self._labels = input_ids, offsets, token_type_ids, labels

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        i = int(i) % len(self)
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        ids = self._ids[a:b].long()
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self._types is not None:
            item["token_type_ids"] = self._types[a:b].long()
        if self._labels is not None:
            item["labels"] = self._labels[i].clone()
        return item

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def labels(self) -> torch.Tensor | None:
        """All labels (long, or float32 for STS-B), or None."""
        return self._labels

    @property
    def lengths(self) -> torch.Tensor:
        """Token count of every example."""
        return self._offsets[1:] - self._offsets[:-1]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> GlueDataset:
        """A new dataset holding ``indices`` (in that order), with its own compact storage."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        lengths = self.lengths[idx]
        offsets = torch.zeros(len(idx) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        pick = [torch.arange(int(self._offsets[i]), int(self._offsets[i + 1])) for i in idx.tolist()]
        flat = torch.cat(pick) if pick else torch.zeros(0, dtype=torch.long)
        types = None if self._types is None else self._types[flat]
        labels = None if self._labels is None else self._labels[idx]
        return GlueDataset(self.task, self.split, self._ids[flat], offsets, types, labels)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save (the cache format)."""
        out = {"input_ids": self._ids, "offsets": self._offsets}
        if self._types is not None:
            out["token_type_ids"] = self._types
        if self._labels is not None:
            out["labels"] = self._labels
        return out


def split_lower_upper(dataset: GlueDataset, upper_fraction: float, seed: int) -> tuple[GlueDataset, GlueDataset]:
    """Seeded random split of a training set into the lower (``1 - f``) and upper (``f``) parts.

    The upper part has ``round(f * n)`` examples; both parts keep the original order. Same seed, same split.

    Raises:
        ValueError: ``upper_fraction`` outside (0, 1), or a part that would be empty.
    """
    if not 0.0 < upper_fraction < 1.0:
        raise ValueError(f"upper_fraction must be in (0, 1), got {upper_fraction}")
    n = len(dataset)
    n_upper = round(upper_fraction * n)
    if n_upper < 1 or n_upper >= n:
        raise ValueError(f"upper_fraction={upper_fraction} of {n} examples leaves an empty split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    upper, lower = perm[:n_upper].sort().values, perm[n_upper:].sort().values
    return dataset.subset(lower), dataset.subset(upper)


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation with a cache
# ---------------------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what determines the token ids: class, vocabulary / pipeline, special tokens, truncation side.

    For fast tokenizers the full serialised pipeline is hashed (without its transient truncation/padding state);
    ``name_or_path`` alone would not do, as two tokenizers may share a name (or have none).
    """
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
        h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    extra = {
        "special": sorted((str(k), str(v)) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()),
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "inputs": list(getattr(tokenizer, "model_input_names", [])),
    }
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def cache_path(raw: RawSplit, tokenizer: Any, max_length: int, cache_dir: str | os.PathLike) -> Path:
    """File under ``cache_dir`` for this split tokenised with this tokenizer at this ``max_length``."""
    key = {"version": _CACHE_VERSION, "task": raw.task.name, "split": raw.name, "data": raw.content_hash(),
           "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": int(max_length)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{raw.task.name}-{raw.name}-{digest}.pt"


def tokenize_split(
    raw: RawSplit,
    tokenizer: Any,
    max_length: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 1000,
    progress: bool = True,
) -> GlueDataset:
    """Tokenise a split (truncating to ``max_length``, no padding), through the cache when ``cache_dir`` is set.

    Pairs are truncated longest-first (the tokenizer's ``truncation=True``). A cache file that cannot be read is
    ignored and rewritten.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    path = cache_path(raw, tokenizer, max_length, cache_dir) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            state = torch.load(path, weights_only=True)
            return GlueDataset(raw.task, raw.name, state["input_ids"], state["offsets"],
                               state.get("token_type_ids"), state.get("labels"))
        except Exception as e:  # corrupt or foreign file: recompute rather than fail or trust it
            print(f"warning: ignoring unreadable cache {path}: {e}")
    # Flattened per batch into int32 tensors, so the peak memory is one batch of Python ints, not the split's.
    id_chunks: list[torch.Tensor] = []
    type_chunks: list[torch.Tensor] = []
    lengths: list[int] = []
    n = len(raw)
    for start in tqdm(range(0, n, batch_size), desc=f"tokenising {raw.task.name}/{raw.name}", unit="batch",
                      disable=not progress or n <= batch_size):
        cols = [c[start:start + batch_size] for c in raw.texts]
        enc = tokenizer(*cols, truncation=True, max_length=max_length, padding=False)
        lengths.extend(len(x) for x in enc["input_ids"])
        id_chunks.append(torch.tensor(list(itertools.chain.from_iterable(enc["input_ids"])), dtype=torch.int32))
        if "token_type_ids" in enc:
            type_chunks.append(torch.tensor(list(itertools.chain.from_iterable(enc["token_type_ids"])),
                                            dtype=torch.int32))
    if type_chunks and len(type_chunks) != len(id_chunks):
        raise ValueError("the tokenizer returned token_type_ids for some batches only")
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    flat_ids = torch.cat(id_chunks)
    flat_types = torch.cat(type_chunks) if type_chunks else None
    labels = None
    if raw.labels is not None:
        labels = torch.tensor(raw.labels, dtype=torch.float32 if raw.task.is_regression else torch.long)
    ds = GlueDataset(raw.task, raw.name, flat_ids, offsets, flat_types, labels)
    if path is not None:
        atomic_write(path, lambda tmp: torch.save(ds.state(), tmp))
    return ds


def default_cache_dir() -> Path:
    """``$LORALIB_CACHE_DIR/glue`` if set, else ``~/.cache/loralib/glue``."""
    root = os.environ.get("LORALIB_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "loralib") / "glue"


def load_glue_datasets(
    task: str | GlueTask,
    tokenizer: Any,
    max_length: int,
    *,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    validation_mismatched_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    hub_cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, GlueDataset]:
    """:func:`load_raw_splits` then :func:`tokenize_split` on every split. Returns ``{split: GlueDataset}``.

    ``cache_dir=None`` disables the token cache (pass :func:`default_cache_dir` to use the default location).
    """
    raw = load_raw_splits(task, train_file=train_file, validation_file=validation_file,
                          validation_mismatched_file=validation_mismatched_file, test_file=test_file,
                          hub_cache_dir=hub_cache_dir)
    return {name: tokenize_split(r, tokenizer, max_length, cache_dir=cache_dir, progress=progress)
            for name, r in raw.items()}


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------


class GlueCollator:
    """Pad a list of :class:`GlueDataset` items into a batch: a plain ``dict`` of tensors.

    A plain dict (not a ``BatchEncoding``) because Betty turns any other mapping into a tuple of its keys.

    Args:
        pad_token_id: id used to pad ``input_ids``.
        pad_token_type_id: value used to pad ``token_type_ids``.
        pad_to_max_length: pad every batch to ``max_length`` instead of to its longest example.
        max_length: required with ``pad_to_max_length``.
        padding_side: ``"right"`` (default) or ``"left"``.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_token_type_id: int = 0,
        pad_to_max_length: bool = False,
        max_length: int | None = None,
        padding_side: str = "right",
    ) -> None:
        if pad_to_max_length and not max_length:
            raise ValueError("pad_to_max_length needs max_length")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id, self.pad_token_type_id = int(pad_token_id), int(pad_token_type_id)
        self.pad_to_max_length, self.max_length, self.padding_side = pad_to_max_length, max_length, padding_side

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pad_to_max_length: bool = False,
                       max_length: int | None = None) -> GlueCollator:
        """Collator with the tokenizer's pad token, pad token type and padding side."""
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        return cls(tokenizer.pad_token_id, getattr(tokenizer, "pad_token_type_id", 0), pad_to_max_length,
                   max_length, getattr(tokenizer, "padding_side", "right"))

    def __call__(self, items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("empty batch")
        longest = max(len(it["input_ids"]) for it in items)
        width = self.max_length if self.pad_to_max_length else longest
        if longest > width:
            raise ValueError(f"an example has {longest} tokens, more than max_length={width}")
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": self.pad_token_type_id}
        batch = {}
        for key, pad in pads.items():
            if key not in items[0]:
                continue
            out = torch.full((len(items), width), pad, dtype=torch.long)
            for row, it in enumerate(items):
                seq = it[key]
                if self.padding_side == "right":
                    out[row, : len(seq)] = seq
                else:
                    out[row, width - len(seq):] = seq
            batch[key] = out
        if "labels" in items[0]:
            batch["labels"] = torch.stack([it["labels"] for it in items])
        return batch
