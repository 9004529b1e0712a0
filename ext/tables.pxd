# tables.pxd: typed fields of FrameTable, IdTable and AddressMap, and the small
# C helpers that tables.pyx, pagelist.pyx and copy.pyx share (integer
# conversion that never raises for an out-of-range int, region search).
#
# Concurrency: plain data, no locks; see tables.pyx.
from libc.stdint cimport uint64_t, int64_t, int32_t, uint32_t
from cpython.object cimport PyObject

cdef extern from *:
    """
    #include <string.h>

    /* Host byte order, fixed at compile time; the page-list code copies
       entries verbatim on little-endian hosts and swaps them otherwise. */
    #if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && \
        __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    #define PSV_LITTLE_ENDIAN 1
    #elif defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && \
        __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define PSV_LITTLE_ENDIAN 0
    #else
    #error "poolsvc: cannot tell the host byte order"
    #endif

    static inline unsigned long long psv_bswap64(unsigned long long x) {
        return __builtin_bswap64(x);
    }

    /* An int-like object as a u64.
       1: it is an int in [0, 2**64), stored in *out;
       0: it is an int outside that range (no exception set);
      -1: it is not an int (TypeError set by PyNumber_Index). */
    static inline int psv_u64_from_obj(PyObject *o, unsigned long long *out) {
        unsigned long long v;
        PyObject *idx;
        if (PyLong_CheckExact(o)) {
            v = PyLong_AsUnsignedLongLong(o);
            if (v == (unsigned long long)-1 && PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
                PyErr_Clear();
                return 0;
            }
            *out = v;
            return 1;
        }
        idx = PyNumber_Index(o);
        if (idx == NULL) return -1;
        v = PyLong_AsUnsignedLongLong(idx);
        Py_DECREF(idx);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
            PyErr_Clear();
            return 0;
        }
        *out = v;
        return 1;
    }

    /* The same for a signed 64-bit value: 1 in range; 0 outside, with *out
       clamped to INT64_MIN or INT64_MAX by the sign; -1 not an int. */
    static inline int psv_i64_from_obj(PyObject *o, long long *out) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (v == -1 && !overflow && PyErr_Occurred()) return -1;
        if (overflow) {
            *out = overflow > 0 ? 0x7fffffffffffffffLL : (-0x7fffffffffffffffLL - 1);
            return 0;
        }
        *out = v;
        return 1;
    }
    """
    enum: PSV_LITTLE_ENDIAN
    unsigned long long psv_bswap64(unsigned long long x) noexcept nogil
    int psv_u64_from_obj(object o, unsigned long long *out) except -1
    int psv_i64_from_obj(object o, long long *out) except -1

# Limits shared with the pure twin (poolsvc/_pure/tables.py).
cdef enum:
    FT_MAX_REGIONS = 16            # region records searched linearly
    FT_MAX_STORAGE_ID = 65535      # 0 <= storage_id <= FT_MAX_STORAGE_ID
    FT_UNMAPPED = -1               # frame_sid[slot] of a frame with no storage

# frames covered by all regions together: sum(count) <= PSV_FT_MAX_FRAMES;
# page indexes: 0 <= page_index < PSV_FT_MAX_PAGE_INDEX, so index*4096 fits int64
cdef extern from *:
    """
    #define PSV_FT_MAX_FRAMES (1ULL << 24)
    #define PSV_FT_MAX_PAGE_INDEX (1LL << 51)
    """
    unsigned long long PSV_FT_MAX_FRAMES
    long long PSV_FT_MAX_PAGE_INDEX


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


cdef class IdTable:
    # Allocated ids: [1, hwm) minus the ids in the heap.
    #   objects[i] is _ID_FREE      <=> i is free (0 <= i < hwm; slot 0 unused)
    #   objects[i] is _ID_RESERVED  <=> i allocated without an object
    #   len(objects) == hwm;  count == hwm - 1 - heap_len
    # heap[0:heap_len] is a binary min-heap of the free ids below hwm.
    cdef list objects
    cdef int64_t hwm
    cdef int64_t id_limit        # max_id: 1 <= id <= id_limit; hwm <= id_limit + 1
    cdef int64_t count
    cdef int32_t *heap
    cdef Py_ssize_t heap_len
    cdef Py_ssize_t heap_cap

    cdef bint allocated(self, int64_t i) noexcept
    cdef int64_t heap_pop(self) noexcept
    cdef int heap_push(self, int32_t value) except -1


cdef class AddressMap:
    # n intervals, sorted: starts[i] < ends[i] <= starts[i+1];
    # interval i maps [starts[i], ends[i]) to (keys[i], offsets[i] + addr - starts[i]).
    cdef uint64_t *starts
    cdef uint64_t *ends
    cdef int64_t *keys
    cdef uint64_t *offsets
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    cdef int grow(self) except -1
