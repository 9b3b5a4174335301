"""Numbers as the reports print them. The GLUE / demo / protein reports mark an empty cell with an em dash (—), the
study's reports with an en dash (–); both are kept as they were."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from utils.results import POINT_METRICS, RAW_METRICS
from utils.stats import PairedTest

DASH, EN_DASH = "—", "–"


def number(x: float | None, decimals: int, signed: bool = False, missing: str = DASH) -> str:
    """``x`` with ``decimals`` decimals (a leading + when ``signed``); ``missing`` for None."""
    return missing if x is None else f"{x:{'+' if signed else ''}.{decimals}f}"


def metric_unit(metric: str) -> str:
    """How a metric is shown: ``"%"`` (a fraction), ``"0-100"`` (BLEU, ROUGE-L) or ``"raw"``."""
    return "0-100" if metric in POINT_METRICS else "raw" if metric in RAW_METRICS else "%"


def display_scale(metric: str) -> float:
    """100 for fractions shown in percent, 1 for raw metrics (MSE-like, loss, perplexity) and 0-100 ones (BLEU)."""
    return 100.0 if metric_unit(metric) == "%" else 1.0


def metric_number(metric: str, value: float | None, signed: bool = False, scaled: bool = False) -> str:
    """A value of ``metric`` in display units (percent and 0-100 metrics with 2 decimals, raw ones with 4);
    ``scaled``: already in display units. None is a dash, NaN / inf are written out."""
    if value is None or not math.isfinite(value):
        return DASH if value is None else str(value)
    scale = display_scale(metric)
    return number(value if scaled else value * scale, 4 if metric_unit(metric) == "raw" else 2, signed)


def mean_std(mean: float, std: float | None, n: int, show: Callable[[float], str] = lambda v: f"{v:.2f}",
             count: str = "") -> str:
    """``mean ± std (n)``, or ``mean (n)`` without a std; ``count`` goes before n (e.g. ``"n="``)."""
    text = show(mean) if std is None else f"{show(mean)} ± {show(std)}"
    return f"{text} ({count}{n})"


def diff_ci(test: PairedTest, decimals: int = 2, missing: str = EN_DASH) -> str:
    """The mean paired difference and its bootstrap interval: ``+1.23 [-0.40, +2.10]`` (no interval below 2 pairs)."""
    if test.mean_diff is None:
        return missing
    ci = "" if test.ci_low is None else f" [{test.ci_low:+.{decimals}f}, {test.ci_high:+.{decimals}f}]"
    return f"{test.mean_diff:+.{decimals}f}{ci}"


def p_text(p: float | None, missing: str = EN_DASH) -> str:
    """A p value with 3 significant digits."""
    return missing if p is None else f"{p:.3g}"


def size_bytes(n: float | None) -> str:
    """Bytes in GiB (two decimals) from 1 GiB up, else in MiB."""
    if n is None:
        return DASH
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table_row(cells: Iterable[object]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(map(str, cells)) + " |"
