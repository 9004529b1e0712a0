# addressmap.pxd: typed fields of AddressMap (logic in addressmap.pyx).
#
# Concurrency: plain data, no locks; see addressmap.pyx.
from libc.stdint cimport uint64_t, int64_t


cdef class AddressMap:
    # n intervals, sorted: starts[i] < ends[i] <= starts[i+1];
    # interval i maps [starts[i], ends[i]) to (keys[i], offsets[i] + addr - starts[i]).
    # The four arrays have room for cap >= n entries.
    cdef uint64_t *starts
    cdef uint64_t *ends
    cdef int64_t *keys
    cdef uint64_t *offsets
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    cdef int grow(self) except -1
