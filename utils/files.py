"""The seed statistics shared by the reporting scripts.

The atomic writer these scripts use is :mod:`loralib.files` (``atomic_write``, ``atomic_write_text``), which loads
neither torch nor transformers. ``from utils.files import atomic_write`` still works, with a DeprecationWarning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

import loralib.files


def mean_and_sample_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def __getattr__(name: str):
    if name in ("atomic_write", "atomic_write_text"):
        message = f"utils.files.{name} moved to loralib.files.{name}; import it from there"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(loralib.files, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
