"""How far the adapted weights moved from the pretrained ones: each measure defined once, and read from adapter
folders through loralib's loader (``loralib.read_adapter_config``, ``loralib.io.read_adapter_tensors``).

Both magnitude measures compare the magnitude vector m (DoRA, BiDoRA) with where it starts, ‖W0‖_row:

* ΔM = mean over rows |m − ‖W0‖_row| of one module, with ΔD = mean over rows (1 − cos(V_row, W0_row)) (the DoRA
  paper's weight-decomposition analysis, utils/weight_decomposition.py);
* the relative shift ``sqrt(Σ_modules ‖m − ‖W0‖_row‖²) / sqrt(Σ_modules ‖‖W0‖_row‖²)`` pooled over a model's
  modules (0: the magnitudes never moved; examples/study/magnitude_shift.py and the estimator comparison).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np


def as_float64(x) -> np.ndarray:
    """A numpy float64 copy of an array or a torch tensor (bf16 / fp16 included)."""
    if hasattr(x, "detach"):
        import torch

        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def row_norms(w) -> np.ndarray:
    """Euclidean norm of each row of a 2-D weight (out, in), float64."""
    return np.linalg.norm(as_float64(w), axis=1)


def _deviation(w0: np.ndarray, magnitude) -> np.ndarray:
    """m − ‖W0‖_row, checked: one magnitude per output row."""
    magnitude = as_float64(magnitude)
    if magnitude.shape != (w0.shape[0],):
        raise ValueError(f"magnitude has shape {magnitude.shape}, expected ({w0.shape[0]},) (one per output row)")
    return magnitude - row_norms(w0)


def magnitude_direction_change(w0, direction, magnitude) -> tuple[float, float]:
    """ΔM and ΔD of one module.

    Args:
        w0: pretrained weight, (out, in).
        direction: un-normalised direction V (out, in): W0 + s·B·A for DoRA/BiDoRA, the adapted weight otherwise.
        magnitude: m^t, (out,).
    Returns:
        (ΔM, ΔD) = (mean |m^t − ‖W0‖_row|, mean (1 − cos(V_row, W0_row))).
    """
    w0, direction = as_float64(w0), as_float64(direction)
    if w0.ndim != 2 or direction.shape != w0.shape:
        raise ValueError(f"weight shapes differ or are not 2-D: W0 {w0.shape}, V {direction.shape}")
    d_m = float(np.mean(np.abs(_deviation(w0, magnitude))))
    n0, nv = row_norms(w0), row_norms(direction)
    if np.any(n0 == 0) or np.any(nv == 0):
        raise ValueError("a weight row has zero norm: its direction (cosine) is undefined")
    cos = np.clip(np.einsum("ij,ij->i", w0, direction) / (n0 * nv), -1.0, 1.0)
    return d_m, float(np.mean(1.0 - cos))


def relative_magnitude_shift(modules: Iterable[tuple]) -> float:
    """``sqrt(Σ ‖m − ‖W0‖_row‖²) / sqrt(Σ ‖‖W0‖_row‖²)`` over ``(W0 (out, in), m (out,))`` pairs, float64.

    Raises:
        ValueError: no module (nothing has a magnitude: LoRA, or no adapters).
    """
    moved = start = 0.0
    for w0, magnitude in modules:
        w0 = as_float64(w0)
        moved += float(np.square(_deviation(w0, magnitude)).sum())
        start += float(np.square(row_norms(w0)).sum())
    if start == 0.0:
        raise ValueError("the model has no DoRA / BiDoRA layer: nothing has a magnitude")
    return math.sqrt(moved / start)


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A loralib adapter folder (either format) through loralib's loader: its validated config
    (``loralib.read_adapter_config``) and its tensors under loralib's names (``<module>.lora_A``, ``.lora_B``,
    ``.magnitude``), float64. Raises ValueError naming the folder for a missing or unreadable one."""
    import loralib
    from loralib.io import read_adapter_tensors

    try:
        meta = loralib.read_adapter_config(directory)
        return meta, {k: as_float64(v) for k, v in read_adapter_tensors(directory).items()}
    except FileNotFoundError as err:
        raise ValueError(f"{directory}: {err}") from err


@lru_cache(maxsize=4)
def _pretrained_modules(name_or_path: str) -> dict:
    """{module name: module} of the pretrained encoder (transformers' AutoModel, no task head)."""
    from transformers import AutoModel

    return dict(AutoModel.from_pretrained(name_or_path).named_modules())


def pretrained_weights(name_or_path: str, modules: Iterable[str]) -> dict[str, np.ndarray]:
    """W0 (out, in) of each adapted module, from the pretrained model: an adapted module ``a.b.c`` of a task model
    (``bert.encoder.layer.0.attention.self.query``) is the encoder module whose name ends it (``encoder.layer.0...``);
    Conv1D and embedding weights are transposed to (out, in), as loralib does."""
    found = _pretrained_modules(str(name_or_path))
    out = {}
    for module in modules:
        names = [n for n in found if n and (module == n or module.endswith("." + n))]
        if not names:
            raise ValueError(f"{name_or_path}: no module named like the adapted {module!r}")
        layer = found[max(names, key=len)]
        weight = as_float64(layer.weight)
        out[module] = weight.T if type(layer).__name__ in ("Conv1D", "Embedding") else weight
    return out


def cell_magnitude_shift(run_dir: str | Path) -> tuple[str, float]:
    """(method, relative shift) of a finished run_glue.py run: its ``adapter/`` against the pretrained model named in
    its ``run_config.json``. Raises ValueError (naming what is missing) for a LoRA adapter or a missing file."""
    run_dir = Path(run_dir)
    meta, tensors = read_adapter(run_dir / "adapter")
    method = str(meta["config"]["method"])
    try:
        base = json.loads((run_dir / "run_config.json").read_text(encoding="utf-8"))["model_name_or_path"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{run_dir}/run_config.json: no model_name_or_path ({err!r})") from err
    magnitudes = {k.removesuffix(".magnitude"): v for k, v in tensors.items() if k.endswith(".magnitude")}
    w0 = pretrained_weights(base, [m for m in meta["adapted_modules"] if m in magnitudes])
    return method, relative_magnitude_shift((w0[m], magnitudes[m].reshape(-1)) for m in w0)
