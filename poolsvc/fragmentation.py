"""Fragmentation metrics, defined as Linux defines them.

``unusable_index(blocks, j)`` is the *unusable free space index* of
``mm/vmstat.c`` (``unusable_free_index``): the fraction of free memory that
cannot serve an allocation of order ``j``:

    (free_pages - sum_{i >= j} blocks[i] << i) / free_pages   (0 when nothing is free)

``blocks`` is the count of free blocks per order, as ``/proc/buddyinfo``
shows it (``FrameAllocator.free_blocks_per_order()``).

:class:`Ageing` is the seeded workload that fragments a frame allocator until
that index reaches a level; :func:`copy_layout` replays its layout elsewhere.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .constants import PAGE_SIZE
from .errors import PoolsvcError


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


#: The order whose unusable free space index names a fragmentation level:
#: order 4, a 64 KiB request (16 pages).
INDEX_ORDER = 4


class Ageing:
    """A seeded ageing workload that fragments a frame allocator step by step.

    Each step allocates ``batch`` blocks of mixed sizes (1 to
    ``2**max_block_order`` pages, geometric: half of them single pages), each
    naturally aligned and placed at a random free position, as a buddy
    allocator's free lists hand out pages from wherever they were freed; then
    it frees ``churn`` of that many random live blocks, and more while
    occupancy exceeds ``max_occupancy``.  The unusable free space index only
    grows as the steps go on, so :meth:`run_until` can stop at each level.

    ``frames`` is a ``FrameAllocator`` (any backend) owned by the caller; the
    workload's own blocks are numpy arrays, not Python objects per block.
    Single-threaded.
    """

    def __init__(self, frames: Any, rng: np.random.Generator, *, max_block_order: int = 3,
                 max_occupancy: float = 0.5, churn: float = 0.3) -> None:
        self.frames = frames
        self.rng = rng
        self.max_block_order = max_block_order
        self.max_occupancy = max_occupancy
        self.churn = churn
        self.batch = max(64, frames.nframes // 512)
        self.pas: list[int] = []
        self.sizes: list[int] = []
        self.steps = 0

    def index(self, order: int = INDEX_ORDER) -> float:
        """The frames' unusable free space index at ``order`` now."""
        return unusable_index(self.frames.free_blocks_per_order(), order)

    def _free_one(self) -> None:
        i = int(self.rng.integers(len(self.pas)))
        self.frames.free_contig(self.pas[i], self.sizes[i])
        self.pas[i], self.sizes[i] = self.pas[-1], self.sizes[-1]
        self.pas.pop()
        self.sizes.pop()

    def step(self) -> None:
        """Allocate one batch of blocks at random free positions, then free some."""
        frames, base, nframes = self.frames, self.frames.base_pa, self.frames.nframes
        orders = np.minimum(self.rng.geometric(0.5, size=self.batch) - 1, self.max_block_order)
        slots = self.rng.random(self.batch)
        for order, where in zip(orders.tolist(), slots.tolist()):
            npages = 1 << order
            pa = base + (int(where * (nframes >> order)) << order) * PAGE_SIZE
            try:
                frames.claim(pa, npages)
            except PoolsvcError:  # part of that block is in use: the request goes elsewhere
                continue
            self.pas.append(pa)
            self.sizes.append(npages)
        for _ in range(int(self.batch * self.churn)):
            if self.pas:
                self._free_one()
        while self.pas and frames.used_frames > nframes * self.max_occupancy:
            self._free_one()
        self.steps += 1

    def run_until(self, target: float, order: int = INDEX_ORDER, max_steps: int = 100_000) -> float:
        """Step until the index at ``order`` reaches ``target``; returns the index reached.

        Stops after ``max_steps`` steps in all even if the target is not reached (the
        caller reports the index reached, not the target).
        """
        reached = self.index(order)
        while reached < target and self.steps < max_steps:
            self.step()
            reached = self.index(order)
        return reached


def used_runs(used_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first_frame, length)`` arrays of the runs of used frames in a 0/1 frame map."""
    padded = np.concatenate([[0], np.asarray(used_map, dtype=np.int8) != 0, [0]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    return starts, ends - starts


def copy_layout(source_used_map: np.ndarray, frames: Any) -> int:
    """Claim in ``frames`` every frame used in ``source_used_map`` that is free there.

    Replays an aged layout (from :class:`Ageing` on a scratch allocator of the
    same size) onto a System's dynamic allocator, whose own frames stay its own.
    Returns the number of frames claimed.
    """
    wanted = (np.asarray(source_used_map) != 0) & (frames.used_map() == 0)
    starts, lengths = used_runs(wanted)
    base = frames.base_pa
    for start, length in zip(starts.tolist(), lengths.tolist()):
        frames.claim(base + start * PAGE_SIZE, length)
    return int(lengths.sum())
