"""Weight-decomposition analysis: how magnitude and direction of the adapted weights move during training.

For each adapted module and saved checkpoint t (definitions of the DoRA paper, used by the BiDoRA paper; computed by
utils/magnitudes.py, adapter folders read through loralib's loader):

    ΔM^t = mean over output rows of |m^t − m^0|,        m^0 = ‖W0‖_row (how DoRA magnitudes are initialised)
    ΔD^t = mean over output rows of (1 − cos(V^t_row, W0_row))

with V^t = W0 + s·B·A and m^t the saved magnitude vector for DoRA / BiDoRA, and, for LoRA and full fine-tuning,
V^t = the adapted weight W^t itself and m^t = ‖W^t‖_row. The slope k is the least-squares line ΔM = k·ΔD + b over
all (module, checkpoint) points of one run. The paper reports k = −8.042 (BiDoRA) and −1.784 (DoRA), query matrices.

Run layout (docs/CONTRACTS.md): RUN_DIR/snapshots/base_weights.safetensors and RUN_DIR/snapshots/step_<N>/.

    python utils/weight_decomposition.py RUN_DIR [RUN_DIR ...] [--modules REGEX] [--steps 100,200] \
        [--figure assets/weight_decomposition.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

if __package__ in (None, ""):  # run as a script (python utils/weight_decomposition.py): make `utils` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralib.files import atomic_write_text  # noqa: E402
from utils.figures import pyplot, save_figure  # noqa: E402
from utils.magnitudes import as_float64, magnitude_direction_change, read_adapter, row_norms  # noqa: E402
from utils.paper_results import load_paper_data  # noqa: E402

# The paper analyses query matrices. `re.search` semantics: "query" alone also works on the command line.
DEFAULT_MODULES = r".*query.*|.*q_proj.*"
BASE_FILE = "base_weights.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TARGET_FILE = "target_weights.safetensors"
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass
class DecompositionResult:
    """ΔM / ΔD table and fitted slope of one run."""

    run_dir: str
    method: str
    modules: list[str]
    steps: list[int]
    rows: list[dict] = field(default_factory=list)  # {"module", "layer", "step", "dM", "dD"}
    slope: float | None = None
    intercept: float | None = None
    notes: list[str] = field(default_factory=list)


def _float64(tensors: dict) -> dict[str, np.ndarray]:
    # Loaded through torch so that bf16/fp16 files work too; all arithmetic in float64.
    return {k: as_float64(v) for k, v in tensors.items()}


def fit_slope(d_direction, d_magnitude) -> tuple[float, float]:
    """Least-squares line ΔM = k·ΔD + b (with intercept). Returns (k, b).

    Raises ValueError with fewer than two points or when all ΔD are equal (the slope is undefined).
    """
    x = np.asarray(d_direction, dtype=np.float64)
    y = np.asarray(d_magnitude, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("ΔD and ΔM must be 1-D and of the same length")
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError(f"slope undefined: need at least two points with different ΔD (got {x.size})")
    k, b = np.polyfit(x, y, 1)
    return float(k), float(b)


def layer_label(module: str) -> int | str:
    """Layer index of a module name ('roberta.encoder.layer.3.attention.self.query' -> 3); the name if none."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module)
    return int(match.group(1)) if match else module


def list_snapshots(run_dir: str | Path) -> dict[int, Path]:
    """Saved checkpoints of a run: {step: RUN_DIR/snapshots/step_<step>}."""
    snap = Path(run_dir) / "snapshots"
    if not (snap / BASE_FILE).is_file():
        raise ValueError(f"{run_dir}: no snapshots/{BASE_FILE} (was the run trained with snapshots on?)")
    steps = {}
    for child in snap.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if child.is_dir() and match:
            steps[int(match.group(1))] = child
    if not steps:
        raise ValueError(f"{run_dir}: no snapshots/step_<N>/ folders")
    return dict(sorted(steps.items()))


def load_snapshot(step_dir: str | Path, base: dict[str, np.ndarray]) -> tuple[str, dict[str, tuple]]:
    """Read one checkpoint. Returns (method, {module: (V, m_t)}) with V (out, in) and m_t (out,), float64.

    `base` maps '<module>.weight' to W0 (out, in).
    """
    step_dir = Path(step_dir)
    has_adapter, has_target = (step_dir / ADAPTER_FILE).is_file(), (step_dir / TARGET_FILE).is_file()
    if has_adapter == has_target:
        raise ValueError(f"{step_dir}: expected exactly one of {ADAPTER_FILE} or {TARGET_FILE}")
    out: dict[str, tuple] = {}
    if has_target:  # full fine-tuning: the weight itself
        for key, w in _float64(load_file(str(step_dir / TARGET_FILE))).items():
            if not key.endswith(".weight"):
                continue
            module = key[: -len(".weight")]
            _base_of(base, module, w.shape, step_dir)
            out[module] = (w, row_norms(w))
        return "ft", out

    config, tensors = read_adapter(step_dir)  # loralib's loader: either of loralib's formats, validated
    method = str(config["config"].get("method")).lower()
    # per-module scaling (rank_pattern / alpha_pattern); "scaling" is None when it is not uniform
    module_scaling = {str(k): float(v) for k, v in (config.get("module_scaling") or {}).items()}
    if method not in {"lora", "dora", "bidora"}:
        raise ValueError(f"{step_dir / ADAPTER_CONFIG}: unknown method {method!r}")
    modules = sorted(k[: -len(".lora_A")] for k in tensors if k.endswith(".lora_A"))
    for module in modules:
        a, b = tensors[f"{module}.lora_A"], tensors.get(f"{module}.lora_B")
        if b is None or b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{step_dir}: {module}: lora_B missing or not (out, r) for lora_A (r, in)")
        w0 = _base_of(base, module, (b.shape[0], a.shape[1]), step_dir)
        s = module_scaling.get(module, config.get("scaling"))
        if s is None:
            raise ValueError(f"{step_dir}: {module}: no 'scaling' in the config and not in its module_scaling")
        v = w0 + float(s) * (b @ a)
        magnitude = tensors.get(f"{module}.magnitude")
        if method == "lora":
            if magnitude is not None:
                raise ValueError(f"{step_dir}: {module}: a magnitude vector in a LoRA adapter")
            out[module] = (v, row_norms(v))
        else:
            if magnitude is None:
                raise ValueError(f"{step_dir}: {module}: {method} adapter without '{module}.magnitude'")
            # (out,) by contract; a (1, out) or (out, 1) vector is accepted, any other shape fails in the metric
            out[module] = (v, magnitude.reshape(-1) if magnitude.size == v.shape[0] else magnitude)
    if not out:
        raise ValueError(f"{step_dir}: no '<module>.lora_A' tensors")
    return method, out


def _base_of(base: dict[str, np.ndarray], module: str, shape, where) -> np.ndarray:
    w0 = base.get(f"{module}.weight")
    if w0 is None:
        raise ValueError(f"{where}: module {module!r} has no '{module}.weight' in {BASE_FILE}")
    if tuple(w0.shape) != tuple(shape):
        raise ValueError(f"{where}: {module}: base weight {tuple(w0.shape)} vs adapted {tuple(shape)}")
    return w0


def select_modules(names, pattern: str | None) -> tuple[list[str], str | None]:
    """Modules whose name matches `pattern` (re.search). Returns (selected, note).

    With the default pattern (query matrices) and no match (e.g. GPT-2's fused c_attn), all modules are used and the
    note says so; an explicit pattern that matches nothing is an error.
    """
    names = sorted(names)
    regex = re.compile(pattern if pattern is not None else DEFAULT_MODULES)
    chosen = [n for n in names if regex.search(n)]
    if chosen:
        return chosen, None
    if pattern is None or pattern == DEFAULT_MODULES:
        return names, f"no query module matched {DEFAULT_MODULES!r}: using all {len(names)} adapted modules"
    raise ValueError(f"--modules {pattern!r} matches none of the adapted modules: {names}")


def analyse_run(run_dir: str | Path, modules: str | None = None, steps=None) -> DecompositionResult:
    """ΔM / ΔD per (module, checkpoint) and the slope for one run.

    Args:
        run_dir: the run's output directory.
        modules: regex on module names (re.search); default: query matrices, all modules if none is a query.
        steps: checkpoints to use; default: every saved step except step 0 (the initialisation, where
            ΔM = ΔD = 0 by construction and which the paper's intermediate checkpoints do not include).
    """
    available = list_snapshots(run_dir)
    if steps is None:
        chosen_steps = [s for s in available if s > 0]
        if not chosen_steps:
            raise ValueError(f"{run_dir}: only a step-0 snapshot; nothing to analyse")
    else:
        chosen_steps = sorted({int(s) for s in steps})
        absent = [s for s in chosen_steps if s not in available]
        if absent:
            raise ValueError(f"{run_dir}: steps {absent} not saved; available: {sorted(available)}")
    base = _float64(load_file(str(Path(run_dir) / "snapshots" / BASE_FILE)))

    result = DecompositionResult(run_dir=str(run_dir), method="", modules=[], steps=chosen_steps)
    for step in chosen_steps:
        method, weights = load_snapshot(available[step], base)
        if result.method and method != result.method:
            raise ValueError(f"{run_dir}: step {step} is {method} but earlier checkpoints are {result.method}")
        result.method = method
        if not result.modules:
            result.modules, note = select_modules(weights, modules)
            if note:
                result.notes.append(note)
        missing = [m for m in result.modules if m not in weights]
        if missing:
            raise ValueError(f"{run_dir}: step {step} lacks modules {missing}")
        for module in result.modules:
            v, m_t = weights[module]
            d_m, d_d = magnitude_direction_change(base[f"{module}.weight"], v, m_t)
            result.rows.append({"module": module, "layer": layer_label(module), "step": step, "dM": d_m, "dD": d_d})
    try:
        result.slope, result.intercept = fit_slope([r["dD"] for r in result.rows], [r["dM"] for r in result.rows])
    except ValueError as err:
        result.notes.append(str(err))
    return result


def format_table(result: DecompositionResult) -> str:
    """Plain-text table of one run: layer, step, ΔM, ΔD, then the slope (and the paper's, where it gives one)."""
    slopes = load_paper_data().slopes
    lines = [f"run: {result.run_dir}   method: {result.method}   modules: {len(result.modules)}"]
    lines += [f"note: {n}" for n in result.notes]
    lines.append(f"{'layer':>8} {'step':>8} {'dM':>12} {'dD':>12}  module")
    for r in result.rows:
        lines.append(f"{r['layer']!s:>8} {r['step']:>8d} {r['dM']:>12.6g} {r['dD']:>12.6g}  {r['module']}")
    k = "undefined" if result.slope is None else f"{result.slope:.4g} (intercept {result.intercept:.4g})"
    paper = f"   paper: {slopes[result.method]:.4g}" if result.method in slopes else ""
    lines.append(f"slope k of dM on dD: {k}{paper}   [{len(result.rows)} points]")
    return "\n".join(lines)


def plot_decomposition(results: list[DecompositionResult], path: str | Path) -> Path:
    """Scatter ΔM against ΔD, one panel per run: colour = layer, marker = checkpoint, the fitted line."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    if not results:
        raise ValueError("nothing to plot")
    paper = load_paper_data()
    labels, paper_slopes = paper.method_names, paper.slopes
    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 4.2), squeeze=False)
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
    for ax, res in zip(axes[0], results):
        layers = sorted({r["layer"] for r in res.rows}, key=lambda x: (isinstance(x, str), str(x).zfill(6)))
        cmap = plt.get_cmap("viridis", max(len(layers), 2))
        colour = {layer: cmap(i) for i, layer in enumerate(layers)}
        marker = {step: markers[i % len(markers)] for i, step in enumerate(res.steps)}
        for r in res.rows:
            ax.scatter(r["dD"], r["dM"], color=colour[r["layer"]], marker=marker[r["step"]], s=36, edgecolors="k",
                       linewidths=0.4)
        title = f"{labels.get(res.method, res.method)} ({Path(res.run_dir).name})"
        if res.slope is not None:
            xs = np.array([min(r["dD"] for r in res.rows), max(r["dD"] for r in res.rows)])
            ax.plot(xs, res.slope * xs + res.intercept, "r--", linewidth=1.2)
            title += f"\nk = {res.slope:.3f}"
            if res.method in paper_slopes:
                title += f" (paper {paper_slopes[res.method]:.3f})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("ΔD")
        ax.set_ylabel("ΔM")
        handles = [Line2D([], [], marker="o", linestyle="", color=colour[lay], label=f"layer {lay}") for lay in layers]
        handles += [Line2D([], [], marker=marker[s], linestyle="", color="grey", label=f"step {s}") for s in res.steps]
        ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def _parse_steps(text: str | None):
    if text is None or text.strip().lower() == "all-but-0":
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise SystemExit(f"--steps: expected comma-separated integers, got {text!r}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Magnitude/direction (ΔM, ΔD) analysis of a run's saved adapter checkpoints, and the slope k "
        "of the least-squares line ΔM = k·ΔD + b (BiDoRA paper: k = -8.042 BiDoRA, -1.784 DoRA).",
    )
    parser.add_argument("run_dirs", nargs="+", help="run output directories (with snapshots/)")
    parser.add_argument("--modules", default=None,
                        help=f"regex on module names (re.search); default {DEFAULT_MODULES!r} (query matrices, as "
                        "in the paper); if no module matches the default, all adapted modules are used")
    parser.add_argument("--steps", default=None,
                        help="comma-separated checkpoint steps; default: all saved except step 0")
    parser.add_argument("--figure", default=None, help="write the scatter plot to this PNG (e.g. assets/wd.png)")
    parser.add_argument("--json", default=None, help="write the tables and slopes to this JSON file")
    args = parser.parse_args(argv)

    steps = _parse_steps(args.steps)
    try:
        results = [analyse_run(d, modules=args.modules, steps=steps) for d in args.run_dirs]
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    for res in results:
        print(format_table(res))
        print()
    if args.json:
        path = atomic_write_text(args.json, json.dumps([asdict(r) for r in results], indent=1, default=str))
        print(f"wrote {path}")
    if args.figure:
        print(f"wrote {plot_decomposition(results, args.figure)}")
    if any(r.slope is None or math.isnan(r.slope) for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
