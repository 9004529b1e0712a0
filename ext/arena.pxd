# arena.pxd: typed fields of ArenaPages and ArenaRun (logic in arena.pyx).
# Included textually from _core.pxd after frametable.pxd (it names FreeMap,
# FrameTable and FrameAllocator).
#
# Concurrency: an ArenaPages belongs to one thread at a time (the System's);
# no locks.
cimport cython
from libc.stdint cimport int64_t, int32_t


@cython.final
cdef class _ArenaSegment:
    # One storage object of an arena.  Invariants, while owner is not None:
    #   fm.nbits == npages; unit i of fm is storage page i (1 = handed out)
    #   taken[i] == 1 iff page i belongs to a live run of take (then fm's unit i is 1):
    #   free refuses such pages, only give frees them
    #   the storage's bytes are attached to owner.table under sid, at least
    #   npages * 4096 of them, and every free page is zero
    cdef object segment           # the caller's object, returned by alloc/take
    cdef FreeMap fm
    cdef bytearray taken          # npages bytes
    cdef int64_t npages
    cdef int32_t sid
    cdef object owner             # the ArenaPages holding it; None once removed


@cython.final
cdef class ArenaRun:
    # A run taken by ArenaPages.take: frames [pa, pa + npages * 4096) of the
    # FrameAllocator, storage pages [index, index + npages) of seg, each frame
    # mapped to its page in the FrameTable.  live is cleared by give.
    cdef readonly int64_t pa
    cdef readonly int64_t npages
    cdef readonly object segment
    cdef readonly int64_t index
    cdef _ArenaSegment seg
    cdef bint live


@cython.final
cdef class ArenaPages:
    # Segments in search order (first-fit walks them in this order).
    # Invariants:
    #   pages_total == sum(s.npages for s in segs)
    #   free_pages  == sum(s.fm.nfree for s in segs)
    #   nempty      == |{s in segs : s.fm.nfree == s.npages}|
    cdef FrameTable table
    cdef FrameAllocator frames
    cdef list segs                # of _ArenaSegment
    cdef int64_t pages_total_
    cdef int64_t free_pages_
    cdef Py_ssize_t nempty

    cdef _ArenaSegment _find_segment(self, object segment)
    cdef _ArenaSegment _first_fit(self, int64_t n, int64_t *index)
    cdef char *_storage_run(self, _ArenaSegment s, int64_t index, int64_t n) except NULL
    cdef Py_ssize_t _took(self, _ArenaSegment s, int64_t index, int64_t n) except -1
    cdef Py_ssize_t _freed(self, _ArenaSegment s, int64_t index, int64_t n) except -1
    # take / give for a caller that holds the count as a C int and the run typed
    # (the pool service's compiled ALLOC / SHM_CLOSE, fastpath.pyx)
    cdef object take_run(self, int64_t n, object npages)
    cdef Py_ssize_t give_run(self, ArenaRun r) except -1
