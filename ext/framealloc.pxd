# framealloc.pxd: typed fields of FrameAllocator (logic in framealloc.pyx) and
# the inline helpers through which the other kernels take and give frames
# (arena.pyx, smc_driver.pyx).  Only framealloc.pyx and this file touch
# FrameAllocator's fields, so its invariants (below) are kept here.
#
# Concurrency: an allocator belongs to one thread at a time; no locks.
from libc.stdint cimport uint64_t, int64_t


cdef class FrameAllocator:
    # Frames [base_pa, base_pa + nframes * 4096); fm has one unit per frame.
    # Invariants:
    #   frame i is at base_pa + (i << 12), pfn base_pfn + i
    #   fm.nfree + used_frames == nframes
    #   a contiguous run handed out has at most 1 << max_order frames
    cdef FreeMap fm
    cdef int64_t base_pa_
    cdef int64_t nframes_
    cdef int64_t base_pfn
    cdef int max_order_

    cdef int _frame_index(self, object pa, int64_t* index) except -1
    cdef int _run_index(self, object pa, object npages, int64_t* index,
                        int64_t* n) except -1


# -- helpers for the other kernels: they keep the invariants above --------------
# A run is found (fa_find_run), checked against whatever else the caller
# needs, then taken (fa_take_run); given back after fa_used_run found it.
# When a helper answers -1 the caller calls the public method
# (alloc_contig / free_contig), which raises the precise error.

cdef inline int64_t fa_find_run(FrameAllocator fa, int64_t n) noexcept nogil:
    """Frame index of the lowest run of ``n`` free frames, or -1 (none, or ``n``
    not in 1..1 << max_order)."""
    if n <= 0 or n > (<int64_t>1 << fa.max_order_):
        return -1
    return fa.fm.find(n, 0)


cdef inline uint64_t fa_pa(FrameAllocator fa, int64_t index) noexcept nogil:
    """PA of frame ``index``."""
    return <uint64_t>(fa.base_pa_ + (index << PSV_PAGE_SHIFT))


cdef inline int fa_take_run(FrameAllocator fa, int64_t index, int64_t n) except -1 nogil:
    """Mark the free frames ``[index, index + n)`` (from ``fa_find_run``) used."""
    return fa.fm.set_range(index, n)


cdef inline int64_t fa_used_run(FrameAllocator fa, uint64_t pa, int64_t n) noexcept nogil:
    """Frame index of ``pa`` when it is a frame address and the ``n`` frames from
    it are all in use; else -1."""
    cdef uint64_t i
    if pa & PSV_PAGE_MASK or pa < <uint64_t>fa.base_pa_ or n <= 0:
        return -1
    i = (pa - <uint64_t>fa.base_pa_) >> PSV_PAGE_SHIFT
    if i >= <uint64_t>fa.nframes_ or <uint64_t>n > <uint64_t>fa.nframes_ - i:
        return -1
    if fa.fm.first_free(<int64_t>i, n) >= 0:
        return -1
    return <int64_t>i


cdef inline int fa_give_run(FrameAllocator fa, int64_t index, int64_t n) except -1 nogil:
    """Mark the used frames ``[index, index + n)`` (from ``fa_used_run``) free."""
    return fa.fm.clear_range(index, n)
