"""Helpers the benchmark modules share (imported as ``benchutil``; bench/ is on the path)."""
from __future__ import annotations

from typing import Any


def record_us_per_op(benchmark: Any, ops: int, digits: int = 3) -> None:
    """Store the median round's microseconds per operation in ``extra_info["us_per_op"]``.

    Does nothing in smoke mode (``--benchmark-disable``: no statistics).
    """
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["us_per_op"] = round(stats.stats.median / ops * 1e6, digits)
