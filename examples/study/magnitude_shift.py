"""How far do the learned magnitudes move from their start ‖W0‖_row? DoRA's against BiDoRA's, per study cell.

    python examples/study/magnitude_shift.py [--runs runs/study/runs] [--glob '*-n200/*/seed*'] [--out FILE]

For every finished cell under ``--runs`` whose saved adapter (``<cell>/adapter``) carries magnitudes (DoRA, BiDoRA;
for BiDoRA the magnitudes its search learned, frozen during retraining), reports the relative shift
``‖m − ‖W0‖_row‖ / ‖‖W0‖_row‖`` pooled over every adapted layer (0 = the magnitudes never moved; defined once, in
utils/magnitudes.py, against the cell's pretrained model). If the upper level hardly moves them, BiDoRA is DoRA with
near-frozen magnitudes, and the choice of hypergradient can matter little. Needs the cells' checkpoints folders
(``runs/``, not committed); writes a small JSON (default results/study/magnitude_shift.json) that is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `utils` importable
    sys.path.insert(0, str(ROOT))

import loralib  # noqa: E402
from loralib.files import atomic_write_text  # noqa: E402
from utils import magnitudes  # noqa: E402


def relative_magnitude_shift(model: nn.Module) -> float:
    """:func:`utils.magnitudes.relative_magnitude_shift` over the model's DoRA / BiDoRA layers.

    Raises:
        ValueError: the model has no layer with a magnitude (LoRA or no adapters).
    """
    return magnitudes.relative_magnitude_shift((layer.base_weight(), layer.magnitude.flatten())
                                               for _, layer in loralib.adapter_layers(model) if layer.decomposed)


def main(argv: list[str] | None = None) -> int:
    """Print the median shift per arm and write every cell's shift as JSON; 1 when no cell has magnitudes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "study" / "runs")
    parser.add_argument("--glob", default="*-n200/*/seed*", help="cells under --runs (dataset-nN/arm/seedK)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "study" / "magnitude_shift.json")
    args = parser.parse_args(argv)
    rows = []
    for cell in sorted(p for p in args.runs.glob(args.glob) if (p / "adapter" / "adapter_config.json").is_file()):
        if loralib.read_adapter_config(cell / "adapter")["config"]["method"] == "lora":
            continue
        method, shift = magnitudes.cell_magnitude_shift(cell)
        rows.append({"cell": str(cell.relative_to(args.runs)), "method": method, "relative_shift": shift})
    if not rows:
        print(f"no DoRA / BiDoRA adapter under {args.runs}/{args.glob}: run the study first", file=sys.stderr)
        return 1
    by_arm: dict[str, list[float]] = {}
    for row in rows:
        by_arm.setdefault(row["cell"].rsplit("/", 1)[0], []).append(row["relative_shift"])
    print("| cells | seeds | median ‖m − m0‖ / ‖m0‖ | range |\n|---|---:|---:|---|")
    for arm, values in by_arm.items():
        print(f"| {arm} | {len(values)} | {statistics.median(values):.2%} | {min(values):.2%} – {max(values):.2%} |")
    atomic_write_text(args.out, json.dumps({"glob": args.glob, "cells": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
