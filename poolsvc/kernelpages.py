"""Kernel pages larger than the 4 KiB frame: the study's model of 16 and 64 KiB kernels.

A kernel built with 16 KiB or 64 KiB pages (arm64 ``CONFIG_ARM64_16K_PAGES`` /
``CONFIG_ARM64_64K_PAGES``) hands out memory in kernel pages, each a naturally
aligned run of ``page_size // 4096`` physical 4 KiB frames (an order-n block of
the frame allocator, ``n = log2(page_size // 4096)``).  The OP-TEE page list
still holds 4 KiB entries (``OPTEE_MSG_NONCONTIG_PAGE_SIZE``), so Linux's
``optee_fill_pages_list`` walks each kernel page in 4 KiB steps and writes one
entry per step: :func:`list_entries`.

:class:`KernelPageAllocator` takes kernel pages from a ``FrameAllocator`` (any
backend) as aligned runs of frames, the way the buddy allocator serves them:

- :meth:`~KernelPageAllocator.alloc_pages`: ``count`` single kernel pages, the
  lowest free aligned blocks wherever they are (the pages of a user buffer);
- :meth:`~KernelPageAllocator.alloc_exact`: one run of ``count`` kernel pages
  starting on a kernel page (``alloc_pages_exact``), at most ``2**max_order``
  kernel pages, where ``max_order`` is arm64's ``ARCH_FORCE_MAX_ORDER`` for that
  page size (:data:`MAX_ORDER`).

The allocator reads the frames' used map once per call (numpy, no Python
object per frame) and claims the blocks it chose; on error nothing is taken.

Concurrency: the frame allocator's (one thread at a time).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .constants import PAGE_SIZE
from .errors import AlignmentError, BadParameters, OutOfMemory

KiB = 1 << 10

#: The kernel page sizes the study models, in bytes.
PAGE_SIZES = (4 * KiB, 16 * KiB, 64 * KiB)

#: arm64's ``ARCH_FORCE_MAX_ORDER`` per kernel page size (arch/arm64/Kconfig): the
#: largest block the buddy allocator serves is ``2**MAX_ORDER`` kernel pages
#: (4 MiB, 32 MiB, 512 MiB).
MAX_ORDER = {4 * KiB: 10, 16 * KiB: 11, 64 * KiB: 13}


def check_page_size(page_size: Any) -> int:
    """``page_size`` if it is a kernel page size the study models (4, 16 or 64 KiB).

    Raises BadParameters naming the value and the sizes allowed.
    """
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size not in PAGE_SIZES:
        allowed = ", ".join(f"{p // KiB} KiB ({p})" for p in PAGE_SIZES)
        raise BadParameters(f"kernel page size must be one of {allowed}, got {page_size!r}")
    return page_size


def frames_per_page(page_size: int) -> int:
    """4 KiB frames in one kernel page (1, 4 or 16)."""
    return check_page_size(page_size) // PAGE_SIZE


def rounded(size: int, page_size: int) -> int:
    """``size`` rounded up to whole kernel pages (what a page-granular allocation takes)."""
    return -(-size // page_size) * page_size


def waste(size: int, page_size: int) -> int:
    """Internal waste of rounding ``size`` to whole kernel pages, in bytes."""
    return rounded(size, page_size) - size


def list_entries(kernel_pages: Any, page_size: int) -> np.ndarray:
    """The 4 KiB page-list entries of a buffer made of ``kernel_pages`` (PAs, in order).

    Each kernel page becomes ``page_size // 4096`` consecutive entries, as
    ``optee_fill_pages_list`` writes them.  Returns a ``uint64`` array.
    Raises AlignmentError for a PA not aligned to the kernel page, BadParameters
    for an unsupported ``page_size``.
    """
    per = frames_per_page(page_size)
    pas = np.asarray(kernel_pages, dtype=np.uint64).reshape(-1)
    if np.any(pas % np.uint64(page_size)):
        bad = int(pas[np.flatnonzero(pas % np.uint64(page_size))[0]])
        raise AlignmentError(f"kernel page {bad:#x} is not aligned to {page_size // KiB} KiB")
    steps = np.arange(per, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    return (pas[:, None] + steps[None, :]).reshape(-1)


class KernelPageAllocator:
    """Kernel pages of ``page_size`` taken from the 4 KiB frames of ``frames``.

    ``frames`` is a ``FrameAllocator`` (compiled or pure) whose ``base_pa`` is
    aligned to ``page_size``; it stays the caller's.  Blocks are aligned to the
    kernel page in physical addresses.
    """

    def __init__(self, frames: Any, page_size: int) -> None:
        self.frames = frames
        self.page_size = check_page_size(page_size)
        self.per = page_size // PAGE_SIZE
        self.max_order = MAX_ORDER[page_size]
        if frames.base_pa % page_size:
            raise BadParameters(f"frames start at {frames.base_pa:#x}, not on a "
                                f"{page_size // KiB} KiB kernel page")

    def _busy_blocks(self) -> np.ndarray:
        """Per kernel page of the frames (whole ones only): True where a frame of it is used."""
        used = self.frames.used_map()
        whole = len(used) // self.per * self.per
        # (4 frames per uint32 word: per is a multiple of 4 above 4 KiB)
        words = used[:whole].view(np.uint32).reshape(-1, self.per // 4)
        busy = words[:, 0] != 0
        for j in range(1, self.per // 4):
            busy |= words[:, j] != 0
        return busy

    def free_blocks(self) -> np.ndarray:
        """Frame index of each free kernel page (a free, aligned block of ``per`` frames)."""
        return np.flatnonzero(~self._busy_blocks()) * self.per

    def alloc_pages(self, count: int) -> np.ndarray:
        """``count`` kernel pages, the lowest free ones; their PAs (``uint64``), ascending.

        Raises BadParameters (``count < 1``), OutOfMemory when fewer are free
        (nothing taken).
        """
        if count < 1:
            raise BadParameters(f"count must be >= 1, got {count}")
        free = self.free_blocks()
        if len(free) < count:
            raise OutOfMemory(f"{count} kernel pages of {self.page_size // KiB} KiB requested, "
                              f"{len(free)} free aligned blocks of {self.per} frames")
        pas = self.frames.base_pa + free[:count].astype(np.uint64) * np.uint64(PAGE_SIZE)
        for pa in pas.tolist():
            self.frames.claim(pa, self.per)
        return pas

    def alloc_exact(self, count: int) -> int:
        """One run of ``count`` kernel pages starting on a kernel page; its PA.

        Raises BadParameters (``count < 1``), OutOfMemory above ``2**max_order``
        kernel pages or when no such run is free (nothing taken).
        """
        if count < 1:
            raise BadParameters(f"count must be >= 1, got {count}")
        if count > 1 << self.max_order:
            raise OutOfMemory(f"{count} kernel pages exceeds the largest block, order "
                              f"{self.max_order} ({1 << self.max_order} pages of "
                              f"{self.page_size // KiB} KiB)")
        nframes = count * self.per
        busy = self._busy_blocks()
        if count > len(busy):
            raise OutOfMemory(f"{count} kernel pages requested, {len(busy)} in all")
        if count == 1:
            fits = np.flatnonzero(~busy)
        else:  # count consecutive free kernel pages: no busy block in [i, i + count)
            seen = np.concatenate([[0], np.cumsum(busy, dtype=np.int64)])
            fits = np.flatnonzero(seen[count:] == seen[:len(seen) - count])
        if not len(fits):
            raise OutOfMemory(f"no free run of {count} kernel pages of {self.page_size // KiB} KiB "
                              f"({nframes} frames) starting on a kernel page")
        pa = self.frames.base_pa + int(fits[0]) * self.page_size
        self.frames.claim(pa, nframes)
        return pa

    def free_pages(self, pas: Any) -> None:
        """Give back kernel pages taken by :meth:`alloc_pages` (PAs, any order)."""
        self.frames.free_pages(list_entries(pas, self.page_size))

    def free_exact(self, pa: int, count: int) -> None:
        """Give back a run taken by :meth:`alloc_exact`."""
        self.frames.free_contig(pa, count * self.per)


__all__ = ["MAX_ORDER", "PAGE_SIZES", "KernelPageAllocator", "check_page_size", "frames_per_page",
           "list_entries", "rounded", "waste"]
