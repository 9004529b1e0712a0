"""The shared-memory pools: the dynamic pool and the reserved static pool.

The pool is chosen from the TEE's capabilities: DYNAMIC_SHM gives the
dynamic pool (contiguous frames of dynamic RAM, registered with the secure
world through a REGISTER_SHM page list unless PRIV); otherwise the reserved
static pool, a carve-out of physical memory the secure world knows from the
start.

Frames are identities in both pools (docs/design.md section 2).  The static
pool's allocator (``core.RangeAllocator``, genalloc semantics) only decides
a buffer's carve-out addresses.  A user or kernel buffer is page-aligned and
page-rounded (as Linux's pool rounds it to its page alignment), so it owns
its frames outright: its bytes live in pages of its context's arena, mapped
at those addresses in the frame table while it lives, exactly as a dynamic
pool run's are, and a client of the pool service maps them as it maps a
dynamic buffer.  A private buffer (16-byte aligned, rounded to the pool's
granule) may share a page with others, so it lives in the carve-out's own storage object,
which backs every carve-out frame no buffer has taken, and never leaves the
process that holds the System.

Memory is zeroed when freed, so every allocation starts zeroed.

Invariants (checked by the tests: tests/sysutil.py, tests/test_static_pool.py):
  ``dynamic.free_frames + dynamic.used_frames == dynamic.nframes``
  ``static.free_bytes + static.used_bytes == static.size``
  every carve-out frame is mapped: to a live StaticRun's arena page, or else
  to its own page of the carve-out storage;
  a carve-out storage page under a live StaticRun is zero.

Concurrency: one thread (the System's).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ._backend import core
from .config import Config
from .constants import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, ShmFlags
from .memory import PhysicalMemory
from .shm import Shm, StaticBacking, StaticRun, pool_shm
from .storage import Storage

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context

_POOL_PRIV = ShmFlags.PRIV | ShmFlags.POOL


class Pools:
    """The pools of one System.

    ``Pools(config, memory, cookies)`` makes the static pool when the TEE has a
    reserved carve-out; :meth:`alloc_dynamic` needs ``register_run`` (set by
    the System once its driver exists) to register what it allocates.  A
    dynamic-pool run is given back by ``System.release`` through its
    context's arena.
    Attributes: ``dynamic_pool`` (whether allocations come from the dynamic
    pool), ``static`` (``core.RangeAllocator`` or None), ``carveout``
    (its Storage or None), ``carveout_sid`` (that Storage's storage id, or -1).
    """

    def __init__(self, config: Config, memory: PhysicalMemory, cookies: Iterator[int]) -> None:
        self.config = config
        self.memory = memory
        self.cookies = cookies
        self.dynamic_pool = config.dynamic_shm
        #: ``Driver.register_run``, set by the System once its driver exists.
        self.register_run: Callable[[int, int, int, int], None] | None = None
        self.static: Any = None
        self.carveout: Storage | None = None
        self._carveout_bytes: np.ndarray | None = None
        self._carveout_sid = -1
        if config.reserved_shm:
            self.static = core.RangeAllocator(config.static_base, config.static_size,
                                              config.min_alloc_order, config.static_policy)
            self.carveout = Storage.create(config.static_size, config.shm_prefix)
            self._carveout_bytes = np.frombuffer(self.carveout.mm, dtype=np.uint8)
            try:
                self._carveout_sid = memory.attach(self.carveout.mm, "carveout")
                memory.table.map_range(config.static_base, config.static_size // PAGE_SIZE,
                                       self._carveout_sid, 0)
            except BaseException:
                self.close()
                raise

    @property
    def carveout_sid(self) -> int:
        """The storage id of the carve-out's own storage (``PhysicalMemory.attach``), which
        backs every carve-out frame no buffer has taken; -1 without a carve-out or once
        closed.  Read-only."""
        return self._carveout_sid

    def close(self) -> None:
        """Unmap and release the carve-out. Idempotent."""
        if self.carveout is None:
            return
        if self._carveout_sid >= 0:
            self.memory.table.unmap_range(self.config.static_base, self.config.static_size // PAGE_SIZE)
            self.memory.detach(self._carveout_sid)
            self._carveout_sid = -1
        self._carveout_bytes = None
        self.carveout.close()
        self.carveout = None

    # -- the dynamic pool -----------------------------------------------------------------------
    def alloc_dynamic(self, ctx: "Context", size: int, flags: ShmFlags) -> Shm:
        """alloc_pages_exact + registration (unless PRIV): frames, zeroed storage pages
        and their mapping come from one compiled call (``core.ArenaPages.take``)."""
        npages = (size + PAGE_MASK) >> PAGE_SHIFT
        run = ctx.take_pages(npages)
        if run is None:  # no segment has room: the Arena grows (policy) and takes
            run = ctx.arena.take(npages)
        shm = pool_shm(ctx, flags, run, npages, next(self.cookies))
        if flags is not _POOL_PRIV:
            try:
                self.register_run(run.pa, npages, shm.size, shm.cookie)  # type: ignore[misc]
            except BaseException:
                ctx.arena.give(run)
                raise
            shm.registered = True
        return shm

    # -- the static pool --------------------------------------------------------------------------
    def alloc_static(self, ctx: "Context", size: int, align: int, flags: ShmFlags) -> Shm:
        """A range of the carve-out, ``align``-aligned; the Shm is never registered.

        A user or kernel buffer (``align`` a page) gets its context's arena
        pages mapped at its carve-out frames (:class:`StaticRun`); a private
        buffer stays in the carve-out's storage (:class:`StaticBacking`).
        Errors: those of the range allocator (OutOfMemory, BadParameters) and
        of the arena (OutOfMemory when the OS refuses storage); nothing is
        taken when it raises.
        """
        assert self.static is not None and self.carveout is not None
        pa = self.static.alloc(size, align)
        length = self.static.allocation_at(pa)[1]
        if flags is _POOL_PRIV:
            offset = pa & PAGE_MASK
            npages = (offset + length + PAGE_MASK) // PAGE_SIZE
            backing = StaticBacking(pa, length, pa - self.config.static_base, self.carveout)
            return Shm(ctx, flags, length, offset, None, next(self.cookies), backing, (pa - offset, npages))
        npages = length >> PAGE_SHIFT  # page-aligned and page-rounded: align is a page
        try:
            segment, index = ctx.arena.alloc(npages)
        except BaseException:
            self.static.free(pa)
            raise
        try:
            self._lend(pa, npages, segment.sid, index)
        except BaseException:
            ctx.arena.free(segment, index, npages)
            self.static.free(pa)
            raise
        run = StaticRun(pa, npages, segment, index)
        return Shm(ctx, flags, length, 0, None, next(self.cookies), run, (pa, npages))

    def _lend(self, pa: int, npages: int, sid: int, index: int) -> None:
        """Map carve-out frames ``pa ..`` to storage ``sid`` from page ``index`` (all or nothing)."""
        table = self.memory.table
        table.unmap_range(pa, npages)
        try:
            table.map_range(pa, npages, sid, index)
        except BaseException:
            self.take_back(pa, npages, mapped=False)
            raise

    def take_back(self, pa: int, npages: int, mapped: bool = True) -> None:
        """Map carve-out frames ``pa ..`` to the carve-out's own pages again.

        ``mapped``: whether the frames are mapped now (to a buffer's arena pages),
        so are unmapped first.  Errors: those of ``FrameTable.unmap_range`` /
        ``map_range`` (AddressError).
        """
        table = self.memory.table
        if mapped:
            table.unmap_range(pa, npages)
        table.map_range(pa, npages, self._carveout_sid, (pa - self.config.static_base) >> PAGE_SHIFT)

    def free_static(self, ctx: "Context", backing: StaticRun | StaticBacking) -> None:
        """Zero a static-pool buffer's bytes and give its range back.

        A :class:`StaticRun`'s frames return to the carve-out's (zero) pages
        and its arena pages are zeroed and freed (the arena may then return
        an emptied segment to the OS).
        """
        if isinstance(backing, StaticRun):
            self.take_back(backing.pa, backing.npages)
            ctx.arena.free(backing.segment, backing.index, backing.npages)
        else:
            assert self._carveout_bytes is not None
            self._carveout_bytes[backing.start:backing.start + backing.length] = 0
        self.static.free(backing.pa)


__all__ = ["Pools"]
