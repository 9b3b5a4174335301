"""The small-data study's figures: learning curves per (device, dataset), and the sensitivity forest plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.figures import pyplot, save_figure
from utils.formatting import p_text
from utils.results import Point
from utils.stats import seed_differences
from utils.study_tables import CORE_ROWS, DATASET_TITLES, ROW_LABELS, study_series


def plot_learning_curves(points: list[Point], path) -> Path:
    """One panel per (device, dataset): test accuracy against N (log axis), one line per row (mean, sample-std error
    bars), every seed as a dot."""
    plt = pyplot()
    series = study_series([p for p in points if p.group == "curve"])
    panels = sorted({(k[0], k[1]) for k in series})
    if not panels:
        raise ValueError("nothing to plot: no learning-curve cell recorded")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (device, dataset) in zip(axes[0], panels):
        for i, row in enumerate(CORE_ROWS):
            keys = sorted(k for k in series if k[:2] == (device, dataset) and k[3] == row)
            if not keys:
                continue
            colour = plt.get_cmap("tab10")(i)
            offset = 1 + 0.025 * (i - 2)  # side by side at each N
            xs = np.array([k[2] for k in keys], dtype=float) * offset
            means = [series[k].mean for k in keys]
            stds = [series[k].std or 0.0 for k in keys]
            ax.errorbar(xs, means, yerr=stds, marker="o", ms=4, capsize=3, color=colour, label=ROW_LABELS[row],
                        linestyle="--" if row == "bidora:search" else "-")
            for x, k in zip(xs, keys):
                ax.scatter(x * (1 + rng.uniform(-0.008, 0.008, series[k].n)), series[k].values, s=7,
                           color=colour, alpha=0.45, zorder=3)
        ax.set_xscale("log")
        sizes = sorted({k[2] for k in series if k[:2] == (device, dataset)})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlim(min(sizes) / 1.3, max(sizes) * 1.3)  # the arms' side-by-side offsets stay small next to N
        ax.minorticks_off()
        ax.set_xlabel("training examples N")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{DATASET_TITLES.get(dataset, dataset)} ({device})", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    # one caption for every panel: per panel it overlapped its neighbour's
    fig.supxlabel("mean ± sample std over seeds, seeds as dots; BiDoRA and early-stopped DoRA train on 80% of N and "
                  "use the other 20% as held-out data", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sensitivity(rows: list[dict], path) -> Path:
    """Forest plot: each sensitivity arm's paired difference to the default BiDoRA (retrained model; mean and 95%
    bootstrap interval, seeds as dots), one line per arm, grouped by factor."""
    plt = pyplot()
    if not rows:
        raise ValueError("nothing to plot: no sensitivity arm recorded")
    first = (rows[0]["device"], rows[0]["dataset"], rows[0]["size"])  # one (device, dataset, N) per figure
    rows = [e for e in rows if (e["device"], e["dataset"], e["size"]) == first]
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(rows) + 1.4))
    labels = []
    for y, e in enumerate(reversed(rows)):
        t = e["test"]
        ax.errorbar(t.mean_diff, y, xerr=[[t.mean_diff - t.ci_low], [t.ci_high - t.mean_diff]]
                    if t.ci_low is not None else None, fmt="o", color="tab:blue", capsize=3)
        diffs = seed_differences(e["series"], e["base"])[1]
        ax.scatter(diffs, [y] * len(diffs), s=8, color="black", alpha=0.5, zorder=3)
        labels.append(f"{e['factor']} = {e['level']} (Holm p = {p_text(e.get('p_holm'))})")
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("test accuracy − default BiDoRA (percent points; retrained model; 95% bootstrap, seeds as dots)")
    e0 = rows[0]
    ax.set_title(f"Sensitivity around the default, {DATASET_TITLES.get(e0['dataset'], e0['dataset'])} "
                 f"N = {e0['size']} ({e0['device']})", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)

