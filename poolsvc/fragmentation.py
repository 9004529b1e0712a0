"""Fragmentation metrics, defined as Linux defines them.

``unusable_index(blocks, j)`` is the *unusable free space index* of
``mm/vmstat.c`` (``unusable_free_index``): the fraction of free memory that
cannot serve an allocation of order ``j``:

    (free_pages - sum_{i >= j} blocks[i] << i) / free_pages   (0 when nothing is free)

``blocks`` is the count of free blocks per order, as ``/proc/buddyinfo``
shows it (``FrameAllocator.free_blocks_per_order()``).
"""
from __future__ import annotations

from typing import Sequence


def free_pages(blocks: Sequence[int]) -> int:
    """Total free pages held in ``blocks`` (``sum(blocks[k] << k)``)."""
    return sum(int(count) << order for order, count in enumerate(blocks))


def unusable_index(blocks: Sequence[int], order: int) -> float:
    """Fraction of free memory unusable for an order-``order`` request (0..1)."""
    total = free_pages(blocks)
    if total == 0:
        return 0.0
    usable = sum(int(blocks[i]) << i for i in range(order, len(blocks)))
    return (total - usable) / total


def unusable_indices(blocks: Sequence[int]) -> list[float]:
    """``unusable_index`` for every order of ``blocks``."""
    return [unusable_index(blocks, j) for j in range(len(blocks))]
