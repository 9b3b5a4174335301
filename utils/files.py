"""Former home of the reports' atomic writer, now :mod:`loralib.files` (``atomic_write``, ``atomic_write_text``,
which loads neither torch nor transformers). ``from utils.files import atomic_write`` still works, with a
DeprecationWarning."""

from __future__ import annotations

import warnings

import loralib.files


def __getattr__(name: str):
    if name in ("atomic_write", "atomic_write_text"):
        message = f"utils.files.{name} moved to loralib.files.{name}; import it from there"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(loralib.files, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
