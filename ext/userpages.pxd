# userpages.pxd: typed fields of UserPages (logic in userpages.pyx).
# Included textually from _core.pxd after frametable.pxd and framealloc.pxd
# (it names FrameTable and FrameAllocator).
#
# Concurrency: a UserPages belongs to one thread at a time (the System's); no locks.
cimport cython
from libc.stdint cimport uint64_t, uint32_t, int64_t, int32_t


@cython.final
cdef class UserPages:
    # The ledger of one backing object, page p of the object (0 <= p < n):
    #   refs[p] > 0  <=>  pa[p] != 0, and then frame pa[p] is in use in frames
    #                     and mapped in table to a page of storage sid[p]
    #   refs[p] == 0  =>  pa[p] == 0 and sid[p] == -1
    #   pinned == |{p : refs[p] > 0}|,  nrefs == sum(refs)
    #   the nstore pairs (store_sid[i], store_pages[i]) count the pinned pages
    #   of each storage id: store_pages[i] == |{p : refs[p] > 0, sid[p] == store_sid[i]}|
    # The arrays have room for cap >= n pages (store arrays: store_cap >= nstore).
    cdef FrameTable table
    cdef FrameAllocator frames
    cdef uint64_t *pa
    cdef uint32_t *refs
    cdef int32_t *sid
    cdef int64_t n
    cdef int64_t cap
    cdef int64_t pinned
    cdef int64_t nrefs
    cdef int32_t *store_sid
    cdef int64_t *store_pages
    cdef Py_ssize_t nstore
    cdef Py_ssize_t store_cap

    cdef int _grow(self, int64_t n) except -1
    cdef Py_ssize_t _store(self, int32_t sid) except -1
    cdef int _give_frames(self, object freed, const uint64_t *pas, int64_t n) except -1
