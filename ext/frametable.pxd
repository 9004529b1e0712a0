# frametable.pxd: typed fields of FrameTable (logic in frametable.pyx) and the
# inline helpers through which the other kernels change it: arena.pyx and
# smc_driver.pyx map and unmap runs of frames, copy.pyx counts its copies
# without the GIL.  Only frametable.pyx and this file write FrameTable's
# fields, so its invariants (below) are kept here.
#
# Concurrency: plain data, no locks; see frametable.pyx.
from libc.stdint cimport uint64_t, int64_t, int32_t

# Limits shared with the pure twin (poolsvc/_pure/tables.py); frame and page
# index limits: PSV_FT_MAX_FRAMES, PSV_FT_MAX_PAGE_INDEX (psv_limits.h).
cdef enum:
    FT_MAX_REGIONS = 16            # region records searched linearly
    FT_MAX_STORAGE_ID = 65535      # 0 <= storage_id <= FT_MAX_STORAGE_ID
    FT_UNMAPPED = -1               # frame_sid[slot] of a frame with no storage


cdef struct ft_region:
    uint64_t base_pfn     # first frame number of the region
    uint64_t count        # frames in the region (> 0)
    Py_ssize_t first      # slot of base_pfn in the flat arrays


cdef struct ft_storage:
    char *base            # start of the attached buffer (NULL: not attached)
    Py_ssize_t length     # its length in bytes (0 when not attached)


cdef inline Py_ssize_t ft_region_slot(const ft_region *regions, int nregions,
                                      uint64_t pfn) noexcept nogil:
    """Flat-array slot of frame ``pfn``, or -1 when no region holds it."""
    cdef int r
    for r in range(nregions):
        # unsigned wrap makes pfn < base_pfn fail the comparison too
        if pfn - regions[r].base_pfn < regions[r].count:
            return regions[r].first + <Py_ssize_t>(pfn - regions[r].base_pfn)
    return -1


cdef inline int ft_region_index(const ft_region *regions, int nregions,
                                uint64_t pfn) noexcept nogil:
    """Index of the region holding frame ``pfn``, or -1."""
    cdef int r
    for r in range(nregions):
        if pfn - regions[r].base_pfn < regions[r].count:
            return r
    return -1


cdef class FrameTable:
    # Regions, sorted by base_pfn; slots of region r are
    # [regions[r].first, regions[r].first + regions[r].count), and
    # regions[r+1].first == regions[r].first + regions[r].count.
    cdef ft_region rgn[FT_MAX_REGIONS]
    cdef int nregions
    # One slot per frame of every region (nslots == sum of counts):
    #   frame_sid[s] == FT_UNMAPPED              <=> frame s has no storage
    #   frame_sid[s] >= 0  =>  frame s -> (frame_sid[s], frame_index[s])
    #   frame_index[s] == 0  when frame s has no storage
    # mapped == |{s : frame_sid[s] >= 0}| between calls (validation passes
    # mark slots with values < -1 and restore them before returning).
    cdef int32_t *frame_sid
    cdef int64_t *frame_index
    cdef Py_ssize_t nslots
    cdef Py_ssize_t mapped
    # Attached storage: storages[sid] for 0 <= sid < nstorage_slots;
    # storages[sid].base != NULL  <=>  sid in views (a memoryview that keeps
    # the exporter's buffer alive and its address fixed).
    cdef ft_storage *storages
    cdef Py_ssize_t nstorage_slots
    cdef dict views
    # copies in progress with the GIL released; attach/detach refuse while > 0
    cdef int busy

    cdef Py_ssize_t slot_of(self, uint64_t pa) noexcept nogil
    cdef int check_ids(self, int64_t storage_id, int64_t first_index, int64_t npages) except -1
    cdef Py_ssize_t range_slot(self, object pa_obj, object npages_obj, uint64_t *pa_out) except -2
    cdef Py_ssize_t page_slot(self, uint64_t pa, Py_ssize_t i) except -2
    cdef char *frame_bytes(self, uint64_t pa, Py_ssize_t end_in_page) except NULL
    cdef int resolve_range(self, uint64_t pa, Py_ssize_t n, char **ptrs) except -1
    cdef Py_ssize_t mapped_slot(self, object pa, unsigned long long* a) except -1
    cdef int raise_unmapped(self, uint64_t pa, Py_ssize_t slot) except -1


# -- helpers for the other kernels: they keep the invariants above --------------

cdef inline Py_ssize_t ft_run_slot(FrameTable t, uint64_t pa, int64_t n, bint mapped) noexcept:
    """The slot of frame ``pa`` when ``pa`` is page-aligned and the ``n`` frames
    from it lie in one region and are all mapped (``mapped``) or all unmapped;
    else -1 (the caller then lets map_range / unmap_range raise the precise error)."""
    cdef uint64_t pfn = pa >> PSV_PAGE_SHIFT
    cdef int rg
    cdef Py_ssize_t slot
    cdef int64_t k
    if pa & PSV_PAGE_MASK:
        return -1
    rg = ft_region_index(t.rgn, t.nregions, pfn)
    if rg < 0 or <uint64_t>n > t.rgn[rg].count - (pfn - t.rgn[rg].base_pfn):
        return -1
    slot = t.rgn[rg].first + <Py_ssize_t>(pfn - t.rgn[rg].base_pfn)
    for k in range(n):
        if (t.frame_sid[slot + k] < 0 if mapped else t.frame_sid[slot + k] != FT_UNMAPPED):
            return -1
    return slot


cdef inline void ft_map_run(FrameTable t, Py_ssize_t slot, int64_t n, int32_t sid,
                            int64_t index) noexcept:
    """Map the ``n`` unmapped frames from ``slot`` (``ft_run_slot(..., False)``) to
    storage pages ``(sid, index + k)``; ``sid`` and ``index`` checked by the caller."""
    cdef int64_t k
    for k in range(n):
        t.frame_sid[slot + k] = sid
        t.frame_index[slot + k] = index + k
    t.mapped += n


cdef inline void ft_unmap_run(FrameTable t, Py_ssize_t slot, int64_t n) noexcept:
    """Unmap the ``n`` mapped frames from ``slot`` (``ft_run_slot(..., True)``)."""
    cdef int64_t k
    for k in range(n):
        t.frame_sid[slot + k] = FT_UNMAPPED
        t.frame_index[slot + k] = 0
    t.mapped -= n


cdef inline bint ft_remap_run(FrameTable t, uint64_t pa, int64_t n, int64_t sid,
                              int64_t index) noexcept:
    """``unmap_range(pa, n)`` then ``map_range(pa, n, sid, index)`` in one step: the
    ``n`` mapped frames from ``pa`` now map storage pages ``(sid, index + k)``.  False,
    nothing changed, when a check of either call would fail (the caller then makes
    the two calls, for their errors); the static pool's lend and take-back of frames."""
    cdef Py_ssize_t slot
    if n <= 0 or sid < 0 or sid > FT_MAX_STORAGE_ID or index < 0 or \
            n > PSV_FT_MAX_PAGE_INDEX - index:
        return False
    slot = ft_run_slot(t, pa, n, True)
    if slot < 0:
        return False
    ft_unmap_run(t, slot, n)
    ft_map_run(t, slot, n, <int32_t>sid, index)
    return True


cdef inline Py_ssize_t ft_storage_length(FrameTable t, int64_t sid) noexcept:
    """Bytes of attached storage ``sid`` (0 <= sid), or -1 when it is not attached."""
    if sid >= t.nstorage_slots or t.storages[sid].base == NULL:
        return -1
    return t.storages[sid].length


cdef inline char *ft_storage_page(FrameTable t, int32_t sid, int64_t index) noexcept:
    """Address of page ``index`` of attached storage ``sid`` (checked by
    ``ft_storage_length``)."""
    return t.storages[sid].base + index * PSV_PAGE_SIZE


cdef inline void ft_copy_begin(FrameTable t) noexcept:
    """A copy through resolved pointers starts without the GIL: attach/detach refuse."""
    t.busy += 1


cdef inline void ft_copy_end(FrameTable t) noexcept:
    t.busy -= 1
