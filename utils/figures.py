"""Matplotlib for the reports: the non-interactive backend, and figures saved atomically at 150 dpi."""

from __future__ import annotations

from pathlib import Path

from loralib.files import atomic_write


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, png without one; 150 dpi, tight box) through a temporary
    file, so no half-written figure is ever left; the figure is closed either way. Returns ``path``."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight"))
    finally:
        pyplot().close(fig)
