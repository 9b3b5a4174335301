"""Plan an ESM-2 run of the Table 4 scripts: check the CSV files, size the schedule, estimate download and GPU time.

Used by ``examples/bio/esm2_650m_*.sh``::

    eval "$(python examples/bio/plan.py --train train.csv --test test.csv --size 650M --epochs 10 \
            --max-length 64 --methods "lora dora bidora" --seeds "0 1 2 3 4")"

prints the plan on stderr and ``ITERATIONS=...`` / ``RETRAIN_ITERATIONS=...`` / ``MODEL=...`` on stdout (shell
assignments; the scripts pass them to run_glue.py as ``--max_steps`` and ``--retrain_max_steps``). They are whole
epochs over the part each phase trains on: the lower 80% of train for the search phase (and for ft/LoRA/DoRA,
which hold out the same 20% for model selection), all of train for BiDoRA's retraining. Exit status 1 with a
message when a file is missing or is not a ``sequence,label`` CSV.

The GPU time is an ESTIMATE (order of magnitude, not a measurement): 6·P FLOPs per token for full fine-tuning and
4·P for an adapter step (no weight gradients), every sequence counted at ``max_length`` tokens (an upper bound:
batches are padded to their longest sequence), a BiDoRA search step counted as 4 adapter steps (lower step,
upper step, two finite-difference passes of DARTS), at an assumed 40 TFLOP/s sustained (fp32/TF32 on an
A100/H100-class GPU), plus a fixed 0.05 s per step (launch and optimiser overhead, dominant for small models).
Evaluation passes are not counted.
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import ESM2_CHECKPOINTS, esm2_checkpoint  # noqa: E402

__all__ = ["ESM2_PARAMETERS", "count_rows", "schedule", "estimate_gpu_seconds", "main"]

# Parameter counts of the ESM-2 checkpoints (the published model sizes); download ~ 4 bytes per parameter (fp32).
ESM2_PARAMETERS: dict[str, float] = {"8M": 7.8e6, "35M": 33.9e6, "150M": 148e6, "650M": 651e6, "3B": 2.84e9}
ASSUMED_FLOPS = 40e12
BIDORA_SEARCH_FACTOR = 4.0
STEP_OVERHEAD_S = 0.05


def count_rows(path: str | Path, require_label: bool = True) -> int:
    """Data rows of a ``sequence,label`` CSV (header required). Raises ValueError / FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        needed = ["sequence", "label"] if require_label else ["sequence"]
        missing = [c for c in needed if c not in header]
        if missing:
            raise ValueError(f"{path}: needs a header with columns {needed}; missing {missing} (header: {header})")
        n = sum(1 for row in reader if any(x.strip() for x in row))
    if n == 0:
        raise ValueError(f"{path}: no data rows")
    return n


def schedule(n_train: int, epochs: float, batch_size: int, upper_fraction: float) -> tuple[int, int]:
    """(search/ft/LoRA/DoRA iterations, BiDoRA retraining iterations): ``epochs`` passes over the lower part of
    train (its size as the trainer splits it: ``n - round(n * upper_fraction)``) and over all of train."""
    if n_train < 2 or epochs <= 0 or batch_size <= 0:
        raise ValueError(f"need n_train >= 2, epochs > 0, batch_size > 0 (got {n_train}, {epochs}, {batch_size})")
    n_lower = n_train - int(round(n_train * upper_fraction))
    return max(1, math.ceil(epochs * n_lower / batch_size)), max(1, math.ceil(epochs * n_train / batch_size))


def estimate_gpu_seconds(size: str, method: str, iterations: int, retrain_iterations: int, batch_size: int,
                         max_length: int) -> float:
    """Rough GPU seconds of one run (see the module docstring for the assumptions)."""
    params = ESM2_PARAMETERS[size.upper()]
    tokens = batch_size * max_length
    adapter_step = 4 * params * tokens / ASSUMED_FLOPS + STEP_OVERHEAD_S
    if method == "ft":
        return iterations * (6 * params * tokens / ASSUMED_FLOPS + STEP_OVERHEAD_S)
    if method == "bidora":
        return iterations * BIDORA_SEARCH_FACTOR * adapter_step + retrain_iterations * adapter_step
    return iterations * adapter_step


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if n < 10 else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _human_seconds(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--validation", default=None)
    parser.add_argument("--size", default="650M", help=f"ESM-2 size: {', '.join(ESM2_CHECKPOINTS)}")
    parser.add_argument("--epochs", type=float, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--upper-fraction", type=float, default=0.2)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--methods", default="lora dora bidora")
    parser.add_argument("--seeds", default="0 1 2 3 4")
    args = parser.parse_args(argv)
    try:
        model = esm2_checkpoint(args.size)
        n_train = count_rows(args.train)
        n_test = count_rows(args.test, require_label=True)
        n_val = count_rows(args.validation) if args.validation else None
        iters, retrain = schedule(n_train, args.epochs, args.batch_size, args.upper_fraction)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    methods, seeds = args.methods.split(), args.seeds.split()
    bad = [m for m in methods if m not in ("ft", "lora", "dora", "bidora")]
    if bad or not methods or not seeds:
        print(f"error: METHODS must be among ft lora dora bidora (got {methods}); SEEDS must not be empty",
              file=sys.stderr)
        return 1
    size = args.size.upper()
    total = 0.0
    lines = [
        f"model: {model} ({ESM2_PARAMETERS[size] / 1e6:,.0f}M parameters; download ~"
        f"{_human_bytes(4 * ESM2_PARAMETERS[size])} once, into the Hugging Face cache)",
        f"data: train {n_train} rows ({args.train}), test {n_test} rows ({args.test})"
        + (f", validation {n_val} rows ({args.validation})" if n_val else ""),
        f"schedule: {args.epochs:g} epochs, batch {args.batch_size}: {iters} steps (ft/lora/dora; BiDoRA search "
        f"phase), then {retrain} BiDoRA retraining steps on all of train",
        f"runs: methods {' '.join(methods)} x seeds {' '.join(seeds)}",
    ]
    for m in methods:
        t = estimate_gpu_seconds(size, m, iters, retrain, args.batch_size, args.max_length)
        total += t * len(seeds)
        lines.append(f"  {m:7s} ~{_human_seconds(t)} per seed (ESTIMATE)")
    lines.append(f"GPU time, ESTIMATE (assumes {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s, every sequence {args.max_length} "
                 f"tokens; see examples/bio/plan.py): ~{_human_seconds(total)} in all")
    print("\n".join(lines), file=sys.stderr)
    print(f"ITERATIONS={iters}")
    print(f"RETRAIN_ITERATIONS={retrain}")
    print(f"MODEL={shlex.quote(model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
