"""The BiDoRA paper's published numbers (utils/data/paper_results.json) and the name normalisation for runs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "data" / "paper_results.json"


@dataclass(frozen=True)
class TaskSpec:
    """How one task is reported: which metric, read from which split, in which display units."""

    key: str
    name: str
    metric: str
    splits: tuple[str, ...]
    scale: float  # display value = scale * value in the results file (100: fraction -> percent)
    decimals: int
    glue: bool  # counts in the GLUE average
    higher_is_better: bool
    derived_from: str | None = None  # e.g. MNLI-mm is read from the MNLI run's results file


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper table."""

    table: str
    model: str
    method: str
    rank: int | None
    scores: dict[str, float]
    avg: float | None
    rank_stated: bool = True
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PaperData:
    tasks: dict[str, TaskSpec]
    rows: tuple[PaperRow, ...]
    task_aliases: dict[str, str]
    metric_aliases: dict[str, tuple[str, ...]]
    model_aliases: dict[str, str]
    method_names: dict[str, str]
    slopes: dict[str, float]
    wilcoxon_p: float | None
    notes: tuple[str, ...]

    def task_order(self) -> list[str]:
        """Task keys in the order the paper's tables list them."""
        return list(self.tasks)

    def method_label(self, method: str) -> str:
        return self.method_names.get(method, method)

    def lookup(self, model: str, method: str, rank: int | None) -> PaperRow | None:
        """The paper row for (model, method, rank): an exact rank match first, then a row whose rank is unstated."""
        candidates = [r for r in self.rows if r.model == model and r.method == method]
        exact = [r for r in candidates if r.rank is not None and r.rank == rank]
        if exact:
            return exact[0]
        loose = [r for r in candidates if r.rank is None]
        return loose[0] if loose else None


def _simplify(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.strip().lower())


def normalise_task(name: str, data: PaperData | None = None) -> str:
    """'SST-2', 'sst_2', 'glue/sst2' -> 'sst2'. Unknown tasks are returned simplified (lower case, no separators)."""
    data = data or load_paper_data()
    lowered = name.strip().lower()
    if lowered in data.task_aliases:
        return data.task_aliases[lowered]
    simple = _simplify(lowered.rsplit("/", 1)[-1])
    return data.task_aliases.get(simple, simple)


def normalise_model(name: str, data: PaperData | None = None) -> str:
    """'FacebookAI/roberta-base' -> 'roberta-base'; other hub ids lose their organisation prefix, lower case."""
    data = data or load_paper_data()
    lowered = name.strip().lower()
    if lowered in data.model_aliases:
        return data.model_aliases[lowered]
    short = lowered.rsplit("/", 1)[-1]
    return data.model_aliases.get(short, short)


def normalise_method(name: str) -> str:
    """'BiDoRA' -> 'bidora', 'full' / 'full_ft' / 'finetune' -> 'ft'."""
    simple = _simplify(name)
    if simple in {"full", "fullft", "finetune", "fullfinetuning", "fullfinetune"}:
        return "ft"
    return simple


def _parse(raw: dict) -> PaperData:
    tasks = {}
    for key, spec in raw["tasks"].items():
        tasks[key] = TaskSpec(
            key=key,
            name=spec["name"],
            metric=spec["metric"],
            splits=tuple(spec["splits"]),
            scale=float(spec["scale"]),
            decimals=int(spec["decimals"]),
            glue=bool(spec["glue"]),
            higher_is_better=bool(spec["higher_is_better"]),
            derived_from=spec.get("derived_from"),
        )
    rows = []
    seen = set()
    for table in raw["tables"]:
        for row in table["rows"]:
            unknown = set(row["scores"]) - set(tasks)
            if unknown:
                raise ValueError(f"paper data {table['id']}: unknown task(s) {sorted(unknown)}")
            key = (row["model"], row["method"], row["rank"])
            if key in seen:  # the lookup must be unambiguous
                raise ValueError(f"paper data: two rows for model/method/rank {key}")
            seen.add(key)
            rows.append(
                PaperRow(
                    table=table["id"],
                    model=row["model"],
                    method=row["method"],
                    rank=row["rank"],
                    scores={k: float(v) for k, v in row["scores"].items()},
                    avg=row.get("avg"),
                    rank_stated=row.get("rank_stated", True),
                    extra=row.get("other_metrics", {}),
                )
            )
    slopes = {k: float(v) for k, v in raw.get("weight_decomposition_slopes", {}).items() if k != "note"}
    return PaperData(
        tasks=tasks,
        rows=tuple(rows),
        task_aliases={k.lower(): v for k, v in raw.get("task_aliases", {}).items()},
        metric_aliases={k: tuple(v) for k, v in raw.get("metric_aliases", {}).items()},
        model_aliases={k.lower(): v for k, v in raw.get("model_aliases", {}).items()},
        method_names=dict(raw.get("method_names", {})),
        slopes=slopes,
        wilcoxon_p=raw.get("wilcoxon", {}).get("p"),
        notes=tuple(raw.get("notes", [])),
    )


@lru_cache(maxsize=4)
def load_paper_data(path: str | Path = DATA_FILE) -> PaperData:
    """Read and check the paper's tables (cached; the file is data in the repo, not user input)."""
    with open(path, encoding="utf-8") as fh:
        return _parse(json.load(fh))
