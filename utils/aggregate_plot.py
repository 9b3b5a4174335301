"""Bar chart of aggregated results: per task, methods side by side, error bars = sample std, paper value as a marker."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.paper_results import PaperData, load_paper_data
from utils.weight_decomposition import save_figure


def plot_task_bars(summary: dict, path: str | Path, data: PaperData | None = None) -> Path:
    """One panel per (model, unit): tasks on the x axis, one bar per (method, rank) group.

    Args:
        summary: {(model, method, rank): {task: Cell}} from utils.aggregate_results.summarise.
        path: PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.aggregate_results import group_order

    data = data or load_paper_data()
    if not summary:
        raise ValueError("nothing to plot")
    order = data.task_order()
    # Percent tasks and MSE do not share an axis: one panel per model and unit.
    panels: dict[tuple[str, str], list[str]] = {}
    for (model, _m, _r), cells in summary.items():
        for task in cells:
            spec = data.tasks[task]
            unit = "%" if spec.scale == 100 else spec.metric
            panels.setdefault((model, unit), [])
            if task not in panels[(model, unit)]:
                panels[(model, unit)].append(task)
    keys = sorted(panels)
    width_in = max(6.0, max(len(panels[k]) for k in keys) * 1.4)
    fig, axes = plt.subplots(len(keys), 1, figsize=(width_in, 3.6 * len(keys)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    # The same (method, rank) has the same colour in every panel.
    kinds = sorted({(g[1], g[2]) for g in summary}, key=lambda k: group_order(("", *k)))
    colour = {k: cmap(i % 10) for i, k in enumerate(kinds)}
    for ax, (model, unit) in zip(axes[:, 0], keys):
        tasks = sorted(panels[(model, unit)], key=order.index)
        groups = sorted((g for g in summary if g[0] == model and any(t in summary[g] for t in tasks)), key=group_order)
        width = 0.8 / max(len(groups), 1)
        x = np.arange(len(tasks))
        for i, group in enumerate(groups):
            _, method, rank = group
            offset = x - 0.4 + width * (i + 0.5)
            cells = [summary[group].get(t) for t in tasks]
            means = [c.mean if c else np.nan for c in cells]
            stds = [c.std if c and c.std is not None else 0.0 for c in cells]
            label = data.method_label(method) + ("" if rank is None else f" r={rank}")
            ax.bar(offset, means, width, yerr=stds, capsize=2, color=colour[(method, rank)], label=label)
            row = data.lookup(model, method, rank)
            # The paper's marker only where we have a bar to compare it with.
            paper = [row.scores.get(t, np.nan) if row and c else np.nan for t, c in zip(tasks, cells)]
            ax.scatter(offset, paper, marker="D", s=18, color="k", zorder=3,
                       label="paper" if i == 0 else None)
        ax.set_xticks(x, [data.tasks[t].name for t in tasks])
        ax.set_ylabel(unit if unit == "%" else unit.upper())
        ax.set_title(model, fontsize=10)
        shown = [c.mean for g in groups for t, c in summary[g].items() if t in tasks]
        for g in groups:
            row = data.lookup(*g)
            shown += [row.scores[t] for t in summary[g] if row and t in tasks and t in row.scores]
        if unit == "%" and shown:  # start near the data so that differences of a point are visible
            ax.set_ylim(max(min(0.0, min(shown) - 5), min(shown) - 10), min(100.0, max(shown) + 5))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
