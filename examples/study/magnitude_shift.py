"""How far do the learned magnitudes move from their start ‖W0‖_row? DoRA's against BiDoRA's, per study cell.

    python examples/study/magnitude_shift.py [--runs runs/study/runs] [--glob '*-n200/*/seed*'] [--out FILE]

For every finished cell under ``--runs`` whose saved adapter (``<cell>/adapter``) carries magnitudes (DoRA, BiDoRA;
for BiDoRA the magnitudes its search learned, frozen during retraining), loads the adapter onto the cell's base model
and reports the relative shift ``‖m − ‖W0‖_row‖ / ‖‖W0‖_row‖``, pooled over every adapted layer (0 = the magnitudes
never moved). If the upper level hardly moves them, BiDoRA is DoRA with near-frozen magnitudes, and the choice of
hypergradient can matter little. Needs the cells' checkpoints folders (``runs/``, not committed); writes a small JSON
(default results/study/magnitude_shift.json) that is.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "examples" / "NLU"))

import loralib  # noqa: E402
from loralib.files import atomic_write_text  # noqa: E402


def relative_magnitude_shift(model: nn.Module) -> float:
    """``sqrt(Σ_layers ‖m − ‖W0‖_row‖²) / sqrt(Σ_layers ‖‖W0‖_row‖²)`` over the model's DoRA / BiDoRA layers (float64).

    Raises:
        ValueError: the model has no layer with a magnitude (LoRA or no adapters).
    """
    moved = start = 0.0
    for _, layer in loralib.adapter_layers(model):
        if not layer.decomposed:
            continue
        m0 = layer.base_weight().detach().double().norm(dim=1)
        moved += (layer.magnitude.detach().double().flatten() - m0).square().sum().item()
        start += m0.square().sum().item()
    if start == 0.0:
        raise ValueError("the model has no DoRA / BiDoRA layer: nothing has a magnitude")
    return math.sqrt(moved / start)


def _num_labels(adapter_dir: Path) -> int:
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as tensors:
        heads = [k for k in tensors.keys() if k.endswith("classifier.weight")]
        if not heads:
            raise ValueError(f"{adapter_dir}: no saved classifier head, so the base model cannot be rebuilt")
        return tensors.get_slice(heads[0]).get_shape()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "study" / "runs")
    parser.add_argument("--glob", default="*-n200/*/seed*", help="cells under --runs (dataset-nN/arm/seedK)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "study" / "magnitude_shift.json")
    args = parser.parse_args(argv)
    from modeling import load_classifier

    bases: dict[tuple, nn.Module] = {}
    rows = []
    for cell in sorted(p for p in args.runs.glob(args.glob) if (p / "adapter" / "adapter_config.json").is_file()):
        meta = loralib.read_adapter_config(cell / "adapter")
        if meta["config"]["method"] == "lora":
            continue
        run = json.loads((cell / "run_config.json").read_text())
        key = (run["model_name_or_path"], run["pooling"], _num_labels(cell / "adapter"))
        if key not in bases:
            bases[key] = load_classifier(key[0], key[2], pooling=key[1])
        model = loralib.load_adapters(copy.deepcopy(bases[key]), cell / "adapter")
        rows.append({"cell": str(cell.relative_to(args.runs)), "method": meta["config"]["method"],
                     "relative_shift": relative_magnitude_shift(model)})
    if not rows:
        print(f"no DoRA / BiDoRA adapter under {args.runs}/{args.glob}: run the study first", file=sys.stderr)
        return 1
    by_arm: dict[str, list[float]] = {}
    for row in rows:
        by_arm.setdefault(row["cell"].rsplit("/", 1)[0], []).append(row["relative_shift"])
    print("| cells | seeds | median ‖m − m0‖ / ‖m0‖ | range |\n|---|---:|---:|---|")
    for arm, values in by_arm.items():
        print(f"| {arm} | {len(values)} | {statistics.median(values):.2%} | {min(values):.2%} – {max(values):.2%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"glob": args.glob, "cells": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
